"""Copy a node's logs, outputs, heartbeat and markers into the stack bucket.

GCS objects are immutable, so a growing log is re-uploaded whole; a file is sent again only
when its size or modification time changed since the last upload. Everything lands under
`runs/<run_id>/<node>/`, except the markers, which go under `markers/` (the only prefix that
raises events), so logs and checkpoints never invoke a function.

Cloud Storage takes about one update a second on each object; faster, it answers 429 and the
client backs off for a second or more, holding up the agent's loop. So the uploader paces
itself: a periodic upload (a log, the heartbeat, an output file) of an object written less
than `MIN_OBJECT_GAP` seconds ago is skipped until the next tick, and a final one (`force`)
waits out the rest of the gap. The markers are written once each and never wait.
"""

from __future__ import annotations

import json
import mimetypes
import os
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pcp.agent.log import Log
from pcp.core.messages import Assignment, NodeMarker
from pcp.core.names import node_prefix
from pcp.core.ports import BlobStore
from pcp.core.timefmt import iso

# Names the agent writes itself; an output file of the same name would overwrite them.
RESERVED = frozenset({"stdout.log", "stderr.log", "logtimes.txt", "heartbeat.json"})
#: Seconds between two writes of one object: Cloud Storage's per-object update limit.
MIN_OBJECT_GAP = 1.0


def content_type(name: str) -> str:
    if name.endswith(".log"):
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


def _stamp(path: Path) -> tuple[int, int] | None:
    """What tells a changed file: its size and modification time (None: no such file)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


class Uploader:
    def __init__(self, store: BlobStore, assignment: Assignment, log: Log, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.a = assignment
        self.log = log
        self.prefix = node_prefix(assignment.run_id, assignment.node)
        self.host = socket.gethostname()
        self._sent: dict[str, tuple[int, int]] = {}
        self._written: dict[str, float] = {}  # object name -> clock() of its last write
        self.clock, self.sleep = clock, sleep

    def _paced(self, name: str, force: bool) -> bool:
        """Whether `name` may be written now. A forced write waits out the per-object gap;
        another one written too recently is left for the next tick."""
        last = self._written.get(name)
        wait = 0.0 if last is None else last + MIN_OBJECT_GAP - self.clock()
        if wait <= 0:
            return True
        if not force:
            return False
        self.sleep(wait)
        return True

    def _put(self, name: str, write: Callable[[], object]) -> None:
        write()
        self._written[name] = self.clock()

    def file(self, path: Path, name: str, force: bool = False) -> bool:
        """Upload `path` as `name` if it changed since last time (or `force`)."""
        stamp = _stamp(path)
        if stamp is None:
            return False
        if not force and self._sent.get(name) == stamp:
            return False
        if not self._paced(name, force):
            return False
        put_file = getattr(self.store, "put_file", None)  # streams big files when offered
        if callable(put_file):
            self._put(name, lambda: put_file(name, path, content_type=content_type(name)))
        else:
            self._put(name, lambda: self.store.put(name, path.read_bytes(),
                                                   content_type=content_type(name)))
        self._sent[name] = stamp
        return True

    def logs(self, stdout: Path, stderr: Path, force: bool = False,
             times: Path | None = None) -> None:
        """The two logs, then `times` (their logtimes.txt, pcp/agent/logtimes.py): a reader
        that sees the index finds logs at least as long as the index says."""
        self.file(stdout, self.prefix + "stdout.log", force)
        self.file(stderr, self.prefix + "stderr.log", force)
        held = any(self._unsent(path, self.prefix + name)
                   for path, name in ((stdout, "stdout.log"), (stderr, "stderr.log")))
        if times is not None and not held:  # a log left for the next tick holds its index
            self.file(times, self.prefix + "logtimes.txt", force)

    def _unsent(self, path: Path, name: str) -> bool:
        """Whether `path` changed since its last upload as `name` (one left for a tick)."""
        stamp = _stamp(path)
        return stamp is not None and self._sent.get(name) != stamp

    def output(self, directory: Path, until: float | None = None) -> int:
        """Upload every changed regular file under `directory`, keeping relative paths.
        Returns the count. With `until` (a time.monotonic() deadline) no upload starts after
        it; what is left is named in a warning (one file already under way may run past)."""
        sent = 0
        if not directory.is_dir():
            return 0
        left: list[str] = []
        for root, dirs, files in os.walk(directory):  # does not follow symlinked directories
            dirs.sort()
            for fname in sorted(files):
                path = Path(root) / fname
                if until is not None and time.monotonic() >= until:
                    left.append(path.relative_to(directory).as_posix())
                    continue
                rel = path.relative_to(directory).as_posix()
                if path.is_symlink() or not path.is_file():
                    continue
                if rel in RESERVED:
                    self.log.warning("output_skipped", f"output file {rel} would overwrite the "
                                     "agent's own object of that name; not uploaded")
                    continue
                sent += self.file(path, self.prefix + rel)
        if left:
            self.log.warning("output_cut_short", f"no time left to upload {len(left)} output "
                             f"file(s) before done: {', '.join(left[:10])}", files=len(left))
        return sent

    def heartbeat(self, phase: str, pid: int | None, now: datetime | None = None,
                  gpus: list[dict[str, Any]] | None = None, gpu_error: str | None = None,
                  force: bool = False) -> bool:
        """heartbeat.json; `gpus`: the last nvidia-smi sample, one entry per GPU (`index`,
        `utilization_percent`, `memory_used_mib`), `gpu_error` why the last sample failed.
        False when it was skipped (written less than a second ago, and not `force`)."""
        name = self.prefix + "heartbeat.json"
        if not self._paced(name, force):
            return False
        body: dict[str, Any] = {
            "run_id": self.a.run_id, "node": self.a.node, "attempt": self.a.attempt,
            "at": iso(now or datetime.now(UTC)), "host": self.host, "phase": phase, "pid": pid,
        }
        if gpus is not None:
            body["gpus"] = gpus
        if gpu_error is not None:
            body["gpu_error"] = gpu_error
        self._put(name, lambda: self.store.put(name, json.dumps(body, sort_keys=True).encode()))
        return True

    def marker(self, kind: str, exit_code: int | None = None, signal: str | None = None,
               duration_s: float | None = None, tries: int = 3,
               end_reason: str | None = None) -> NodeMarker:
        """Write booted or done. Retried (on top of the client's own retries of 5xx and 429):
        a lost done marker leaves the run waiting for the sweeper."""
        marker = NodeMarker(run_id=self.a.run_id, node=self.a.node,
                            kind="booted" if kind == "booted" else "done",
                            attempt=self.a.attempt, at=datetime.now(UTC), exit_code=exit_code,
                            signal=signal, duration_s=duration_s, host=self.host,
                            end_reason=end_reason if kind == "done" else None)
        for attempt in range(tries):
            try:
                self.store.put(marker.path, marker.to_json(), metadata=marker.to_metadata())
                break
            except Exception as e:  # noqa: BLE001 - transient storage errors are retried
                if attempt == tries - 1:
                    raise
                self.log.warning("marker_retry", f"writing {marker.path} failed: {e}")
                time.sleep(2**attempt)
        self.log.info(f"marker_{kind}", f"wrote {marker.path}", exit_code=exit_code,
                      signal=signal, duration_s=duration_s,
                      **({"end_reason": end_reason} if end_reason else {}))
        return marker
