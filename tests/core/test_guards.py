"""The gpu_idle policy's parsers and the node end reasons (gpu_idle, maintenance, preempted):
a done marker that names one ends the run with that reason, and maintenance and preemption
restart it as its next attempt while restarts are left."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pcp.core.errors import PermanentError
from pcp.core.messages import NODE_END_REASONS, Assignment, GpuIdle, NodeMarker, StartRequest
from pcp.core.state import NODE_END_REASONS as REASONS
from pcp.core.state import RESTARTABLE, STATUS_OF_REASON, Reason, Status
from tests.core.helpers import Stack, marker, policy, req


def test_gpu_idle_wire_form_round_trips_through_the_start_request() -> None:
    r = StartRequest.from_json(json.dumps({"run_id": "r1", "gpu_idle": {
        "below_percent": 5, "minutes": 15, "after_minutes": 10}}))
    assert r.gpu_idle == GpuIdle(5.0, 15.0, 10.0)
    assert StartRequest.from_json(r.to_json()) == r
    assert StartRequest.from_json(b'{"run_id": "r1"}').gpu_idle is None


@pytest.mark.parametrize(("value", "words"), [
    ({"below_percent": 5}, "minutes is required"),
    ({"below_percent": 0, "minutes": 1}, "below_percent must be more than 0"),
    ({"below_percent": 101, "minutes": 1}, "at most 100"),
    ({"below_percent": 5, "minutes": 0}, "minutes must be more than 0"),
    ({"below_percent": 5, "minutes": 1, "after_minutes": -1}, "after_minutes must be at least 0"),
    ({"below_percent": True, "minutes": 1}, "below_percent must be a number"),
    ({"below_percent": "5", "minutes": 1}, "below_percent must be a number"),
    ({"below_percent": 5, "minutes": 1, "window": 3}, "unknown field 'window'"),
    ("5%:15m", "must be an object"),
])
def test_gpu_idle_refuses_bad_values_in_plain_words(value: object, words: str) -> None:
    with pytest.raises(PermanentError, match=words):
        StartRequest.from_dict({"run_id": "r1", "gpu_idle": value})


@pytest.mark.parametrize(("text", "policy_"), [
    ("5%:15m:10m", GpuIdle(5, 15, 10)),
    ("5:15", GpuIdle(5, 15, 0)),
    ("2.5%:90s:1h", GpuIdle(2.5, 1.5, 60)),
    (" 10% : 2h ", GpuIdle(10, 120, 0)),
])
def test_gpu_idle_flag_form(text: str, policy_: GpuIdle) -> None:
    assert GpuIdle.parse(text) == policy_
    assert GpuIdle.parse(policy_.text) == policy_  # the stack default's env form reads back


@pytest.mark.parametrize(("text", "words"), [
    ("5", "expected PERCENT%:WINDOW"), ("5%:1m:2m:3m", "expected PERCENT%:WINDOW"),
    ("x%:1m", "not a percentage"), ("5%:1d", "not a duration"), ("5%:-1m", "not a duration"),
    ("0%:1m", "more than 0"),
])
def test_gpu_idle_flag_errors(text: str, words: str) -> None:
    with pytest.raises(PermanentError, match=words):
        GpuIdle.parse(text)


def test_the_assignment_carries_the_request_policy_else_the_stack_default() -> None:
    s = Stack(policy(default_gpu_idle=GpuIdle(3, 30)))
    s(req("r1"))
    assert s.state.active is not None
    from pcp.core.lifecycle import _assignments  # the one builder of assignments

    assert {a.gpu_idle for a in _assignments(s.state.active, s.policy)} == {GpuIdle(3, 30)}
    s2 = Stack(policy(default_gpu_idle=GpuIdle(3, 30)))
    s2(req("r1", gpu_idle=GpuIdle(5, 15, 10)))
    assert s2.state.active is not None
    a = _assignments(s2.state.active, s2.policy)[1]
    assert a.gpu_idle == GpuIdle(5, 15, 10)
    assert Assignment.from_json(a.to_json()).gpu_idle == GpuIdle(5, 15, 10)


def test_end_reasons_are_one_list_with_a_status_each() -> None:
    assert {r.value for r in REASONS} == set(NODE_END_REASONS)
    assert all(STATUS_OF_REASON[r] is Status.FAILED for r in REASONS)
    assert Reason.MAINTENANCE in RESTARTABLE and Reason.PREEMPTED in RESTARTABLE
    assert Reason.GPU_IDLE not in RESTARTABLE


def _ended(m: NodeMarker, reason: str) -> NodeMarker:
    return replace(m, end_reason=reason)


def test_the_marker_end_reason_is_parsed_strictly() -> None:
    m = _ended(marker("r1", "worker-0", "done", code=143, signal="SIGTERM"), "preempted")
    back = NodeMarker.from_json(m.to_json(), m.path)
    assert back.end_reason == "preempted"
    body = json.loads(m.to_json())
    body["end_reason"] = "bored"
    with pytest.raises(PermanentError, match="end_reason must be one of"):
        NodeMarker.from_json(json.dumps(body), m.path)
    plain = marker("r1", "worker-0", "done")
    assert "end_reason" not in json.loads(plain.to_json())  # older readers see no new field


def test_gpu_idle_fails_the_run_with_that_reason_even_with_restarts_left() -> None:
    s = Stack()
    s(req("r1", max_restarts=2))
    s.boot_all()
    t = s(_ended(marker("r1", "worker-0", "done", 3, code=143, signal="SIGTERM"), "gpu_idle"),
          minute=3)
    found = s.state.find("r1")
    assert found is not None and found.status is Status.FAILED
    assert found.reason is Reason.GPU_IDLE, t.reason
    assert "every GPU stayed idle" in (found.detail or "")
    assert s.state.active is None


@pytest.mark.parametrize("reason", ["maintenance", "preempted"])
def test_a_notice_restarts_the_run_then_fails_it_with_that_reason(reason: str) -> None:
    s = Stack()
    s(req("r1", max_restarts=1))
    s.boot_all()
    # the binary caught SIGTERM and exited 0: still the node was ended, and says why
    t = s(_ended(marker("r1", "worker-0", "done", 3, code=0, signal="SIGTERM"), reason),
          minute=3)
    assert "will restart as attempt 2" in t.reason
    assert s.state.active is not None and s.state.active.attempt == 2
    s.boot_all(minute=4, attempt=2)
    s(_ended(marker("r1", "worker-0", "done", 5, code=0, attempt=2), reason), minute=5)
    found = s.state.find("r1")
    assert found is not None and found.status is Status.FAILED
    assert found.reason is Reason(reason)


def test_a_notice_on_a_node_that_already_succeeded_changes_nothing() -> None:
    s = Stack()
    s(req("r1", max_restarts=1))
    s.boot_all()
    s.finish_all(minute=2)
    t = s(_ended(marker("r1", "worker-0", "done", 3, code=0), "preempted"), minute=3)
    found = s.state.find("r1")
    assert found is not None and found.status is Status.SUCCEEDED, t.reason
