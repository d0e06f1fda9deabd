"""Log-based metrics under the Pulumi mocks: their filters match the lines the code really logs.

The lines are emitted by the real code (the functions' `log_outcome`, `transient` and
rejection paths over a real `Service` on the in-memory adapters, and the agent's `power_off`)
and captured from stdout. The filters registered with the mock engine are then evaluated
against them by `matches` below, which understands only the subset of the Logging query
language pcp's filters use: comparisons `FIELD = "string"`, `FIELD = true|false`,
`FIELD > number` and `FIELD >= number` on `jsonPayload.` paths (dotted into nested
objects), joined by `AND`.
Anything else in a filter fails the test, so the subset cannot grow unnoticed.
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
    r'^(?P<path>jsonPayload(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*(?P<op>>=|=|>)\s*'
    r'(?P<value>"[^"\\]*"|true|false|-?\d+(?:\.\d+)?)$')
_EXTRACT = re.compile(r"^EXTRACT\((?P<path>jsonPayload(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\)$")


def _field(entry: dict[str, Any], path: str) -> Any:
    value: Any = {"jsonPayload": entry}
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
        out.append((m["path"], m["op"], value))
    return out


def matches(filter_text: str, entry: dict[str, Any]) -> bool:
    for path, op, want in comparisons(filter_text):
        got = _field(entry, path)
        if op == "=":
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
    m = _EXTRACT.match(extractor)
    assert m, f"outside the supported extractor subset: {extractor!r}"
    return _field(entry, m["path"])


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def emitted() -> list[dict[str, Any]]:
    """Every kind of line the metrics count, emitted by the real code, plus ordinary ones."""
    capture = pytest.MonkeyPatch()
    buf = io.StringIO()
    capture.setattr(sys, "stdout", buf)
    try:
        _emit()
    finally:
        capture.undo()
    return lines(buf.getvalue())


def _emit() -> None:
    settings: Any = types.SimpleNamespace(stack=STACK)
    p = policy(workers=1)
    store, fleet, bus = MemoryStore(), MemoryFleet(p.stack, p.worker_vms), MemoryBus()
    svc = Service(store, fleet, bus, p, sleep=lambda _: None)
    # An orphan: a worker VM running with no run or lease; the sweep stops it.
    vm = next(iter(fleet.vms.values()))
    vm.status = "RUNNING"
    log_outcome(settings, "sweep", svc.sweep(at(0)), None)
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
    # The node agent's dead-man switch powering its VM off (`true` stands in for shutdown).
    power_off(["true"], "this node is done and the run does not keep VMs alive",
              Log(stack=STACK, run_id="r1", node="worker-0", attempt=1))


def metrics(run: StackRun) -> dict[str, dict[str, Any]]:
    return {r["inputs"]["name"]: r["inputs"] for r in run.of_type(METRIC)}


def test_every_metric_is_registered_for_every_stack(stack_run: StackRun) -> None:
    got = metrics(stack_run)
    prefix = stack_run.prefix
    expected = {f"{prefix}-sweeps", f"{prefix}-runs-ended", f"{prefix}-deadman-power-offs",
                f"{prefix}-rejected",
                f"{prefix}-cas-conflicts", f"{prefix}-function-retries",
                *(f"{prefix}-heal-{h.value.replace('_', '-')}" for h in Heal)}
    assert set(got) == expected
    for inputs in got.values():
        assert f'jsonPayload.stack="{stack_run.stack}"' in inputs["filter"]
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
    assert [e["event"] for e in hits("sweeps")] == ["sweep"] * 5  # not the failed or rejected
    assert [e["run_id"] for e in hits("heal-deadline-enforced")] == ["r2"]
    assert [e["event"] for e in hits("rejected")] == ["sweep"]
    assert [e["event"] for e in hits("cas-conflicts")] == ["start"]
    assert [(e["event"], e["error_type"]) for e in hits("function-retries")] == [
        ("sweep", "RuntimeError")]
    assert [e["node"] for e in hits("deadman-power-offs")] == ["worker-0"]


def test_the_evaluator_rejects_what_it_does_not_understand() -> None:
    entry = {"stack": "tiny", "n": 2, "ok": True, "heals": {"a": 1}}
    assert matches('jsonPayload.stack="tiny" AND jsonPayload.n>1', entry)
    assert matches("jsonPayload.ok=true AND jsonPayload.heals.a>0", entry)
    assert matches("jsonPayload.n>=2", entry) and not matches("jsonPayload.n>=3", entry)
    assert not matches('jsonPayload.stack="small"', entry)
    assert not matches("jsonPayload.missing>0", entry)
    assert not matches('jsonPayload.n="2"', entry)
    for bad in ('jsonPayload.stack:"tiny"', "jsonPayload.n>1 OR jsonPayload.ok=true",
                'severity>="ERROR"'):
        with pytest.raises(AssertionError):
            comparisons(bad)


POLICY = "gcp:monitoring/alertPolicy:AlertPolicy"
CHANNEL = "gcp:monitoring/notificationChannel:NotificationChannel"
USER_METRIC = re.compile(r'metric\.type="logging\.googleapis\.com/user/(?P<name>[^"]+)"')


def test_every_alert_documents_its_meaning_and_first_command(any_run: StackRun) -> None:
    policies = {r["name"]: r["inputs"] for r in any_run.of_type(POLICY)}
    prefix = any_run.prefix
    assert set(policies) == {f"{prefix}-alert-{w}" for w in (
        "orphan-vm", "guard-fired", "deadline-enforced", "function-errors", "dead-letter",
        "sweeper-silent")}
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
