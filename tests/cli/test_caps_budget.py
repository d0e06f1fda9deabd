"""`pcp run --max-cost` shows the deadline and the limit that sets it before it publishes;
`pcp budget status/resume`, `pcp status` and `pcp doctor` show and lift the budget hold."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pcp.core.messages import BudgetNotification, BudgetResume, StartRequest, parse_stop_topic
from pcp.core.names import POLICY_DOC
from tests.cli.conftest import POLICY, T0, Stack

pytestmark = pytest.mark.cli


def test_run_shows_the_deadline_the_cap_sets_before_publishing(stack: Stack, invoke: Any) -> None:
    stack.store.put(POLICY_DOC, POLICY.to_doc())  # 1 worker at $1.2/h + shepherd $0.3/h
    r = invoke(["run", "--max-cost", "0.75"], obj=stack.context)
    assert r.exit_code == 0, r.output
    assert "deadline 30 min after the run starts, set by the cost cap $0.75" in r.stderr
    assert "$1.5/h" in r.stderr
    [data] = stack.published("start")
    assert StartRequest.from_json(data).max_cost_usd == 0.75
    r = invoke(["run", "--max-hours", "2"], obj=stack.context)
    assert "deadline 2 h after the run starts, set by max_hours 2" in r.stderr


def test_run_refuses_a_bad_cap_before_publishing(stack: Stack, invoke: Any) -> None:
    r = invoke(["run", "--max-cost", "-3"], obj=stack.context)
    assert r.exit_code != 0 and "max_cost_usd must be a positive, finite number" in r.output
    free = POLICY.__class__("tiny", 1)  # no prices
    stack.store.put(POLICY_DOC, free.to_doc())
    r = invoke(["run", "--max-cost", "3"], obj=stack.context)
    assert r.exit_code != 0 and "has no hourly prices" in r.output
    assert stack.published("start") == []


def trip(stack: Stack) -> None:
    p = stack.service.policy
    stack.service.policy = p.__class__(**{**p.__dict__, "budget_id": "b1"})
    n = BudgetNotification("01D4EE-079462-DFD6EC", "b1", 130.0, 100.0,
                           datetime(2026, 12, 1, 8, tzinfo=UTC), "USD")
    stack.service.handle(n, T0)


def test_budget_status_resume_status_and_doctor_show_the_hold(stack: Stack, invoke: Any) -> None:
    stack.start("r1")
    trip(stack)
    r = invoke(["budget", "status"], obj=stack.context)
    assert r.exit_code == 0 and "on budget hold since" in r.output
    assert "spend 130.00 USD of the 100.00 USD budget" in r.output
    r = invoke(["status"], obj=stack.context)
    assert "budget hold" in r.output and "pcp budget resume --stack tiny" in r.output
    r = invoke(["status", "--json"], obj=stack.context)
    assert json.loads(r.output)["budget"]["hold"]["cost_amount"] == 130.0
    r = invoke(["status", "r1"], obj=stack.context)
    assert "budget_exceeded" in r.output or "budget hold" in r.output
    r = invoke(["budget", "resume", "--timeout", "0"], obj=stack.context)
    assert r.exit_code == 0, r.output
    [data] = stack.published("stop")
    assert parse_stop_topic(data) == BudgetResume(requested_by=BudgetResume.from_dict(
        json.loads(data)).requested_by)
    stack.service.handle(parse_stop_topic(data), T0)  # the stop function does this
    r = invoke(["budget", "status", "--json"], obj=stack.context)
    assert json.loads(r.output)["held"] is False
    r = invoke(["budget", "resume"], obj=stack.context)
    assert "nothing to resume" in r.output and len(stack.published("stop")) == 1


def test_doctor_fails_its_budget_check_while_held(stack: Stack) -> None:
    from pcp.cli.doctor import budget_check
    from pcp.cli.views import load_state

    stack.start("r1")
    assert budget_check(load_state(stack.store), "tiny").state == "ok"
    trip(stack)
    check = budget_check(load_state(stack.store), "tiny")
    assert check.state == "fail" and "pcp budget resume --stack tiny" in check.detail
