"""Run the binary as its own process group, with stdout and stderr going to files.

Its own session means a signal can reach everything the binary started (data loader workers,
torchrun children) and that a terminal's Ctrl-C aimed at the agent does not hit it directly.
Termination is a small state machine driven by `tick()`, so log uploads keep running during
the grace period: SIGTERM to the group, then SIGKILL once the grace has passed.
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
        self._signal_group(signal.SIGTERM)

    def tick(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at and self.poll() is None:
            self._signal_group(signal.SIGKILL)
            self.kill_at = float("inf")

    def reap_group(self) -> None:
        """After the main process exited: kill what it left behind in its group."""
        if self.proc is not None:
            signal_group(self.proc.pid, signal.SIGKILL)

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
