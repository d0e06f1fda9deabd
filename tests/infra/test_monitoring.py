"""Log-based metrics under the Pulumi mocks: their filters match the lines the code really logs.

The lines are emitted by the real code (the functions' `log_outcome`, `transient` and
rejection paths over a real `Service` on the in-memory adapters, the storage adapter's 429
retry predicate, and the agent's `power_off`, whose serial-console line is written to a file
standing in for /dev/console) and captured. The filters registered with the mock engine are
then evaluated against them by `matches` below, which understands only the subset of the
Logging query language pcp's filters use: comparisons `FIELD = "string"`, `FIELD = true|false`,
`FIELD > number` and `FIELD >= number` on `jsonPayload.` paths (dotted into nested objects),
`logName = "..."` and `resource.type = "..."`, and `textPayload : "substring"`, joined by
`AND`; label extractors `EXTRACT(jsonPayload.path)` and `REGEXP_EXTRACT(textPayload, "re")`.
A function line is matched as the entry Cloud Logging makes of it (the JSON as `jsonPayload`),
a serial-console line as `textPayload` of the log `serialconsole.googleapis.com%2F
serial_port_1_output` on a `gce_instance`.
Anything else in a filter fails the test, so the subset cannot grow unnoticed.

The function error-rate policy reads Cloud Run's `request_count`, not a log: its filters are
checked by `series_matches`, the subset of the Monitoring filter language it uses
(`metric.type`, `resource.type`, `metric.label.K`, `resource.label.K` compared with `=` to a
string or to `one_of(...)`), against the series the stack's functions really produce.
"""

from __future__ import annotations

import io
import json
import re
import sys
import types
from dataclasses import replace
from typing import Any

import pytest
from google.api_core.exceptions import ServiceUnavailable, TooManyRequests

from pcp.adapters.gcs_store import GcsStore
from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.agent.deadman import power_off
from pcp.agent.log import Log
from pcp.core.heals import Heal
from pcp.core.messages import StartRequest
from pcp.edge.logline import log_outcome, transient
from pcp.edge.rejections import reject_event
from pcp.service import Service
from tests.core.helpers import at, marker, policy
from tests.infra.conftest import StackRun

METRIC = "gcp:logging/metric:Metric"
STACK = "tiny"

_COMPARISON = re.compile(
    r'^(?P<path>jsonPayload(?:\.[A-Za-z_][A-Za-z0-9_]*)+|logName|resource\.type|textPayload)'
    r'\s*(?P<op>>=|=|>|:)\s*'
    r'(?P<value>"[^"\\]*"|true|false|-?\d+(?:\.\d+)?)$')
_EXTRACT = re.compile(r"^EXTRACT\((?P<path>jsonPayload(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\)$")
_REGEXP_EXTRACT = re.compile(r'^REGEXP_EXTRACT\(textPayload, "(?P<re>[^"]+)"\)$')
SERIAL_LOG_NAME = (
    "projects/pcp-test-project/logs/serialconsole.googleapis.com%2Fserial_port_1_output")


def _root(entry: dict[str, Any]) -> dict[str, Any]:
    """A serial-console entry is a whole LogEntry; a function line is its jsonPayload."""
    return entry if "textPayload" in entry else {"jsonPayload": entry}


def _field(entry: dict[str, Any], path: str) -> Any:
    value: Any = _root(entry)
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def comparisons(filter_text: str) -> list[tuple[str, str, Any]]:
    """The filter as (path, op, value) triples; AssertionError outside the subset."""
    out = []
    for term in filter_text.split(" AND "):
        m = _COMPARISON.match(term.strip())
        assert m, f"outside the supported filter subset: {term!r} in {filter_text!r}"
        raw = m["value"]
        value: Any = (raw[1:-1] if raw.startswith('"') else raw == "true"
                      if raw in ("true", "false") else float(raw))
        assert (m["op"] == ":") == (m["path"] == "textPayload"), f"unsupported: {term!r}"
        if not m["path"].startswith("jsonPayload"):
            assert isinstance(value, str), f"unsupported: {term!r}"
        out.append((m["path"], m["op"], value))
    return out


def matches(filter_text: str, entry: dict[str, Any]) -> bool:
    for path, op, want in comparisons(filter_text):
        got = _field(entry, path)
        if op == ":":
            if not isinstance(got, str) or want not in got:
                return False
        elif op == "=":
            if isinstance(want, bool):
                if got is not want:
                    return False
            elif not isinstance(got, str) or got != want:
                return False
        elif isinstance(got, bool) or not isinstance(got, (int, float)):
            return False
        elif not (got >= want if op == ">=" else got > want):
            return False
    return True


def extract(extractor: str, entry: dict[str, Any]) -> Any:
    r = _REGEXP_EXTRACT.match(extractor)
    if r:
        found = re.search(r["re"], str(_field(entry, "textPayload") or ""))
        return found.group(1) if found else None
    m = _EXTRACT.match(extractor)
    assert m, f"outside the supported extractor subset: {extractor!r}"
    return _field(entry, m["path"])


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every kind of line the metrics count, emitted by the real code, plus ordinary ones."""
    console = tmp_path_factory.mktemp("console") / "ttyS0"
    console.write_text("")
    capture = pytest.MonkeyPatch()
    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        _emit(str(console))
    finally:
        capture.undo()
    serial = [{"logName": SERIAL_LOG_NAME, "resource": {"type": "gce_instance"},
               "textPayload": line} for line in console.read_text().splitlines()]
    return lines(buf.getvalue()) + serial


def _emit(console: str) -> None:
    settings: Any = types.SimpleNamespace(stack=STACK)
    p = policy(workers=1)
    store, fleet, bus = MemoryStore(), MemoryFleet(p.stack, p.worker_vms), MemoryBus()
    svc = Service(store, fleet, bus, p, sleep=lambda _: None)
    # An orphan: a worker VM running with no run or lease; the sweep stops it.
    vm = next(iter(fleet.vms.values()))
    vm.status = "RUNNING"
    log_outcome(settings, "sweep", svc.sweep(at(0)), None)
    # A VM GCE's maxRunDuration stopped a minute before the next sweep: that sweep says so.
    vm.capped_stop = int(at(0).timestamp()) + 4 * 60
    log_outcome(settings, "sweep", svc.sweep(at(5)), None)  # later sweeps: outside the window
    # A run that succeeds through its markers (the event path), with a lost race on the way.
    start = svc.handle(StartRequest(run_id="r1"), at(1))
    log_outcome(settings, "start", replace(start, conflicts=1), "r1")
    for node in p.node_names:
        store.put(marker("r1", node, "booted", 2).path, marker("r1", node, "booted", 2).to_json())
    for node in p.node_names:
        m = marker("r1", node, "done", 3)
        store.put(m.path, m.to_json())
        log_outcome(settings, "marker", svc.handle_marker(m.path, at(3)), "r1", object=m.path)
    # A run whose deadline passes: the sweep enforces it.
    svc.handle(StartRequest(run_id="r2", max_hours=1), at(10))
    ended = svc.sweep(at(10 + 24 * 60))
    log_outcome(settings, "sweep", ended, "r2")
    # A kept-alive run whose markers' events were lost: the sweep ends it from the markers
    # (lost_marker); a later sweep ends its lease (lease_ended).
    t = 10 + 25 * 60
    svc.handle(StartRequest(run_id="r4", keep_vm_alive=True), at(t))
    for kind in ("booted", "done"):
        for node in p.node_names:
            m = marker("r4", node, kind, t + 1)
            store.put(m.path, m.to_json())
    log_outcome(settings, "sweep", svc.sweep(at(t + 2)), "r4")
    log_outcome(settings, "sweep", svc.sweep(at(t + 2 + 60 * 3)), None)
    # A quiet sweep, an input that can never succeed, a transient failure.
    log_outcome(settings, "sweep", svc.sweep(at(t + 2 + 60 * 4)), None)
    reject_event(svc, settings, "sweep", "m-1", "not JSON", at(2000))
    with pytest.raises(RuntimeError), transient(settings, "sweep", None):
        raise RuntimeError("storage unavailable")
    # Cloud Storage answering 429 to a write: the adapter's retry predicate logs it.
    retry = GcsStore("pcp-tiny-bucket", stack=STACK)._write_retry("control/stack.json")
    assert retry._predicate(TooManyRequests("rateLimitExceeded"))
    assert retry._predicate(ServiceUnavailable("backend"))  # retried, but not a 429
    # The node agent's dead-man switch powering its VM off (`true` stands in for shutdown),
    # its line also on the serial console.
    power_off(["true"], "this node is done and the run does not keep VMs alive",
              Log(stack=STACK, run_id="r1", node="worker-0", attempt=1), console=console)
    # Another stack's power-off on a VM of the same project: not this stack's metric.
    power_off(["true"], "no current run", Log(stack=f"{STACK}-spot", node="worker-0"),
              console=console)


def metrics(run: StackRun) -> dict[str, dict[str, Any]]:
    return {r["inputs"]["name"]: r["inputs"] for r in run.of_type(METRIC)}


def test_every_metric_is_registered_for_every_stack(stack_run: StackRun) -> None:
    got = metrics(stack_run)
    prefix = stack_run.prefix
    expected = {f"{prefix}-sweeps", f"{prefix}-runs-ended", f"{prefix}-deadman-power-offs",
                f"{prefix}-rejected", f"{prefix}-hard-cap-stops", f"{prefix}-storage-429s",
                f"{prefix}-cas-conflicts", f"{prefix}-function-retries",
                *(f"{prefix}-heal-{h.value.replace('_', '-')}" for h in Heal)}
    assert set(got) == expected
    for inputs in got.values():
        assert (f'jsonPayload.stack="{stack_run.stack}"' in inputs["filter"]
                or f'textPayload:"pcp-dead-man-power-off stack={stack_run.stack} "'
                in inputs["filter"])
        descriptor = inputs["metricDescriptor"]
        assert (descriptor["metricKind"], descriptor["valueType"]) == ("DELTA", "INT64")
        keys = {label["key"] for label in descriptor.get("labels", [])}
        assert keys == set(inputs.get("labelExtractors", {}))


#: Heals this test's scenario makes; the others are named by `Heal` (the code's own enum).
MADE = {Heal.ORPHANS_STOPPED, Heal.DEADLINE_ENFORCED, Heal.LOST_MARKER, Heal.LEASE_ENDED}


def test_each_filter_matches_the_lines_the_code_logs(mock_runs: dict[str, StackRun],
                                                     emitted: list[dict[str, Any]]) -> None:
    got = metrics(mock_runs[STACK])
    assert len(emitted) >= 8
    for name, inputs in got.items():
        hits = [e for e in emitted if matches(inputs["filter"], e)]
        heal = next((h for h in Heal if name.endswith(h.value.replace("_", "-"))), None)
        if heal is not None and heal not in MADE:
            assert f"jsonPayload.heals.{heal.value}>0" in inputs["filter"]
            continue
        assert hits, f"{name}: no emitted line matches {inputs['filter']}"
        assert len(hits) < len(emitted), f"{name}: matches every line"
        for entry in hits:
            for key, extractor in inputs.get("labelExtractors", {}).items():
                assert extract(extractor, entry) not in (None, ""), (name, key, entry)


def test_what_each_metric_counts(mock_runs: dict[str, StackRun],
                                 emitted: list[dict[str, Any]]) -> None:
    got = metrics(mock_runs[STACK])

    def hits(what: str) -> list[dict[str, Any]]:
        return [e for e in emitted if matches(got[f"pcp-{STACK}-{what}"]["filter"], e)]

    assert [(e["run_id"], e["end_status"], e["end_reason"]) for e in hits("runs-ended")] == [
        ("r1", "succeeded", "succeeded"), ("r2", "failed", "timed_out"),
        ("r4", "succeeded", "succeeded")]
    assert [e["run_id"] for e in hits("heal-lost-marker")] == ["r4"]
    assert len(hits("heal-lease-ended")) == 1
    assert [e["event"] for e in hits("heal-orphans-stopped")] == ["sweep"]
    assert [e["event"] for e in hits("sweeps")] == ["sweep"] * 6  # not the failed or rejected
    assert [(e["hard_cap_stops"], e["hard_cap_vms"]) for e in hits("hard-cap-stops")] == [
        (1, ["pcp-tiny-worker-0"])]
    assert [(e["object"], e["http_status"]) for e in hits("storage-429s")] == [
        ("control/stack.json", 429)]
    assert [e["run_id"] for e in hits("heal-deadline-enforced")] == ["r2"]
    assert [e["event"] for e in hits("rejected")] == ["sweep"]
    assert [e["event"] for e in hits("cas-conflicts")] == ["start"]
    assert [(e["event"], e["error_type"]) for e in hits("function-retries")] == [
        ("sweep", "RuntimeError")]
    [serial] = hits("deadman-power-offs")
    assert serial["textPayload"].startswith(
        "pcp-dead-man-power-off stack=tiny node=worker-0 run_id=r1 attempt=1 reason=")
    extractors = got[f"pcp-{STACK}-deadman-power-offs"]["labelExtractors"]
    assert extract(extractors["node"], serial) == "worker-0"


def test_the_evaluator_rejects_what_it_does_not_understand() -> None:
    entry = {"stack": "tiny", "n": 2, "ok": True, "heals": {"a": 1}}
    assert matches('jsonPayload.stack="tiny" AND jsonPayload.n>1', entry)
    assert matches("jsonPayload.ok=true AND jsonPayload.heals.a>0", entry)
    assert matches("jsonPayload.n>=2", entry) and not matches("jsonPayload.n>=3", entry)
    assert not matches('jsonPayload.stack="small"', entry)
    assert not matches("jsonPayload.missing>0", entry)
    assert not matches('jsonPayload.n="2"', entry)
    serial = {"logName": "l", "resource": {"type": "gce_instance"}, "textPayload": "a b=c d"}
    assert matches('logName="l" AND resource.type="gce_instance" AND textPayload:"b=c "', serial)
    assert not matches('textPayload:"b=d"', serial)
    assert extract('REGEXP_EXTRACT(textPayload, "b=([^ ]+)")', serial) == "c"
    for bad in ('jsonPayload.stack:"tiny"', "jsonPayload.n>1 OR jsonPayload.ok=true",
                'severity>="ERROR"', "textPayload=\"x\"", "logName>1"):
        with pytest.raises(AssertionError):
            comparisons(bad)


POLICY = "gcp:monitoring/alertPolicy:AlertPolicy"
CHANNEL = "gcp:monitoring/notificationChannel:NotificationChannel"
USER_METRIC = re.compile(r'metric\.type="logging\.googleapis\.com/user/(?P<name>[^"]+)"')


def test_every_alert_documents_its_meaning_and_first_command(any_run: StackRun) -> None:
    policies = {r["name"]: r["inputs"] for r in any_run.of_type(POLICY)}
    prefix = any_run.prefix
    assert set(policies) == {f"{prefix}-alert-{w}" for w in (
        "orphan-vm", "guard-fired", "hard-cap", "deadline-enforced", "function-errors",
        "function-retries", "dead-letter", "sweeper-silent")}
    registered = set(metrics(any_run))
    for name, inputs in policies.items():
        doc = inputs["documentation"]
        assert doc["mimeType"] == "text/markdown"
        meaning, _, command = doc["content"].partition("\n\nFirst command to run:\n\n    ")
        assert meaning and command.strip(), name
        assert command.startswith(("pcp ", "gcloud ")), command
        assert f"--stack {any_run.stack}" in command or "--project" in command, command
        [condition] = inputs["conditions"]
        spec = condition.get("conditionThreshold") or condition["conditionAbsent"]
        for used in USER_METRIC.findall(spec["filter"]):
            assert used in registered, f"{name} watches {used}, which is not a metric"


_SERIES_TERM = re.compile(
    r'^(?P<path>metric\.type|resource\.type|(?:metric|resource)\.label\.[a-z_]+)\s*=\s*'
    r'(?:"(?P<value>[^"\\]*)"|one_of\((?P<set>"[^"\\]*"(?:,\s*"[^"\\]*")*)\))$')


def series_matches(filter_text: str, series: dict[str, str]) -> bool:
    """A Monitoring filter (the subset above) against one time series' labels, given flat as
    {"metric.type": ..., "resource.type": ..., "metric.label.K": ..., "resource.label.K": ...}."""
    for term in filter_text.split(" AND "):
        m = _SERIES_TERM.match(term.strip())
        assert m, f"outside the supported Monitoring filter subset: {term!r}"
        allowed = ({m["value"]} if m["set"] is None
                   else {v.strip()[1:-1] for v in m["set"].split(",")})
        if series.get(m["path"]) not in allowed:
            return False
    return True


FUNCTION = "gcp:cloudfunctionsv2/function:Function"


def test_the_function_error_rate_is_a_ratio_of_the_stacks_own_requests(
        any_run: StackRun) -> None:
    """5xx responses over all requests of each of the stack's functions (Cloud Run serves a
    2nd-gen function as the service of its name; an invocation that raises answers 500)."""
    inputs = any_run.one(POLICY, f"{any_run.prefix}-alert-function-errors")["inputs"]
    [condition] = inputs["conditions"]
    spec = condition["conditionThreshold"]
    assert spec["comparison"] == "COMPARISON_GT" and 0 < spec["thresholdValue"] < 1
    functions = {r["inputs"]["name"] for r in any_run.of_type(FUNCTION)}
    # start, stop, marker, sweep, and the budget function where the stack has a budget
    assert len(functions) == (5 if any_run.config.get("pcp:billing_account") else 4)

    def series(service: str, code_class: str) -> dict[str, str]:
        return {"metric.type": "run.googleapis.com/request_count",
                "resource.type": "cloud_run_revision",
                "resource.label.service_name": service,
                "metric.label.response_code_class": code_class}

    for name in functions:
        assert series_matches(spec["filter"], series(name, "5xx"))
        assert not series_matches(spec["filter"], series(name, "2xx"))
        assert series_matches(spec["denominatorFilter"], series(name, "2xx"))
        assert series_matches(spec["denominatorFilter"], series(name, "5xx"))
    for other in (f"{any_run.prefix}-spot-start", "pcp-other-start"):
        assert not series_matches(spec["denominatorFilter"], series(other, "5xx"))
    [num] = spec["aggregations"]
    [den] = spec["denominatorAggregations"]
    assert num["alignmentPeriod"] == den["alignmentPeriod"]
    assert num["groupByFields"] == den["groupByFields"] == ["resource.label.service_name"]


def test_a_transient_failure_answers_500_to_the_trigger() -> None:
    """What makes the 5xx share the error rate: the functions' framework turns the
    exception that `transient` re-raises into HTTP 500."""
    flask = pytest.importorskip("flask")
    app = flask.Flask("t")

    @app.route("/", methods=["POST"])
    def handler() -> str:
        with transient(types.SimpleNamespace(stack=STACK), "sweep", None):  # type: ignore[arg-type]
            raise RuntimeError("storage unavailable")

    assert app.test_client().post("/").status_code == 500


TOPIC_IAM = "gcp:pubsub/topicIAMMember:TopicIAMMember"


def test_the_pubsub_channel_may_publish_to_its_topic(mock_runs: dict[str, StackRun]) -> None:
    def grants(run: StackRun) -> list[dict[str, Any]]:
        return [r for r in run.of_type(TOPIC_IAM) if r["name"].endswith("-alerts-pubsub-publisher")]

    assert grants(mock_runs["tiny"]) == []
    configured = mock_runs["tiny-spot-private"]
    [grant] = grants(configured)
    assert grant["inputs"]["topic"] == "projects/pcp-test-project/topics/pcp-alerts"
    assert grant["inputs"]["role"] == "roles/pubsub.publisher"
    assert grant["inputs"]["member"] == (
        "serviceAccount:service-123456789012@gcp-sa-monitoring-notification"
        ".iam.gserviceaccount.com")
    assert any(i["token"] == "gcp:organizations/getProject:getProject"
               and i["args"].get("projectId") == "pcp-test-project"
               for i in configured.data["invokes"])


SERIAL = "serial-port-logging-enable"
INSTANCE = "gcp:compute/instance:Instance"


def test_workers_send_their_serial_console_to_cloud_logging(any_run: StackRun) -> None:
    for vm in any_run.of_type(INSTANCE):
        assert vm["inputs"]["metadata"][SERIAL] == "TRUE", vm["name"]


def test_the_sweeper_silence_alert_waits_three_intervals(any_run: StackRun) -> None:
    inputs = any_run.one(POLICY, f"{any_run.prefix}-alert-sweeper-silent")["inputs"]
    interval = int(any_run.config["pcp:sweep_interval_minutes"])
    assert inputs["conditions"][0]["conditionAbsent"]["duration"] == f"{3 * interval * 60}s"


def test_alerts_notify_the_channels_from_stack_config(mock_runs: dict[str, StackRun]) -> None:
    plain = mock_runs["tiny"]
    assert plain.of_type(CHANNEL) == []
    assert all(not p["inputs"].get("notificationChannels") for p in plain.of_type(POLICY))
    configured = mock_runs["tiny-spot-private"]
    channels = {r["inputs"]["type"]: r for r in configured.of_type(CHANNEL)}
    assert channels["email"]["inputs"]["labels"] == {"email_address": "oncall@example.org"}
    assert channels["pubsub"]["inputs"]["labels"] == {
        "topic": "projects/pcp-test-project/topics/pcp-alerts"}
    for alert in configured.of_type(POLICY):
        got = alert["inputs"]["notificationChannels"]
        assert len(got) == 2 and all(c.startswith("projects/pcp-test-project/notificationChannels/")
                                     for c in got), got


DASHBOARD = "gcp:monitoring/dashboard:Dashboard"


def test_the_dashboard_charts_registered_metrics_and_the_workers(any_run: StackRun) -> None:
    [board] = any_run.of_type(DASHBOARD)
    spec = json.loads(board["inputs"]["dashboardJson"])
    assert spec["displayName"] == f"pcp {any_run.stack}"
    widgets = spec["gridLayout"]["widgets"]
    titles = " | ".join(w["title"] for w in widgets)
    for topic in ("Runs ended", "Worker VM time", "Heals by kind", "Function retries",
                  "Idle fleet"):
        assert topic in titles, titles
    registered = set(metrics(any_run))
    used = set()
    for widget in widgets:
        for data in widget["xyChart"]["dataSets"]:
            query = data["timeSeriesQuery"]["timeSeriesFilter"]["filter"]
            used.update(USER_METRIC.findall(query))
            assert 'metric.type="' in query
    assert used and used <= registered, used - registered
    heals = next(w for w in widgets if w["title"].startswith("Heals"))
    assert len(heals["xyChart"]["dataSets"]) == len(Heal)
    workers = next(w for w in widgets if w["title"].startswith("Worker VM time"))
    query = workers["xyChart"]["dataSets"][0]["timeSeriesQuery"]["timeSeriesFilter"]["filter"]
    assert f'metadata.user_labels."pcp-stack"="{any_run.stack}"' in query
