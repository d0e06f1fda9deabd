"""Log-based metrics: counters over the control plane's structured log lines, per stack.

Each metric's filter names only fields the code really logs (the stable fields of
docs/architecture.md, "Log lines and metrics"); tests/infra/test_monitoring.py emits those
lines from the real code and matches them against these filters. The filters use a small
subset of the Logging query language: comparisons `FIELD = "string"`, `FIELD = true`,
`FIELD > number`, `FIELD >= number`, and `textPayload : "substring"`, joined by `AND`,
nothing else. One metric (`deadman-power-offs`) reads the workers' serial console
(`serialconsole.googleapis.com/serial_port_1_output`, `textPayload`), the others the
functions' JSON lines (`jsonPayload`).

A dashboard per stack (`StackDashboard`) charts these counters and the workers' uptime.
Alert policies (`Alerts`) page the notification channel of `pcp:alert_email` or
`pcp:alert_pubsub_topic`; each says in its documentation what it means and the first command
to run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_gcp as gcp

from pcp.core.heals import Heal
from pcp.core.names import DEAD_MAN_CONSOLE_TAG as CONSOLE_TAG
from pcp.core.names import LABEL_ROLE, LABEL_STACK, Names

from .base import PcpComponent
from .config import StackConfig

#: The log Compute Engine writes a VM's serial port 1 to (with `serial-port-logging-enable`).
SERIAL_LOG = "serialconsole.googleapis.com%2Fserial_port_1_output"


@dataclass(frozen=True)
class LogMetric:
    """One counter: `what` names it (pcp-S-<what>); labels map to their field in the line.

    `serial`: the metric reads the workers' serial console lines (`textPayload`, the label
    values by `REGEXP_EXTRACT` of `key=value`), not the functions' JSON lines."""

    what: str
    description: str
    conditions: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)
    serial: bool = False

    def filter(self, stack: str, project: str) -> str:
        if self.serial:
            return " AND ".join((f'logName="projects/{project}/logs/{SERIAL_LOG}"',
                                 'resource.type="gce_instance"',
                                 f'textPayload:"{CONSOLE_TAG} stack={stack} "',
                                 *self.conditions))
        return " AND ".join((f'jsonPayload.stack="{stack}"', *self.conditions))

    def extractor(self, path: str) -> str:
        if self.serial:
            return f'REGEXP_EXTRACT(textPayload, "{path}=([^ ]+)")'
        return f"EXTRACT(jsonPayload.{path})"

    def label_doc(self, path: str) -> str:
        return f"{path}= in the serial line" if self.serial else f"jsonPayload.{path}"


LOG_METRICS: tuple[LogMetric, ...] = (
    LogMetric("sweeps", "Sweeps that decided (the sweeper ran); an absence pages",
              ('jsonPayload.event="sweep"', "jsonPayload.conflicts>=0")),
    LogMetric("runs-ended", "Runs ended, by status and reason (and the event that ended them)",
              ("jsonPayload.ended>0",),
              {"status": "end_status", "reason": "end_reason", "event": "event"}),
    *(LogMetric(f"heal-{h.value.replace('_', '-')}",
                f"Sweeps that healed: {h.value}",
                ('jsonPayload.event="sweep"', f"jsonPayload.heals.{h.value}>0"))
      for h in Heal),
    LogMetric("hard-cap-stops", "Sweeps that saw a worker VM stopped by GCE's run-duration cap "
              "(maxRunDuration) within the last interval",
              ('jsonPayload.event="sweep"', "jsonPayload.hard_cap_stops>0")),
    LogMetric("deadman-power-offs", "Worker agents that powered their VM off (dead-man switch), "
              "from the serial console line the agent writes before powering off",
              (), {"node": "node"}, serial=True),
    LogMetric("storage-429s", "Cloud Storage 429 rateLimitExceeded on an object write, each "
              "retried by the client library", ("jsonPayload.throttled=true",)),
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
                filter=m.filter(cfg.stack, cfg.project),
                metric_descriptor=gcp.logging.MetricMetricDescriptorArgs(
                    metric_kind="DELTA",
                    value_type="INT64",
                    unit="1",
                    labels=[gcp.logging.MetricMetricDescriptorLabelArgs(
                        key=key, value_type="STRING", description=m.label_doc(path))
                        for key, path in m.labels.items()],
                ),
                label_extractors={key: m.extractor(path) for key, path in m.labels.items()},
                opts=self.child_opts(),
            )
        self.register_outputs({"metrics": {k: v.name for k, v in self.metrics.items()}})

    @property
    def metric_names(self) -> pulumi.Output[dict[str, str]]:
        return pulumi.Output.all(**{k: v.name for k, v in self.metrics.items()})


def user_metric(names: Names, what: str) -> str:
    return f'metric.type="logging.googleapis.com/user/{names.log_metric(what)}"'


@dataclass(frozen=True)
class Alert:
    """One alert policy: a threshold (> `above`), with `denominator` a ratio of two series
    (the filter's over the denominator's, summed per `group_by`), or with `absent_s` an
    absence condition."""

    what: str
    title: str
    filter: str
    meaning: str
    first_command: str
    above: float = 0
    window_s: int = 300
    absent_s: int | None = None
    denominator: str | None = None
    group_by: tuple[str, ...] = ()


#: Cloud Run's request counter: a Cloud Functions (2nd gen) function is served by the Cloud
#: Run service of the same name, and an invocation that raises answers 500 (the trigger then
#: redelivers), so `response_code_class="5xx"` over all requests is its error rate.
REQUEST_COUNT = "run.googleapis.com/request_count"
#: Above this share of failed requests in the window, the function-errors policy fires.
ERROR_RATE = 0.2


def function_requests(cfg: StackConfig) -> str:
    """The filter of every request to this stack's functions (Cloud Run revisions)."""
    from .functions import BUDGET_FUNCTIONS, FUNCTIONS

    names = Names(cfg.stack, cfg.project)
    specs = (*FUNCTIONS, *(BUDGET_FUNCTIONS if cfg.budget_enabled else ()))
    services = ", ".join(f'"{names.function(spec.kind)}"' for spec in specs)
    return (f'metric.type="{REQUEST_COUNT}" AND resource.type="cloud_run_revision" AND '
            f"resource.label.service_name=one_of({services})")


def alerts(cfg: StackConfig) -> tuple[Alert, ...]:
    names = Names(cfg.stack, cfg.project)
    s = cfg.stack
    interval_s = cfg.sweep_interval_minutes * 60
    return (
        Alert("orphan-vm", "a worker VM was running with no run or lease",
              user_metric(names, "heal-orphans-stopped"),
              "A sweep found a worker VM RUNNING that no run or keep-alive lease holds (for up "
              "to one sweep interval) and stopped it: a stop was lost, or someone started it.",
              f"pcp events --stack {s} --kind orphans_stopped"),
        Alert("guard-fired", "a guard below the event path stopped a worker",
              user_metric(names, "deadman-power-offs"),
              "A worker's dead-man switch powered it off: expected after every run without "
              "keep_vm_alive; outside that, the control plane did not stop it in time. "
              "Counted from the serial console (serial-port-logging-enable; an organization "
              "policy compute.disableSerialPortLogging turns it off and the metric stays 0).",
              f"pcp events --stack {s} --kind dead_man_power_off"),
        Alert("deadline-enforced", "the sweeper ended a run at its deadline",
              user_metric(names, "heal-deadline-enforced"),
              "A run timed out (max_hours) or its nodes never booted (boot_timeout): the "
              "sweeper ended it and stopped its VMs.",
              f"pcp events --stack {s} --kind deadline_enforced"),
        Alert("hard-cap", "GCE's run-duration cap stopped a worker",
              user_metric(names, "hard-cap-stops"),
              "Compute Engine's maxRunDuration stopped a worker VM: the run's deadline passed "
              "and neither the control plane nor the node's dead-man switch stopped it within "
              "the margin. The guard below both had to act.",
              f"pcp events --stack {s} --kind hard_cap_stop"),
        Alert("function-errors", "a control-plane function's error rate is high",
              f'{function_requests(cfg)} AND metric.label.response_code_class="5xx"',
              f"More than {ERROR_RATE:.0%} of one function's invocations failed (HTTP 5xx) "
              "over 10 minutes: Cloud Storage, Compute Engine or Pub/Sub is failing, or a "
              "bug raises on every delivery (the trigger redelivers each).",
              f"pcp doctor --stack {s}", above=ERROR_RATE, window_s=600,
              denominator=function_requests(cfg),
              group_by=("resource.label.service_name",)),
        Alert("function-retries", "a control-plane function keeps being retried",
              user_metric(names, "function-retries"),
              "A function failed transiently (its trigger redelivers the event) more than "
              "3 times in 10 minutes.",
              f"pcp doctor --stack {s}", above=3, window_s=600),
        Alert("dead-letter", "events are waiting in the dead-letter subscription",
              'resource.type="pubsub_subscription" AND resource.label.subscription_id='
              f'"{names.dead_letter_subscription}" AND metric.type='
              '"pubsub.googleapis.com/subscription/num_undelivered_messages"',
              "Events that failed every delivery attempt were parked: the control plane "
              "never acted on them.",
              f"gcloud pubsub subscriptions pull {names.dead_letter_subscription} "
              f"--project {cfg.project} --limit 10"),
        Alert("sweeper-silent", "the sweeper has not run for three intervals",
              user_metric(names, "sweeps"),
              f"No sweep decided for {3 * cfg.sweep_interval_minutes} minutes: the safety net "
              "(orphan stops, deadlines, lost markers) is down.",
              f"pcp doctor --stack {s}", absent_s=3 * interval_s),
    )


def notification_agent(project_number: str) -> str:
    """Cloud Monitoring's notification service agent of a project, as an IAM member."""
    return (f"serviceAccount:service-{project_number}"
            "@gcp-sa-monitoring-notification.iam.gserviceaccount.com")


def _channel_args(cfg: StackConfig) -> list[tuple[str, str, dict[str, str]]]:
    out = []
    if cfg.alert_email:
        out.append(("email", "email", {"email_address": cfg.alert_email}))
    if cfg.alert_pubsub_topic:
        out.append(("pubsub", "pubsub", {"topic": cfg.alert_pubsub_topic}))
    return out


class Alerts(PcpComponent):
    TYPE = "pcp:infra:Alerts"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        metrics: LogMetrics,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        self.channels = [
            gcp.monitoring.NotificationChannel(
                f"{names.prefix}-alerts-{key}",
                project=cfg.project,
                type=kind,
                display_name=f"pcp {cfg.stack} alerts ({key})",
                labels=labels,
                opts=self.child_opts(),
            )
            for key, kind, labels in _channel_args(cfg)
        ]
        # A Pub/Sub channel publishes as Cloud Monitoring's notification service agent, which
        # needs roles/pubsub.publisher on the topic (it exists once the project used alerting).
        self.publisher_grant: gcp.pubsub.TopicIAMMember | None = None
        if cfg.alert_pubsub_topic:
            project = gcp.organizations.get_project_output(project_id=cfg.project)
            self.publisher_grant = gcp.pubsub.TopicIAMMember(
                f"{names.prefix}-alerts-pubsub-publisher",
                topic=cfg.alert_pubsub_topic,  # projects/P/topics/T: may be another project
                role="roles/pubsub.publisher",
                member=project.number.apply(notification_agent),
                opts=self.child_opts(),
            )
        metric_deps: list[pulumi.Resource] = list(metrics.metrics.values())
        if self.publisher_grant is not None:
            metric_deps.append(self.publisher_grant)
        self.policies: dict[str, gcp.monitoring.AlertPolicy] = {}
        for a in alerts(cfg):
            aggregation = gcp.monitoring.AlertPolicyConditionConditionThresholdAggregationArgs(
                alignment_period=f"{a.window_s}s", per_series_aligner="ALIGN_SUM",
                cross_series_reducer="REDUCE_SUM", group_by_fields=list(a.group_by) or None)
            if a.absent_s is not None:
                condition = gcp.monitoring.AlertPolicyConditionArgs(
                    display_name=a.title,
                    condition_absent=gcp.monitoring.AlertPolicyConditionConditionAbsentArgs(
                        filter=a.filter, duration=f"{a.absent_s}s",
                        aggregations=[
                            gcp.monitoring.AlertPolicyConditionConditionAbsentAggregationArgs(
                                alignment_period="60s", per_series_aligner="ALIGN_SUM",
                                cross_series_reducer="REDUCE_SUM")]))
            else:
                condition = gcp.monitoring.AlertPolicyConditionArgs(
                    display_name=a.title,
                    condition_threshold=gcp.monitoring.AlertPolicyConditionConditionThresholdArgs(
                        filter=a.filter, comparison="COMPARISON_GT", threshold_value=a.above,
                        duration="0s", aggregations=[aggregation],
                        denominator_filter=a.denominator,
                        denominator_aggregations=None if a.denominator is None else [
                            gcp.monitoring
                            .AlertPolicyConditionConditionThresholdDenominatorAggregationArgs(
                                alignment_period=f"{a.window_s}s",
                                per_series_aligner="ALIGN_SUM",
                                cross_series_reducer="REDUCE_SUM",
                                group_by_fields=list(a.group_by))]))
            self.policies[a.what] = gcp.monitoring.AlertPolicy(
                f"{names.prefix}-alert-{a.what}",
                project=cfg.project,
                display_name=f"pcp {cfg.stack}: {a.title}",
                combiner="OR",
                conditions=[condition],
                notification_channels=[c.name for c in self.channels],
                documentation=gcp.monitoring.AlertPolicyDocumentationArgs(
                    mime_type="text/markdown",
                    subject=f"pcp {cfg.stack}: {a.title}",
                    content=f"{a.meaning}\n\nFirst command to run:\n\n    {a.first_command}\n"),
                opts=self.child_opts(*metric_deps),
            )
        self.register_outputs({"policies": {k: v.name for k, v in self.policies.items()}})

    @property
    def policy_names(self) -> pulumi.Output[dict[str, str]]:
        return pulumi.Output.all(**{k: v.name for k, v in self.policies.items()})


def _series(filter_text: str, group_by: tuple[str, ...] = (), aligner: str = "ALIGN_SUM",
            period_s: int = 300) -> dict[str, Any]:
    return {"timeSeriesQuery": {"timeSeriesFilter": {
        "filter": filter_text,
        "aggregation": {"alignmentPeriod": f"{period_s}s", "perSeriesAligner": aligner,
                        "crossSeriesReducer": "REDUCE_SUM", "groupByFields": list(group_by)},
    }}, "plotType": "STACKED_BAR" if aligner == "ALIGN_SUM" else "STACKED_AREA"}


def _chart(title: str, *data_sets: dict[str, Any]) -> dict[str, Any]:
    return {"title": title, "xyChart": {"dataSets": list(data_sets)}}


def dashboard(cfg: StackConfig) -> dict[str, Any]:
    """The stack's Cloud Monitoring dashboard (projects.dashboards JSON)."""
    names = Names(cfg.stack, cfg.project)
    workers = ('metric.type="compute.googleapis.com/instance/uptime" AND '
               'resource.type="gce_instance" AND '
               f'metadata.user_labels."{LABEL_STACK}"="{cfg.stack}" AND '
               f'metadata.user_labels."{LABEL_ROLE}"="worker"')
    return {
        "displayName": f"pcp {cfg.stack}",
        "gridLayout": {"columns": "2", "widgets": [
            _chart("Runs ended, by status and reason",
                   _series(user_metric(names, "runs-ended"),
                           ("metric.label.status", "metric.label.reason"))),
            _chart("Worker VM time: VMs up, by VM (the area is GPU time)",
                   _series(workers, ("metadata.system_labels.name",), "ALIGN_RATE", 60)),
            _chart("Heals by kind (sweeps that healed)",
                   *(_series(user_metric(names, f"heal-{h.value.replace('_', '-')}"))
                     for h in Heal)),
            _chart("Function retries, by event and error",
                   _series(user_metric(names, "function-retries"),
                           ("metric.label.event", "metric.label.error_type"))),
            _chart("Function errors: failed requests (5xx), by function",
                   _series(f'{function_requests(cfg)} AND '
                           'metric.label.response_code_class="5xx"',
                           ("resource.label.service_name",))),
            _chart("Idle fleet: orphan stops, dead-man power-offs and hard-cap stops",
                   _series(user_metric(names, "heal-orphans-stopped")),
                   _series(user_metric(names, "deadman-power-offs")),
                   _series(user_metric(names, "hard-cap-stops"))),
            _chart("Rejected inputs, lost compare-and-swap races and storage 429s",
                   _series(user_metric(names, "rejected"), ("metric.label.event",)),
                   _series(user_metric(names, "cas-conflicts"), ("metric.label.event",)),
                   _series(user_metric(names, "storage-429s"))),
            _chart("Sweeps", _series(user_metric(names, "sweeps"))),
        ]},
    }


class StackDashboard(PcpComponent):
    TYPE = "pcp:infra:StackDashboard"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        metrics: LogMetrics,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        self.dashboard = gcp.monitoring.Dashboard(
            f"{names.prefix}-dashboard",
            project=cfg.project,
            dashboard_json=json.dumps(dashboard(cfg), sort_keys=True),
            opts=self.child_opts(*metrics.metrics.values()),
        )
        self.register_outputs({"dashboard": self.dashboard.id})
