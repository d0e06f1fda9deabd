"""Run the binary as its own process group, with stdout and stderr going to files.

Its own session means a signal can reach everything the binary started (data loader workers,
torchrun children) and that a terminal's Ctrl-C aimed at the agent does not hit it directly.
Termination is a small state machine driven by `tick()`, so log uploads keep running during
the grace period: SIGTERM to the group, then SIGKILL once the grace has passed.

Some launchers put their children in sessions of their own (torchrun starts every local rank
with `start_new_session`), out of reach of a signal to the binary's group. On Linux the
runner therefore notes, every few seconds, the process groups its descendants lead, and the
SIGKILL at the end of the grace and the reaping after the exit reach those groups too.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pcp.agent.procs import signal_group

CANNOT_EXECUTE = 126  # the shell's "found but cannot execute"
SCAN_SECONDS = 2.0  # how often the descendants' process groups are noted
PROC = Path("/proc")


def _stat(pid_dir: Path) -> tuple[int, int, int, str] | None:
    """(pid, ppid, pgid, start time) from /proc/<pid>/stat, or None."""
    try:
        text = (pid_dir / "stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()  # the command name may hold spaces
    try:
        return int(pid_dir.name), int(fields[1]), int(fields[2]), fields[19]
    except (IndexError, ValueError):
        return None


def descendant_groups(root: int, proc: Path = PROC) -> dict[int, str]:
    """The process groups led by descendants of `root` outside its own group, as
    pgid -> start time of the leader (so a reused id is never signalled). Empty without
    /proc (the shepherd Mac, which starts no launcher)."""
    try:
        stats = [st for d in proc.iterdir() if d.name.isdigit() and (st := _stat(d))]
    except OSError:
        return {}
    children: dict[int, list[tuple[int, int, str]]] = {}
    for pid, ppid, pgid, start in stats:
        children.setdefault(ppid, []).append((pid, pgid, start))
    groups: dict[int, str] = {}
    todo = [root]
    while todo:
        for pid, pgid, start in children.get(todo.pop(), []):
            todo.append(pid)
            if pgid == pid and pgid != root:
                groups[pgid] = start
    return groups


def signal_noted(groups: dict[int, str], sig: int, proc: Path = PROC) -> None:
    """Signal the noted groups whose leader is gone or still the same process."""
    for pgid, start in groups.items():
        st = _stat(proc / str(pgid))
        if st is None or st[3] == start:
            signal_group(pgid, sig)


@dataclass(frozen=True)
class Exit:
    """How the binary ended, as the `done` marker reports it.

    `signal` names the signal that ended it, or the one the agent sent to stop it (a binary
    that catches SIGTERM and exits 143 still reads as stopped by SIGTERM).
    """

    exit_code: int
    signal: str | None
    duration_s: float


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


class Runner:
    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path,
                 stdout: Path, stderr: Path) -> None:
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.stdout = stdout
        self.stderr = stderr
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.sent: str | None = None  # first signal the agent sent
        self.kill_at: float | None = None
        self.ended: float | None = None
        self.groups: dict[int, str] = {}  # descendants' own process groups (see above)
        self.next_scan = 0.0

    def start(self) -> None:
        """Start the binary; OSError (not executable, bad interpreter) propagates."""
        with open(self.stdout, "ab") as out, open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                         start_new_session=True)
        self.started = time.monotonic()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def poll(self) -> int | None:
        assert self.proc is not None
        code = self.proc.poll()
        if code is not None and self.ended is None:
            self.ended = time.monotonic()
        return code

    def terminate(self, grace: float) -> None:
        """SIGTERM the group now and SIGKILL it after `grace` seconds (on a later tick)."""
        if self.kill_at is not None:
            return
        self.kill_at = time.monotonic() + grace
        self.note_groups()
        self._signal_group(signal.SIGTERM)

    def tick(self) -> None:
        if time.monotonic() >= self.next_scan:
            self.next_scan = time.monotonic() + SCAN_SECONDS
            self.note_groups()
        if self.kill_at is not None and time.monotonic() >= self.kill_at and self.poll() is None:
            self.note_groups()
            self._signal_group(signal.SIGKILL)
            signal_noted(self.groups, signal.SIGKILL)
            self.kill_at = float("inf")

    def note_groups(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.groups.update(descendant_groups(self.proc.pid))

    def reap_group(self) -> None:
        """After the main process exited: kill what it left behind, in its group and in the
        groups its descendants led."""
        if self.proc is not None:
            signal_group(self.proc.pid, signal.SIGKILL)
            signal_noted(self.groups, signal.SIGKILL)

    def exit(self) -> Exit:
        assert self.proc is not None and self.proc.returncode is not None
        code = self.proc.returncode
        duration = round((self.ended or time.monotonic()) - self.started, 3)
        if code < 0:
            return Exit(128 - code, signal_name(-code), duration)
        return Exit(code, self.sent, duration)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.sent is None:
            self.sent = sig.name
        signal_group(self.proc.pid, sig)
