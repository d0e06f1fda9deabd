"""on_budget through the real functions-framework, the emulators and the local Compute
endpoint: a Cloud Billing notification in the documented format past the threshold stops every
VM and refuses new starts; one of another budget is recorded as rejected; `pcp budget resume`
(a BudgetResume on the stop topic) lifts the hold and the queued run starts."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pcp.core.messages import BudgetResume
from tests.functions.conftest import MakeStack

pytestmark = pytest.mark.functions

ACCOUNT = "01D4EE-079462-DFD6EC"


def notification(cost: float, budget_id: str = "b-tiny") -> tuple[bytes, dict[str, str]]:
    data = json.dumps({"budgetDisplayName": "pcp-tiny", "alertThresholdExceeded": 1.0,
                       "costAmount": cost,
                       "costIntervalStart": f"{datetime.now(UTC):%Y-%m}-01T08:00:00Z",
                       "budgetAmount": 100.0, "budgetAmountType": "SPECIFIED_AMOUNT",
                       "currencyCode": "USD"}).encode()
    return data, {"billingAccountId": ACCOUNT, "budgetId": budget_id, "schemaVersion": "1.0"}


def test_a_budget_past_its_threshold_stops_the_stack_until_resumed(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1, PCP_BUDGET_ID="b-tiny", PCP_BILLING_ACCOUNT=ACCOUNT)
    assert fn.start({"run_id": "exp-1"}).status_code == 200
    assert fn.start({"run_id": "exp-2"}).status_code == 200  # queued behind exp-1
    assert fn.running() == fn.vm_names

    # Another budget's notification on this topic: recorded as rejected, nothing stops.
    assert fn.budget(*notification(500.0, budget_id="b-other")).status_code == 200
    [rejection] = fn.names("control/rejected/")
    assert "not this stack's budget 'b-tiny'" in fn.read(rejection)["detail"]
    assert fn.running() == fn.vm_names

    assert fn.budget(*notification(120.0)).status_code == 200
    state = fn.state()
    assert state["budget"]["hold"]["cost_amount"] == 120.0
    assert state["active"] is None and [r["run_id"] for r in state["queue"]] == ["exp-2"]
    assert state["recent"][0]["reason"] == "budget_exceeded"
    assert fn.running() == []

    assert fn.start({"run_id": "exp-3"}).status_code == 200
    record = fn.read("runs/exp-3/run.json")
    assert record["status"] == "rejected" and "budget hold" in record["detail"]
    assert fn.running() == []

    assert fn.stop(BudgetResume("ann").to_json()).status_code == 200
    state = fn.state()
    assert state["budget"]["hold"] is None and state["active"]["run_id"] == "exp-2"
    assert fn.running() == fn.vm_names


def test_a_notification_on_a_stack_without_a_budget_is_rejected(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    assert fn.budget(*notification(120.0)).status_code == 200
    [rejection] = fn.names("control/rejected/")
    assert "this stack has no budget" in fn.read(rejection)["detail"]
    assert fn.read("control/stack.json") is None  # nothing decided, nothing saved
