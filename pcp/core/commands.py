"""Commands: what must happen in the world after a transition is saved.

Every command is idempotent, so a retry or a re-issue by the sweeper is harmless.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pcp.core.messages import Assignment, ShepherdCommand
from pcp.core.state import Run


@dataclass(frozen=True)
class StartNodes:
    """Boot the worker VMs for an attempt: metadata, labels, maxRunDuration armed, then start.

    A VM already running under another assignment is stopped first, so every attempt boots
    clean.
    """

    run_id: str
    attempt: int
    assignments: tuple[Assignment, ...]
    deadline: datetime

    @property
    def vms(self) -> tuple[str, ...]:
        return tuple(a.vm for a in self.assignments)


@dataclass(frozen=True)
class StopNodes:
    """Stop VMs. Stopping a stopped or missing VM succeeds. The service spares VMs labelled
    for the run attempt active when the stop executes, so a late stop never hits it."""

    vms: tuple[str, ...]
    reason: str
    run_id: str | None = None


@dataclass(frozen=True)
class CommandShepherd:
    """Tell the shepherd host to start or stop its part of a run."""

    command: ShepherdCommand


@dataclass(frozen=True)
class LabelNodes:
    """Set labels on VMs (keep-alive lease end), so the sweeper can act without the state."""

    vms: tuple[str, ...]
    labels: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ArchiveRun:
    """Write runs/<id>/run.json and, once the run has ended, runs/<id>/summary.json."""

    run: Run


Command = StartNodes | StopNodes | CommandShepherd | LabelNodes | ArchiveRun
