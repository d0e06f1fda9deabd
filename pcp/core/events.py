"""Events that decide() receives besides the wire messages: what the service observed."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pcp.core.messages import (
    BudgetNotification,
    BudgetResume,
    NodeMarker,
    StartRequest,
    StopRequest,
)
from pcp.core.names import LABEL_ATTEMPT, LABEL_RUN

RUNNING_STATES = frozenset({"PROVISIONING", "STAGING", "RUNNING"})


@dataclass(frozen=True)
class VmView:
    """A VM as Compute Engine reports it. Label times are epoch seconds; `created` is the
    VM's creation time (epoch seconds), when the API gave one. `capped_stop` is the time
    (epoch seconds) of the VM's last stop when that stop came at or after its armed
    `scheduling.maxRunDuration` had run out since its last start: GCE's hard cap stopped it."""

    name: str
    status: str
    labels: dict[str, str] = field(default_factory=dict)
    created: int | None = None
    capped_stop: int | None = None

    @property
    def up(self) -> bool:
        """Up, or on its way up: it costs money or soon will."""
        return self.status in RUNNING_STATES

    def label_epoch(self, key: str) -> int | None:
        value = self.labels.get(key, "")
        return int(value) if value.isdigit() else None


def hard_cap_stops(vms: Sequence[VmView], now: datetime, window_s: float) -> list[VmView]:
    """The VMs GCE's hard cap stopped within the `window_s` seconds before `now` (one sweep
    interval: each such stop is reported by the sweep that follows it)."""
    t = now.timestamp()
    return [v for v in vms if v.capped_stop is not None and t - window_s < v.capped_stop]


def holds_attempt(labels: Mapping[str, str], run_id: str, attempt: int) -> bool:
    """Whether a VM's labels say it runs this attempt of this run (its start already happened)."""
    return labels.get(LABEL_RUN) == run_id and labels.get(LABEL_ATTEMPT) == str(attempt)


def late_stop_spares(labels: Mapping[str, str], owner: str | None,
                     current: Callable[[], tuple[str, int] | None] | None) -> bool:
    """Whether a stop decided earlier must leave this VM alone: it now holds the attempt active
    when the stop executes. A VM still labelled with the stopped run (`owner`) is never spared,
    and `current` (which costs a read) is asked only for the others."""
    if current is None or (owner is not None and labels.get(LABEL_RUN) == owner):
        return False
    active = current()
    return active is not None and holds_attempt(labels, *active)


@dataclass(frozen=True)
class Reconcile:
    """Level-triggered check: actual VMs and markers present, compared with the state.

    `state_lost` says the stack document was missing or unreadable, so labels are the only
    record of keep-alive leases. `archived` names the ended runs whose run record the service
    found written.
    """

    vms: tuple[VmView, ...]
    markers: tuple[NodeMarker, ...] = ()
    state_lost: bool = False
    archived: frozenset[str] = frozenset()  # unarchived runs whose ended record is written


@dataclass(frozen=True)
class StartFailed:
    """Compute refused to start a run's VMs for a reason retrying will not fix."""

    run_id: str
    attempt: int
    detail: str


@dataclass(frozen=True)
class Rejected:
    """A request that failed to parse or validate; recorded so `pcp status` can show why."""

    run_id: str
    detail: str


Event = (StartRequest | StopRequest | NodeMarker | Reconcile | StartFailed | Rejected
         | BudgetNotification | BudgetResume)
