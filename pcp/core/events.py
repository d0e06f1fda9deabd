"""Events that decide() receives besides the wire messages: what the service observed."""

from __future__ import annotations

from dataclasses import dataclass, field

from pcp.core.messages import NodeMarker, StartRequest, StopRequest

RUNNING_STATES = frozenset({"PROVISIONING", "STAGING", "RUNNING"})


@dataclass(frozen=True)
class VmView:
    """A VM as Compute Engine reports it. Label times are epoch seconds; `created` is the
    VM's creation time (epoch seconds), when the API gave one."""

    name: str
    status: str
    labels: dict[str, str] = field(default_factory=dict)
    created: int | None = None

    @property
    def up(self) -> bool:
        """Up, or on its way up: it costs money or soon will."""
        return self.status in RUNNING_STATES

    def label_epoch(self, key: str) -> int | None:
        value = self.labels.get(key, "")
        return int(value) if value.isdigit() else None


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
class Markers:
    """A marker event, plus other markers of the same run already in the bucket.

    The service folds them in after losing a race, so a storm of markers settles in a few
    writes of the stack document instead of one write each.
    """

    marker: NodeMarker
    others: tuple[NodeMarker, ...] = ()


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


Event = StartRequest | StopRequest | NodeMarker | Markers | Reconcile | StartFailed | Rejected
