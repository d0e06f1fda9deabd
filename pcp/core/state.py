"""Run state: the stack document (control/stack.json) and the run record (runs/<id>/run.json).

The stored fact is the phase and, once a run ends, its terminal reason; the status a person
sees is derived from them through one total mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from pcp.core.errors import CorruptState, PermanentError
from pcp.core.images import pinned_image
from pcp.core.messages import NODE_END_REASONS as MARKER_END_REASONS
from pcp.core.messages import (
    StartRequest,
    decode_json,
    dump,
    positive_usd,
    validate_secret,
)
from pcp.core.timefmt import iso, opt_iso, opt_time, parse_time

SCHEMA = 1


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise PermanentError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _why(e: Exception) -> str:
    """A stored document's defect in words: a missing field names the field."""
    if isinstance(e, KeyError):
        return f"missing field {e}"
    return str(e) if isinstance(e, PermanentError) else f"{type(e).__name__}: {e}"


DEADLINE_LIMITS = ("max_hours", "max_cost_usd")


def _deadline_by(value: object) -> str | None:
    if value is None:
        return None
    if value not in DEADLINE_LIMITS:
        raise PermanentError(f"deadline_by must be one of {', '.join(DEADLINE_LIMITS)}")
    return str(value)


class Phase(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class Reason(StrEnum):
    """Why a run ended. Persisted; the status is derived from it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    BOOT_TIMEOUT = "boot_timeout"
    NODE_LOST = "node_lost"
    REJECTED = "rejected"
    #: A node's agent ended it: every GPU sat idle past the run's `gpu_idle` policy.
    GPU_IDLE = "gpu_idle"
    #: A node's agent ended it on a host-maintenance notice (`instance/maintenance-event`).
    MAINTENANCE = "maintenance"
    #: A node's agent ended it on a Spot preemption notice (`instance/preempted`).
    PREEMPTED = "preempted"
    #: The stack's Cloud Billing budget passed its threshold: every VM stopped (the hold).
    BUDGET_EXCEEDED = "budget_exceeded"


class Status(StrEnum):
    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


STATUS_OF_REASON: dict[Reason, Status] = {
    Reason.SUCCEEDED: Status.SUCCEEDED,
    Reason.FAILED: Status.FAILED,
    Reason.CANCELLED: Status.CANCELLED,
    Reason.TIMED_OUT: Status.FAILED,
    Reason.BOOT_TIMEOUT: Status.FAILED,
    Reason.NODE_LOST: Status.FAILED,
    Reason.REJECTED: Status.REJECTED,
    Reason.GPU_IDLE: Status.FAILED,
    Reason.MAINTENANCE: Status.FAILED,
    Reason.PREEMPTED: Status.FAILED,
    Reason.BUDGET_EXCEEDED: Status.FAILED,
}
STATUS_OF_PHASE = {
    Phase.QUEUED: Status.QUEUED,
    Phase.STARTING: Status.STARTING,
    Phase.RUNNING: Status.RUNNING,
}
RESTARTABLE = frozenset({Reason.NODE_LOST, Reason.BOOT_TIMEOUT, Reason.MAINTENANCE,
                         Reason.PREEMPTED})
#: The reasons a node's own done marker may give (`NodeMarker.end_reason`, docs/agent.md).
NODE_END_REASONS = frozenset(Reason(r) for r in MARKER_END_REASONS)


class NodePhase(StrEnum):
    PENDING = "pending"
    BOOTED = "booted"
    DONE = "done"


@dataclass(frozen=True)
class NodeState:
    name: str
    phase: NodePhase = NodePhase.PENDING
    booted_at: datetime | None = None
    done_at: datetime | None = None
    exit_code: int | None = None
    signal: str | None = None
    duration_s: float | None = None
    #: Why the node's agent ended it (a `NODE_END_REASONS` value), from its done marker.
    end_reason: str | None = None

    @property
    def failed(self) -> bool:
        return self.phase is NodePhase.DONE and (self.exit_code != 0 or self.signal is not None
                                                 or self.end_reason is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": self.phase.value,
            "booted_at": opt_iso(self.booted_at),
            "done_at": opt_iso(self.done_at),
            "exit_code": self.exit_code,
            "signal": self.signal,
            "duration_s": self.duration_s,
            **({"end_reason": self.end_reason} if self.end_reason else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeState:
        return cls(
            name=d["name"],
            phase=NodePhase(d["phase"]),
            booted_at=opt_time(d.get("booted_at"), "booted_at"),
            done_at=opt_time(d.get("done_at"), "done_at"),
            exit_code=d.get("exit_code"),
            signal=d.get("signal"),
            duration_s=d.get("duration_s"),
            end_reason=d.get("end_reason"),
        )


@dataclass(frozen=True)
class HistoryEntry:
    at: datetime
    change: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"at": iso(self.at), "change": self.change, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HistoryEntry:
        return cls(parse_time(d["at"], "history.at"), d["change"], d["reason"])


@dataclass(frozen=True)
class Run:
    """One accepted request and, once started, its current attempt."""

    request: StartRequest
    phase: Phase
    accepted_at: datetime
    attempt: int = 1
    started_at: datetime | None = None
    ended_at: datetime | None = None
    deadline: datetime | None = None
    nodes: tuple[NodeState, ...] = ()
    reason: Reason | None = None
    detail: str = ""
    keep_alive_until: datetime | None = None
    cost_usd: float | None = None
    history: tuple[HistoryEntry, ...] = ()
    #: The run's secret (drawn when the request was accepted); its nodes get it.
    secret: str = field(default="", repr=False)
    #: The run's dollar cap (its request's, else the stack's default when it was accepted),
    #: shared by every attempt: `cost_usd` carries the spend of the attempts before.
    max_cost_usd: float | None = None
    #: Which limit set the current attempt's deadline: "max_hours" or "max_cost_usd".
    deadline_by: str | None = None
    #: The OCI image the run's nodes pull, pinned: REGISTRY/REPO@sha256:HEX ("" for none),
    #: resolved once when the request was accepted, so every node and attempt runs it.
    image: str = ""

    @property
    def run_id(self) -> str:
        return self.request.run_id

    @property
    def status(self) -> Status:
        if self.reason is not None:
            return STATUS_OF_REASON[self.reason]
        return STATUS_OF_PHASE[self.phase]

    def node(self, name: str) -> NodeState | None:
        return next((n for n in self.nodes if n.name == name), None)

    def with_node(self, node: NodeState) -> Run:
        return replace(self, nodes=tuple(node if n.name == node.name else n for n in self.nodes))

    def log(self, at: datetime, change: str, reason: str) -> Run:
        return replace(self, history=(*self.history, HistoryEntry(at, change, reason)))

    def entered(self, at: datetime, reason: str) -> Run:
        """A new run's first history entry: `-> <status>` (queued, or rejected)."""
        return self.log(at, f"-> {self.status.value}", reason)

    def moved(self, at: datetime, to: Phase, why: str, /, **changes: Any) -> Run:
        """The one way a run changes phase: apply `changes`, set `to`, log `from -> to`."""
        moved = replace(self, phase=to, **changes)
        return moved.log(at, f"{self.phase.value} -> {to.value}", why)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status.value,
            "request": self.request.to_dict(),
            "phase": self.phase.value,
            "attempt": self.attempt,
            "accepted_at": iso(self.accepted_at),
            "started_at": opt_iso(self.started_at),
            "ended_at": opt_iso(self.ended_at),
            "deadline": opt_iso(self.deadline),
            "nodes": [n.to_dict() for n in self.nodes],
            "reason": None if self.reason is None else self.reason.value,
            "detail": self.detail,
            "keep_alive_until": opt_iso(self.keep_alive_until),
            "cost_usd": self.cost_usd,
            "history": [h.to_dict() for h in self.history],
            **({"secret": self.secret} if self.secret else {}),
            **({"max_cost_usd": self.max_cost_usd} if self.max_cost_usd is not None else {}),
            **({"deadline_by": self.deadline_by} if self.deadline_by is not None else {}),
            **({"image": self.image} if self.image else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        return cls(
            request=StartRequest.from_dict(_object(d["request"], "request")),
            phase=Phase(d["phase"]),
            attempt=int(d.get("attempt", 1)),
            accepted_at=parse_time(d["accepted_at"], "accepted_at"),
            started_at=opt_time(d.get("started_at"), "started_at"),
            ended_at=opt_time(d.get("ended_at"), "ended_at"),
            deadline=opt_time(d.get("deadline"), "deadline"),
            nodes=tuple(NodeState.from_dict(n) for n in d.get("nodes", [])),
            reason=None if d.get("reason") is None else Reason(d["reason"]),
            detail=d.get("detail", ""),
            keep_alive_until=opt_time(d.get("keep_alive_until"), "keep_alive_until"),
            cost_usd=d.get("cost_usd"),
            history=tuple(HistoryEntry.from_dict(h) for h in d.get("history", [])),
            secret=validate_secret(d.get("secret"), "run record"),
            max_cost_usd=positive_usd(d.get("max_cost_usd"), "run record: max_cost_usd"),
            deadline_by=_deadline_by(d.get("deadline_by")),
            image=pinned_image(d.get("image"), "run record"),
        )

    def to_json(self) -> bytes:
        return dump(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> Run:
        try:
            return cls.from_dict(_object(decode_json(data, "run record", limit=None),
                                         "run record"))
        except RecursionError:
            raise CorruptState("run record cannot be read: nested too deeply") from None
        except Exception as e:  # noqa: BLE001 - a stored document is untrusted input too
            raise CorruptState(f"run record cannot be read: {_why(e)}") from None


@dataclass(frozen=True)
class RecentRun:
    """A compact line for an ended run: enough for dedupe, `pcp runs` and late events."""

    run_id: str
    reason: Reason
    detail: str
    ended_at: datetime
    started_at: datetime | None = None
    cost_usd: float | None = None

    @property
    def status(self) -> Status:
        return STATUS_OF_REASON[self.reason]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status.value,
            "reason": self.reason.value,
            "detail": self.detail,
            "started_at": opt_iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecentRun:
        return cls(
            run_id=d["run_id"],
            reason=Reason(d["reason"]),
            detail=d.get("detail", ""),
            ended_at=parse_time(d["ended_at"], "ended_at"),
            started_at=opt_time(d.get("started_at"), "started_at"),
            cost_usd=d.get("cost_usd"),
        )

    @classmethod
    def of(cls, run: Run) -> RecentRun:
        assert run.reason is not None and run.ended_at is not None
        return cls(run.run_id, run.reason, run.detail, run.ended_at, run.started_at, run.cost_usd)


@dataclass(frozen=True)
class Lease:
    """VMs kept running after a keep_vm_alive run, until `until` (never forever)."""

    run_id: str
    vms: tuple[str, ...]
    until: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "vms": list(self.vms), "until": iso(self.until)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lease:
        return cls(d["run_id"], tuple(d["vms"]), parse_time(d["until"], "lease.until"))


@dataclass(frozen=True)
class BudgetHold:
    """The stack's Cloud Billing budget passed its threshold: no VM runs and no run starts
    until a person lifts the hold (`pcp budget resume`)."""

    since: datetime
    budget_id: str
    cost_amount: float
    budget_amount: float
    currency_code: str
    period: datetime  # the costIntervalStart of the notification that tripped it

    def to_dict(self) -> dict[str, Any]:
        return {"since": iso(self.since), "budget_id": self.budget_id,
                "cost_amount": self.cost_amount, "budget_amount": self.budget_amount,
                "currency_code": self.currency_code, "period": iso(self.period)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetHold:
        return cls(parse_time(d["since"], "budget.hold.since"), str(d["budget_id"]),
                   float(d["cost_amount"]), float(d["budget_amount"]),
                   str(d["currency_code"]), parse_time(d["period"], "budget.hold.period"))

    @property
    def text(self) -> str:
        return (f"spend {self.cost_amount:.2f} {self.currency_code} of the "
                f"{self.budget_amount:.2f} {self.currency_code} budget (period from "
                f"{self.period:%Y-%m-%d})")


@dataclass(frozen=True)
class BudgetState:
    """The budget kill switch: the hold, the newest budget period a notification named (an
    older one is stale), and the period a person lifted a hold for (no re-trip within it)."""

    hold: BudgetHold | None = None
    period: datetime | None = None
    lifted: datetime | None = None
    lifted_at: datetime | None = None
    lifted_by: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"hold": None if self.hold is None else self.hold.to_dict(),
                "period": opt_iso(self.period), "lifted": opt_iso(self.lifted),
                "lifted_at": opt_iso(self.lifted_at), "lifted_by": self.lifted_by}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetState:
        hold = d.get("hold")
        by = d.get("lifted_by")
        return cls(None if hold is None else BudgetHold.from_dict(_object(hold, "budget.hold")),
                   opt_time(d.get("period"), "budget.period"),
                   opt_time(d.get("lifted"), "budget.lifted"),
                   opt_time(d.get("lifted_at"), "budget.lifted_at"),
                   None if by is None else str(by))


@dataclass(frozen=True)
class StackState:
    """control/stack.json: the active run, the FIFO queue, the keep-alive lease, recent ends,
    and ended runs until the sweeper has seen their records written."""

    active: Run | None = None
    queue: tuple[Run, ...] = ()
    lease: Lease | None = None
    recent: tuple[RecentRun, ...] = ()
    unarchived: tuple[Run, ...] = ()  # ended runs whose record is not yet known to be written
    budget: BudgetState = BudgetState()

    def find(self, run_id: str) -> Run | RecentRun | None:
        if self.active is not None and self.active.run_id == run_id:
            return self.active
        for run in self.queue:
            if run.run_id == run_id:
                return run
        for line in self.recent:
            if line.run_id == run_id:
                return line
        return None

    def queue_position(self, run_id: str) -> int | None:
        for i, run in enumerate(self.queue):
            if run.run_id == run_id:
                return i + 1
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "active": None if self.active is None else self.active.to_dict(),
            "queue": [r.to_dict() for r in self.queue],
            "lease": None if self.lease is None else self.lease.to_dict(),
            "recent": [r.to_dict() for r in self.recent],
            "unarchived": [r.to_dict() for r in self.unarchived],
            **({"budget": self.budget.to_dict()} if self.budget != BudgetState() else {}),
        }

    def to_json(self) -> bytes:
        return dump(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes) -> StackState:
        try:
            d = decode_json(data, "control/stack.json", limit=None)
            if not isinstance(d, dict) or d.get("schema") != SCHEMA:
                found = d.get("schema") if isinstance(d, dict) else d
                raise ValueError(f"unknown schema {found!r}")
            return cls(
                active=None if d.get("active") is None else Run.from_dict(d["active"]),
                queue=tuple(Run.from_dict(r) for r in d.get("queue", [])),
                lease=None if d.get("lease") is None else Lease.from_dict(d["lease"]),
                recent=tuple(RecentRun.from_dict(r) for r in d.get("recent", [])),
                unarchived=tuple(Run.from_dict(r) for r in d.get("unarchived", [])),
                budget=BudgetState() if d.get("budget") is None else BudgetState.from_dict(
                    _object(d["budget"], "budget")),
            )
        except RecursionError:
            raise CorruptState("control/stack.json cannot be read: nested too deeply") from None
        except Exception as e:  # noqa: BLE001 - the sweeper must survive any document
            raise CorruptState(f"control/stack.json cannot be read: {_why(e)}") from None
