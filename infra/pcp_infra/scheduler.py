"""Cloud Scheduler publishes a sweep tick every pcp:sweep_interval_minutes (the safety net)."""

from __future__ import annotations

import base64
import json

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import ATTR_SOURCE, ATTR_STACK, Names

from .base import PcpComponent
from .config import StackConfig
from .messaging import Messaging

TICK = {"op": "tick"}
TIME_ZONE = "Etc/UTC"


def tick_data() -> str:
    """The base64 body Cloud Scheduler publishes (`{"op":"tick"}`)."""
    return base64.b64encode(json.dumps(TICK, separators=(",", ":")).encode()).decode()


def sweep_schedule(interval_minutes: int) -> str:
    return f"*/{interval_minutes} * * * *"


class SweepSchedule(PcpComponent):
    TYPE = "pcp:infra:SweepSchedule"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        messaging: Messaging,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        self.job = gcp.cloudscheduler.Job(
            f"{names.prefix}-sweep-job",
            project=cfg.project,
            name=names.scheduler_job,
            region=cfg.region,
            description=f"pcp {cfg.stack}: sweep tick (stops orphans, expires leases, times out)",
            schedule=sweep_schedule(cfg.sweep_interval_minutes),
            time_zone=TIME_ZONE,
            pubsub_target=gcp.cloudscheduler.JobPubsubTargetArgs(
                topic_name=messaging.topics["sweep"].id,
                data=tick_data(),
                attributes={ATTR_STACK: cfg.stack, ATTR_SOURCE: "scheduler"},
            ),
            opts=self.child_opts(),
        )
        self.register_outputs({"job": self.job.name})
