"""The agent's own log lines: `pcp.logs` with the node's context bound once.

Every line carries stack, run_id and node, so one Cloud Logging filter follows a node
through realise, boot, run, done and power-off. On a worker they go to stdout (the journal);
on the shepherd Mac to a file the agent rotates itself (`LogFile`).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

from pcp import logs


class Log:
    """A `pcp.logs.log` with fixed context; `bind` returns a copy with more context."""

    def __init__(self, stack: str = "", run_id: str | None = None, **context: Any) -> None:
        self.stack = stack
        self.run_id = run_id
        self.context = context

    def bind(self, **context: Any) -> Log:
        merged = {"stack": self.stack, "run_id": self.run_id, **self.context, **context}
        return Log(**merged)

    def __call__(self, severity: str, event: str, reason: str, **fields: Any) -> None:
        logs.log(severity, event, stack=self.stack or "-", run_id=self.run_id, reason=reason,
                 component="agent", **self.context, **fields)
        if _log_file is not None:
            _log_file.rotate_if_full()

    def info(self, event: str, reason: str, **fields: Any) -> None:
        self("INFO", event, reason, **fields)

    def warning(self, event: str, reason: str, **fields: Any) -> None:
        self("WARNING", event, reason, **fields)

    def error(self, event: str, reason: str, **fields: Any) -> None:
        self("ERROR", event, reason, **fields)


class LogFile:
    """The agent's stdout and stderr as a size-bounded file the agent rotates itself.

    On the shepherd Mac, launchd would hold `StandardOutPath` open for the daemon's whole
    life, and newsyslog cannot make it reopen the file (there is no signal to send), so a
    rotated log would keep growing unlinked. Instead the agent opens its own file and puts it
    on file descriptors 1 and 2 (so Python tracebacks land there too). After a line leaves
    the file at `max_bytes` or more, it renames `path` to `path.1` (`path.1` to `path.2`, ...,
    keeping `backups`) and opens a fresh `path` on the same descriptors.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        if max_bytes < 1 or backups < 1:
            raise ValueError("a log file needs max_bytes >= 1 and backups >= 1")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    def open(self) -> None:
        """(Re)open `path` for appending and make it this process's stdout and stderr."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)

    def rotate_if_full(self) -> bool:
        """Rotate when the current file has reached `max_bytes`. Returns whether it did."""
        with self._lock:
            try:
                if os.fstat(1).st_size < self.max_bytes:
                    return False
            except OSError:
                return False
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.path.exists():
                self.path.replace(self.path.with_name(f"{self.path.name}.1"))
            self.open()
            return True


_log_file: LogFile | None = None


def use_log_file(log_file: LogFile | None) -> None:
    """Write the agent's output to `log_file` from now on (None: stdout as it is)."""
    global _log_file
    if log_file is not None:
        log_file.open()
    _log_file = log_file
