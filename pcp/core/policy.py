"""A stack's fixed settings, as the lifecycle needs them, and the cost estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from pcp.core.errors import PermanentError
from pcp.core.messages import GpuIdle, check_fields, decode_json, dump, untrusted
from pcp.core.names import STACK_RE, STACK_SIZES, Names, node_names

__all__ = ["STACK_SIZES", "Policy", "RunLimit"]

#: What control/policy.json holds: the fields a run's deadline and cost depend on.
POLICY_DOC_FIELDS = ("stack", "worker_count", "max_run_hours", "worker_hourly_usd",
                     "shepherd_hourly_usd", "max_cost_usd", "sweep_interval_minutes")


@dataclass(frozen=True)
class RunLimit:
    """An attempt's deadline, which limit set it (`max_hours` or `max_cost_usd`), and its
    length in hours."""

    deadline: datetime
    by: str
    hours: float


@dataclass(frozen=True)
class Policy:
    """Per-stack limits and names. Defaults answer the seed's open questions."""

    stack: str
    worker_count: int
    shepherd_host: str = "shepherd.invalid"
    tcp_port: int = 9000
    max_run_hours: float = 6.0
    boot_timeout_minutes: float = 15.0
    keep_alive_hours: float = 2.0
    sweep_interval_minutes: float = 5.0
    default_binary: str | None = None
    #: The OCI image of a run whose request names neither binary nor image (PCP_IMAGE,
    #: `pcp:image`); with `default_binary` too, the shepherd runs the binary.
    default_image: str | None = None
    #: The rank layout of a run whose request names none (docs/agent.md, "Rank layouts").
    default_layout: str = "all-nodes"
    #: The wandb project and entity of a run whose request names none (`pcp:wandb_project`,
    #: `pcp:wandb_entity`); no project: no wandb.
    default_wandb_project: str | None = None
    default_wandb_entity: str | None = None
    worker_hourly_usd: float = 0.0
    shepherd_hourly_usd: float = 0.0
    #: A VM that has never been given a run and was created less than this long ago is still
    #: in its first boot (created RUNNING by `pulumi up`, installing Nix and the agent): the
    #: sweeper leaves it alone, since an interrupted first bootstrap may not resume cleanly.
    #: The first boot powers the VM off itself when it finishes with no run waiting.
    first_boot_grace_minutes: float = 30.0
    #: The stack's default dollar cap of a run that names none (pcp:max_cost_usd); None: none.
    max_cost_usd: float | None = None
    #: The stack's Cloud Billing budget (pcp:billing_account, pcp:monthly_budget_usd): the id
    #: its notifications carry, and the fraction of the budget at which the switch trips.
    budget_id: str | None = None
    billing_account: str | None = None
    budget_stop_threshold: float = 1.0
    max_queue: int = 50
    recent_limit: int = 200
    #: The GPU-idle policy of a run whose request sets none (`PCP_GPU_IDLE`); None: no watchdog.
    default_gpu_idle: GpuIdle | None = None

    @property
    def names(self) -> Names:
        return Names(self.stack)

    def vm_name(self, index: int) -> str:
        return self.names.worker_vm(index)

    @property
    def worker_vms(self) -> tuple[str, ...]:
        return tuple(self.vm_name(i) for i in range(self.worker_count))

    @property
    def node_names(self) -> tuple[str, ...]:
        return node_names(self.worker_count)

    def vm_of(self, node: str) -> str | None:
        """The VM a node runs on; the shepherd is not a VM of ours."""
        return self.names.vm_of(node)

    def node_of_vm(self, vm: str) -> str | None:
        return self.names.node_of_vm(vm)

    @property
    def boot_timeout(self) -> timedelta:
        return timedelta(minutes=self.boot_timeout_minutes)

    @property
    def sweep_interval(self) -> timedelta:
        return timedelta(minutes=self.sweep_interval_minutes)

    @property
    def hard_cap_margin_seconds(self) -> float:
        """How long past its run's deadline GCE's maxRunDuration lets a VM run.

        Half a sweep interval: the hard cap alone keeps invariant 5 (no VM past its deadline
        plus one sweep interval) even when every function fails.
        """
        return max(30.0, self.sweep_interval_minutes * 30.0)

    def run_hours(self, requested: float | None) -> float:
        """The run's length: the request's max_hours, capped by the stack's max_run_hours."""
        if requested is None:
            return self.max_run_hours
        return min(requested, self.max_run_hours)

    @property
    def hourly_usd(self) -> float:
        """What the stack's nodes cost per hour while a run holds them."""
        return self.worker_count * self.worker_hourly_usd + self.shepherd_hourly_usd

    def run_cap(self, requested: float | None) -> float | None:
        """A run's dollar cap: its own, else the stack's default, else none."""
        return requested if requested is not None else self.max_cost_usd

    def run_limit(self, now: datetime, requested_hours: float | None, cap_usd: float | None,
                  spent_usd: float = 0.0) -> RunLimit:
        """The deadline of an attempt starting `now`: the earlier of max_hours and the time at
        which the nodes, at the stack's hourly prices, bring the run's spend (`spent_usd` over
        its earlier attempts) to its cap. Floored to whole milliseconds, as documents store
        times, so the cost at the stored deadline never exceeds the cap."""
        hours = self.run_hours(requested_hours)
        by = "max_hours"
        if cap_usd is not None and self.hourly_usd > 0:
            cap_hours = max(cap_usd - spent_usd, 0.0) / self.hourly_usd
            if cap_hours < hours:
                hours, by = cap_hours, "max_cost_usd"
        span = timedelta(milliseconds=math.floor(hours * 3_600_000))
        start = now.replace(microsecond=now.microsecond // 1000 * 1000)
        return RunLimit(start + span, by, hours)

    def estimate_cost(self, started: datetime, ended: datetime) -> float:
        """Node-hours times hourly prices: every worker VM plus the shepherd host."""
        hours = max((ended - started).total_seconds(), 0.0) / 3600.0
        per_hour = self.worker_count * self.worker_hourly_usd + self.shepherd_hourly_usd
        return round(hours * per_hour, 4)

    def to_doc(self) -> bytes:
        """control/policy.json: the limits and prices `pcp run` previews a deadline with."""
        return dump({k: getattr(self, k) for k in POLICY_DOC_FIELDS})

    @classmethod
    @untrusted("control/policy.json")
    def from_doc(cls, data: bytes) -> Policy:
        what = "control/policy.json"
        obj = decode_json(data, what)
        if not isinstance(obj, dict):
            raise PermanentError(f"{what} must be a JSON object")
        check_fields(obj, POLICY_DOC_FIELDS, what)
        stack = obj.get("stack")
        if not isinstance(stack, str) or not STACK_RE.match(stack):
            raise PermanentError(f"{what}: stack {stack!r} is not a stack name")
        count = obj.get("worker_count")
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 1000:
            raise PermanentError(f"{what}: worker_count must be a whole number >= 1")
        numbers: dict[str, float] = {}
        for key in ("max_run_hours", "worker_hourly_usd", "shepherd_hourly_usd",
                    "sweep_interval_minutes"):
            v = obj.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1e9:
                raise PermanentError(f"{what}: {key} must be a number >= 0")
            numbers[key] = float(v)
        cap = obj.get("max_cost_usd")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or not 0 < cap < 1e9):
            raise PermanentError(f"{what}: max_cost_usd must be a positive number or null")
        return cls(stack=stack, worker_count=count,
                   max_cost_usd=None if cap is None else float(cap),
                   max_run_hours=numbers["max_run_hours"],
                   worker_hourly_usd=numbers["worker_hourly_usd"],
                   shepherd_hourly_usd=numbers["shepherd_hourly_usd"],
                   sweep_interval_minutes=numbers["sweep_interval_minutes"])
