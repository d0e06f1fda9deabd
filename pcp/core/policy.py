"""A stack's fixed settings, as the lifecycle needs them, and the cost estimate."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pcp.core.names import STACK_SIZES, Names, node_names

__all__ = ["STACK_SIZES", "Policy"]


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
    max_queue: int = 50
    recent_limit: int = 200

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

    def estimate_cost(self, started: datetime, ended: datetime) -> float:
        """Node-hours times hourly prices: every worker VM plus the shepherd host."""
        hours = max((ended - started).total_seconds(), 0.0) / 3600.0
        per_hour = self.worker_count * self.worker_hourly_usd + self.shepherd_hourly_usd
        return round(hours * per_hour, 4)
