"""Process supervision for the local replica: children in their own sessions, found again by
a token in their environment, stopped with everything they started."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pcp.agent.procs import signal_group
from pcp.cli.supervisor import process_start

if TYPE_CHECKING:
    pass

TOKEN_ENV = "PCP_REPLICA_TOKEN"


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from `ps` (Linux and macOS alike)."""
    try:
        out = subprocess.run(["ps", "-A", "-o", "pid=", "-o", "ppid="], capture_output=True,
                             text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    tree: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            tree.setdefault(int(parts[1]), []).append(int(parts[0]))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(pid: int, sig: int, group: bool) -> None:
    if group:
        signal_group(pid, sig)
        return
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def carries(pid: int, token: str) -> bool | None:
    """Whether a process's environment carries the token; None where /proc cannot tell."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except FileNotFoundError:
        return None if not Path("/proc").is_dir() else False
    except OSError:
        return False
    return f"{TOKEN_ENV}={token}".encode() in env.split(b"\0")


def token_pids(token: str) -> list[int]:
    """Processes whose environment carries this replica's token (Linux /proc; else none)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    return [int(e.name) for e in proc.iterdir()
            if e.name.isdigit() and int(e.name) != os.getpid() and carries(int(e.name), token)]


def same_process(pid: Any, start: Any) -> bool:
    """Whether the process recorded as (`pid`, `start`) still runs."""
    return isinstance(pid, int) and pid > 0 and start is not None and \
        process_start(pid) == str(start)


def record(name: str, pid: int | None) -> dict[str, Any] | None:
    """What the state file keeps of one process the replica started: enough for `pcp local
    down` to stop it, and all it started, when the replica itself can no longer."""
    if pid is None:
        return None
    start = process_start(pid)
    return None if start is None else {"name": name, "pid": pid, "start": start}


def stop_recorded(records: Any, token: str | None) -> list[str]:
    """SIGKILL every recorded process that still runs (checked by its start, so a reused
    pid is never hit), its process group and everything it started; then whatever else
    carries the replica's token. Returns the names of those that were running."""
    stopped = []
    for rec in records if isinstance(records, list) else []:
        if not isinstance(rec, dict) or not same_process(rec.get("pid"), rec.get("start")):
            continue
        pid = int(rec["pid"])
        tree = descendants(pid)
        _kill(pid, signal.SIGKILL, group=True)
        _kill(pid, signal.SIGKILL, group=False)
        for child in tree:
            _kill(child, signal.SIGKILL, group=True)
            _kill(child, signal.SIGKILL, group=False)
        stopped.append(str(rec.get("name")))
    if token:
        for pid in token_pids(token):
            _kill(pid, signal.SIGKILL, group=False)
    return stopped


class Child:
    """One process of the replica: its own session, output in a log file, stopped as a tree."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_exit = False  # set before the replica itself stops it

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"--- {datetime.now(UTC).isoformat()} start {self.name}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float) -> int | None:
        """SIGTERM the group, wait `grace`, then SIGKILL it and whatever it started."""
        if self.proc is None:
            return None
        self.expected_exit = True
        tree = descendants(self.proc.pid) if self.running else []
        if self.running:
            _kill(self.proc.pid, signal.SIGTERM, group=True)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_tree(tree)
        return self.proc.returncode

    def kill(self) -> None:
        """A crash: SIGKILL at once, no chance to clean up (used to break things on purpose)."""
        if self.proc is None:
            return
        self.expected_exit = True
        self._kill_tree(descendants(self.proc.pid) if self.running else [])

    def _kill_tree(self, tree: list[int]) -> None:
        assert self.proc is not None
        _kill(self.proc.pid, signal.SIGKILL, group=True)
        token = self.env.get(TOKEN_ENV)
        for pid in tree:
            if token is not None and carries(pid, token) is False:
                continue  # gone, and its number perhaps reused by a stranger: leave it be
            _kill(pid, signal.SIGKILL, group=True)  # a child that made its own session
            _kill(pid, signal.SIGKILL, group=False)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _http_answers(url: str) -> bool:
    """Any HTTP answer (functions-framework answers GET / with 405) means it is serving."""
    try:
        with urllib.request.urlopen(url, timeout=1):  # loopback only
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
