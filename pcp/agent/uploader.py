"""Copy a node's logs, outputs, heartbeat and markers into the stack bucket.

GCS objects are immutable, so a growing log is re-uploaded whole; a file is sent again only
when its size or modification time changed since the last upload. Everything lands under
`runs/<run_id>/<node>/`, except the markers, which go under `markers/` (the only prefix that
raises events), so logs and checkpoints never invoke a function.
"""

from __future__ import annotations

import json
import mimetypes
import os
import socket
import time
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


def content_type(name: str) -> str:
    if name.endswith(".log"):
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(name)
    return guessed or "application/octet-stream"


class Uploader:
    def __init__(self, store: BlobStore, assignment: Assignment, log: Log) -> None:
        self.store = store
        self.a = assignment
        self.log = log
        self.prefix = node_prefix(assignment.run_id, assignment.node)
        self.host = socket.gethostname()
        self._sent: dict[str, tuple[int, int]] = {}

    def file(self, path: Path, name: str, force: bool = False) -> bool:
        """Upload `path` as `name` if it changed since last time (or `force`)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        stamp = (st.st_size, st.st_mtime_ns)
        if not force and self._sent.get(name) == stamp:
            return False
        put_file = getattr(self.store, "put_file", None)  # streams big files when offered
        if callable(put_file):
            put_file(name, path, content_type=content_type(name))
        else:
            self.store.put(name, path.read_bytes(), content_type=content_type(name))
        self._sent[name] = stamp
        return True

    def logs(self, stdout: Path, stderr: Path, force: bool = False,
             times: Path | None = None) -> None:
        """The two logs, then `times` (their logtimes.txt, pcp/agent/logtimes.py): a reader
        that sees the index finds logs at least as long as the index says."""
        self.file(stdout, self.prefix + "stdout.log", force)
        self.file(stderr, self.prefix + "stderr.log", force)
        if times is not None:
            self.file(times, self.prefix + "logtimes.txt", force)

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
                  gpus: list[dict[str, Any]] | None = None, gpu_error: str | None = None) -> None:
        """heartbeat.json; `gpus`: the last nvidia-smi sample, one entry per GPU (`index`,
        `utilization_percent`, `memory_used_mib`), `gpu_error` why the last sample failed."""
        body: dict[str, Any] = {
            "run_id": self.a.run_id, "node": self.a.node, "attempt": self.a.attempt,
            "at": iso(now or datetime.now(UTC)), "host": self.host, "phase": phase, "pid": pid,
        }
        if gpus is not None:
            body["gpus"] = gpus
        if gpu_error is not None:
            body["gpu_error"] = gpu_error
        self.store.put(self.prefix + "heartbeat.json",
                       json.dumps(body, sort_keys=True).encode())

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
