"""The agent's own log lines: `pcp.logs` with the node's context bound once.

Every line carries stack, run_id and node, so one Cloud Logging filter follows a node
through realise, boot, run, done and power-off.
"""

from __future__ import annotations

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

    def info(self, event: str, reason: str, **fields: Any) -> None:
        self("INFO", event, reason, **fields)

    def warning(self, event: str, reason: str, **fields: Any) -> None:
        self("WARNING", event, reason, **fields)

    def error(self, event: str, reason: str, **fields: Any) -> None:
        self("ERROR", event, reason, **fields)
