"""Log-based metrics: counters over the control plane's structured log lines, per stack.

Each metric's filter names only fields the code really logs (the stable fields of
docs/architecture.md, "Log lines"); tests/infra/test_monitoring.py emits those lines from the
real code and matches them against these filters. The filters use a small subset of the
Logging query language: comparisons `FIELD = "string"`, `FIELD = true`, `FIELD > number`,
joined by `AND`, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp

from pcp.core.heals import Heal
from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig


@dataclass(frozen=True)
class LogMetric:
    """One counter: `what` names it (pcp-S-<what>); labels map to their field in the line."""

    what: str
    description: str
    conditions: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)

    def filter(self, stack: str) -> str:
        return " AND ".join((f'jsonPayload.stack="{stack}"', *self.conditions))


def _extract(path: str) -> str:
    return f"EXTRACT(jsonPayload.{path})"


LOG_METRICS: tuple[LogMetric, ...] = (
    LogMetric("runs-ended", "Runs ended, by status and reason (and the event that ended them)",
              ("jsonPayload.ended>0",),
              {"status": "end_status", "reason": "end_reason", "event": "event"}),
    *(LogMetric(f"heal-{h.value.replace('_', '-')}",
                f"Sweeps that healed: {h.value}",
                ('jsonPayload.event="sweep"', f"jsonPayload.heals.{h.value}>0"))
      for h in Heal),
    LogMetric("deadman-power-offs", "Worker agents that powered their VM off (dead-man switch); "
              "counted where the agent's journal reaches Cloud Logging",
              ('jsonPayload.component="agent"', 'jsonPayload.event="power_off"'),
              {"node": "node"}),
    LogMetric("rejected", "Inputs that can never succeed, acknowledged and recorded",
              ("jsonPayload.rejected=true",), {"event": "event"}),
    LogMetric("cas-conflicts", "Invocations that lost at least one compare-and-swap race on "
              "the stack document", ("jsonPayload.conflicts>0",), {"event": "event"}),
    LogMetric("function-retries", "Transient failures: the trigger redelivers the event",
              ('jsonPayload.failure="transient"',),
              {"event": "event", "error_type": "error_type"}),
)


class LogMetrics(PcpComponent):
    TYPE = "pcp:infra:LogMetrics"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        self.metrics: dict[str, gcp.logging.Metric] = {}
        for m in LOG_METRICS:
            metric_name = names.log_metric(m.what)
            self.metrics[m.what] = gcp.logging.Metric(
                metric_name,
                project=cfg.project,
                name=metric_name,
                description=m.description,
                filter=m.filter(cfg.stack),
                metric_descriptor=gcp.logging.MetricMetricDescriptorArgs(
                    metric_kind="DELTA",
                    value_type="INT64",
                    unit="1",
                    labels=[gcp.logging.MetricMetricDescriptorLabelArgs(
                        key=key, value_type="STRING", description=f"jsonPayload.{path}")
                        for key, path in m.labels.items()],
                ),
                label_extractors={key: _extract(path) for key, path in m.labels.items()},
                opts=self.child_opts(),
            )
        self.register_outputs({"metrics": {k: v.name for k, v in self.metrics.items()}})

    @property
    def metric_names(self) -> pulumi.Output[dict[str, str]]:
        return pulumi.Output.all(**{k: v.name for k, v in self.metrics.items()})
