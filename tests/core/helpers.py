"""Builders for lifecycle tests: states, markers and observations in a few words."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from pcp.core.commands import Command
from pcp.core.events import Reconcile, VmView
from pcp.core.lifecycle import Transition, decide
from pcp.core.messages import NodeMarker, StartRequest
from pcp.core.names import LABEL_ATTEMPT, LABEL_RUN
from pcp.core.policy import Policy
from pcp.core.state import StackState

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def policy(workers: int = 1, **over: object) -> Policy:
    base: dict[str, object] = dict(stack="tiny", worker_count=workers, shepherd_host="mac",
                                   default_binary="github:org/repo#trainer",
                                   worker_hourly_usd=1.0, shepherd_hourly_usd=0.5)
    base.update(over)
    return Policy(**base)  # type: ignore[arg-type]


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def req(run_id: str = "r1", **fields: object) -> StartRequest:
    return replace(StartRequest(run_id=run_id), **fields)


def marker(run_id: str, node: str, kind: str, minute: float = 1, code: int | None = 0,
           attempt: int = 1, signal: str | None = None) -> NodeMarker:
    done = kind == "done"
    return NodeMarker(run_id=run_id, node=node, kind=kind, attempt=attempt,  # type: ignore[arg-type]
                      at=at(minute), exit_code=code if done else None,
                      signal=signal if done else None)


def kinds(t: Transition) -> list[str]:
    return [type(c).__name__ for c in t.commands]


def of(t: Transition, kind: type) -> list[Command]:
    return [c for c in t.commands if isinstance(c, kind)]


class Stack:
    """Drives decide() by hand, keeping the state between events."""

    def __init__(self, p: Policy | None = None) -> None:
        self.policy = p or policy()
        self.state = StackState()
        self.last: Transition | None = None

    def __call__(self, event: object, minute: float = 0) -> Transition:
        self.last = decide(self.state, event, at(minute), self.policy)  # type: ignore[arg-type]
        self.state = self.last.state
        return self.last

    def boot_all(self, run_id: str = "r1", minute: float = 1, attempt: int = 1) -> None:
        for node in self.policy.node_names:
            self(marker(run_id, node, "booted", minute, attempt=attempt), minute)

    def finish_all(self, run_id: str = "r1", minute: float = 2, attempt: int = 1) -> None:
        for node in self.policy.node_names:
            self(marker(run_id, node, "done", minute, attempt=attempt), minute)

    def vms(self, status: str = "RUNNING", run_id: str | None = "r1",
            attempt: int = 1) -> Reconcile:
        """What a sweep sees in a healthy world: the VMs, and every ended record written."""
        labels = {} if run_id is None else {LABEL_RUN: run_id, LABEL_ATTEMPT: str(attempt)}
        return Reconcile(vms=tuple(VmView(v, status, dict(labels))
                                   for v in self.policy.worker_vms),
                         archived=frozenset(r.run_id for r in self.state.unarchived))
