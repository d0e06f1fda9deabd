"""The budget kill switch: a Cloud Billing notification past the threshold holds the stack.

The notification is parsed like every other untrusted event; the hold lives in the stack
document (so it is decided and saved under the same generation precondition as every other
change); notifications never lift it, only `pcp budget resume` does.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pcp.core.commands import StartNodes, StopNodes
from pcp.core.errors import PermanentError
from pcp.core.lifecycle import NoteKind as K
from pcp.core.messages import (
    BudgetNotification,
    BudgetResume,
    StopRequest,
    parse_stop_topic,
)
from pcp.core.state import Reason, StackState, Status
from tests.core.helpers import Stack, of, policy, req

pytestmark = pytest.mark.core

DEC = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
NOV = datetime(2026, 11, 1, 7, 0, tzinfo=UTC)
ATTRS = {"billingAccountId": "01D4EE-079462-DFD6EC", "budgetId": "b-tiny",
         "schemaVersion": "1.0"}


def payload(cost: float = 120.0, amount: float = 100.0, period: str = "2026-12-01T08:00:00Z",
            **extra: object) -> bytes:
    body = {"budgetDisplayName": "pcp-tiny", "costAmount": cost,
            "costIntervalStart": period, "budgetAmount": amount,
            "budgetAmountType": "SPECIFIED_AMOUNT", "currencyCode": "USD", **extra}
    return json.dumps(body).encode()


def note(cost: float = 120.0, amount: float = 100.0, period: datetime = DEC,
         alert: float | None = None) -> BudgetNotification:
    return BudgetNotification("01D4EE-079462-DFD6EC", "b-tiny", cost, amount, period, "USD",
                              "pcp-tiny", "SPECIFIED_AMOUNT", alert)


def budgeted(**over: object) -> Stack:
    return Stack(policy(budget_id="b-tiny", billing_account="01D4EE-079462-DFD6EC", **over))


def test_the_documented_payload_parses() -> None:
    n = BudgetNotification.from_message(payload(alertThresholdExceeded=1.0), dict(ATTRS))
    assert n.cost_amount == 120.0 and n.budget_amount == 100.0 and n.currency_code == "USD"
    assert n.cost_interval_start == DEC and n.alert_threshold_exceeded == 1.0
    assert n.budget_id == "b-tiny" and n.over(1.0)
    data, attrs = n.to_message()
    assert BudgetNotification.from_message(data, attrs) == n


@pytest.mark.parametrize(("data", "attrs", "match"), [
    (payload(), {**ATTRS, "schemaVersion": "2.0"}, "schemaVersion"),
    (payload(), {k: v for k, v in ATTRS.items() if k != "budgetId"}, "budgetId"),
    (payload(), {**ATTRS, "billingAccountId": "x; rm -rf /"}, "billingAccountId"),
    (payload(cost=float("nan")), ATTRS, "costAmount"),
    (payload(cost=-1), ATTRS, "costAmount"),
    (payload(period="last month"), ATTRS, "costIntervalStart"),
    (payload(currencyCode="dollars"), ATTRS, "currencyCode"),
    (b"\xff", ATTRS, "UTF-8"),
    (b"[1]", ATTRS, "JSON object"),
    (payload(costAmount="12"), ATTRS, "costAmount"),
])
def test_a_malformed_notification_is_refused_with_its_reason(data: bytes, attrs: dict[str, str],
                                                             match: str) -> None:
    with pytest.raises(PermanentError, match=match):
        BudgetNotification.from_message(data, attrs)


def test_a_notification_of_another_budget_is_refused() -> None:
    with pytest.raises(PermanentError, match="not this stack's budget 'b-small'"):
        note().check_budget("b-small", None)
    with pytest.raises(PermanentError, match="this stack has no budget"):
        note().check_budget(None, None)
    with pytest.raises(PermanentError, match="billing account"):
        note().check_budget("b-tiny", "000000-000000-000000")
    note().check_budget("b-tiny", "01D4EE-079462-DFD6EC")


@pytest.mark.parametrize(("cost", "alert", "threshold", "over"), [
    (99.99, None, 1.0, False),
    (100.0, None, 1.0, True),    # costAmount >= budgetAmount
    (50.0, None, 0.5, True),     # the configured fraction
    (10.0, 0.9, 0.9, True),      # alertThresholdExceeded >= the threshold
    (10.0, 0.5, 0.9, False),
])
def test_the_threshold(cost: float, alert: float | None, threshold: float, over: bool) -> None:
    assert note(cost=cost, alert=alert).over(threshold) is over


def test_the_stop_topic_carries_stops_and_resumes() -> None:
    assert parse_stop_topic(BudgetResume("ann").to_json()) == BudgetResume("ann")
    assert parse_stop_topic(StopRequest("r1").to_json()) == StopRequest("r1")
    with pytest.raises(PermanentError, match="op must be 'budget_resume'"):
        parse_stop_topic(b'{"op": "budget_pause"}')


def test_passing_the_threshold_stops_everything_and_refuses_new_starts() -> None:
    s = budgeted(workers=2)
    s(req("r1", keep_vm_alive=True))
    s(req("r2"))
    s.boot_all("r1")
    t = s(note(), 5)
    assert K.BUDGET_HOLD in t.kinds()
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.BUDGET_EXCEEDED
    assert line.status is Status.FAILED and "budget hold" in line.detail
    stopped = {vm for c in of(t, StopNodes) for vm in c.vms}  # type: ignore[attr-defined]
    assert stopped == set(s.policy.worker_vms)
    assert s.state.lease is None and s.state.active is None
    assert [r.run_id for r in s.state.queue] == ["r2"]  # queued runs stay queued
    assert not of(t, StartNodes)
    s(req("r3"), 6)
    refused = s.state.find("r3")
    assert refused is not None and refused.status is Status.REJECTED
    assert "budget hold" in refused.detail and "pcp budget resume --stack tiny" in refused.detail
    # The sweeper stops any VM that comes up while held, a first boot too.
    up = s(s.vms(run_id=None), 10)
    assert {vm for c in of(up, StopNodes) for vm in c.vms} == set(s.policy.worker_vms)  # type: ignore[attr-defined]
    assert s.state.active is None


def test_only_a_person_lifts_the_hold_and_the_queue_moves_on() -> None:
    s = budgeted()
    s(req("r1"))
    s(note(), 1)
    s(req("r2"), 2)  # a new start while held is refused
    assert s.state.find("r2") is not None and s.state.find("r2").status is Status.REJECTED  # type: ignore[union-attr]
    s(note(cost=10.0), 3)  # under the threshold now: notifications never lift the hold
    assert s.state.budget.hold is not None
    t = s(BudgetResume("ann"), 4)
    assert K.BUDGET_RESUMED in t.kinds() and s.state.budget.hold is None
    assert s.state.budget.lifted == DEC and s.state.budget.lifted_by == "ann"
    assert s(BudgetResume(), 5).kinds() == (K.BUDGET_RESUME_NOOP,)


def test_a_queued_run_starts_when_the_hold_is_lifted() -> None:
    s = budgeted()
    s(req("r1"))
    s(req("r2"))
    s(note(), 1)
    assert [r.run_id for r in s.state.queue] == ["r2"] and s.state.active is None
    t = s(BudgetResume("ann"), 2)
    assert s.state.active is not None and s.state.active.run_id == "r2"
    assert of(t, StartNodes)


def test_duplicates_stale_and_lifted_periods_trip_nothing() -> None:
    s = budgeted()
    s(note(), 1)
    hold = s.state.budget.hold
    assert hold is not None
    assert s(note(), 2).kinds() == (K.BUDGET_HELD,)  # a duplicate while held
    assert s.state.budget.hold == hold
    s(BudgetResume("ann"), 3)
    # The same period again (Cloud Billing repeats it several times a day): no re-trip.
    assert s(note(cost=150.0), 4).kinds() == (K.BUDGET_LIFTED_PERIOD,)
    # A late notification of the previous month: stale, whatever it says.
    assert s(note(cost=500.0, period=NOV), 5).kinds() == (K.BUDGET_STALE,)
    assert s.state.budget.hold is None
    s(req("r1"), 6)
    assert s.state.active is not None
    # The next period over its budget trips it again.
    jan = datetime(2027, 1, 1, 8, 0, tzinfo=UTC)
    assert K.BUDGET_HOLD in s(note(period=jan), 7).kinds()
    assert s.state.budget.hold is not None and s.state.active is None


def test_an_older_period_never_trips_even_before_any_hold() -> None:
    s = budgeted()
    s(note(cost=1.0), 1)  # December, under
    assert s(note(cost=999.0, period=NOV), 2).kinds() == (K.BUDGET_STALE,)
    assert s.state.budget.hold is None and s.state.budget.period == DEC


def test_the_hold_round_trips_through_the_stack_document() -> None:
    s = budgeted()
    s(note(), 1)
    s(BudgetResume("ann"), 2)
    s(note(period=datetime(2027, 1, 1, 8, tzinfo=UTC)), 3)
    assert StackState.from_json(s.state.to_json()) == s.state
    assert "budget" not in json.loads(StackState().to_json())


def test_a_hold_with_no_run_still_stops_every_vm() -> None:
    s = budgeted(workers=3)
    t = s(note(), 1)
    assert [sorted(c.vms) for c in of(t, StopNodes)] == [sorted(s.policy.worker_vms)]  # type: ignore[attr-defined]
    assert s.state.budget.hold is not None and s.state.budget.hold.cost_amount == 120.0


def test_a_start_refused_by_the_hold_stays_refused_after_it_is_lifted() -> None:
    """A late duplicate of a refused request must not start the run behind a person's back."""
    s = budgeted()
    s(note(), 1)
    s(req("r1"), 2)
    s(BudgetResume("ann"), 3)
    assert s(req("r1"), 4).kinds() == (K.DUPLICATE_START,)
    assert s.state.active is None
    s(req("r2"), 5)  # a new request under a new id runs
    assert s.state.active is not None and s.state.active.run_id == "r2"


def test_a_notification_of_a_period_that_has_ended_trips_nothing() -> None:
    """Last month's notification arriving first (nothing newer seen yet) is still stale."""
    s = budgeted()
    old = datetime(2026, 10, 1, 7, tzinfo=UTC)  # the helpers' clock is 2026-11-29
    assert s(note(cost=900.0, period=old), 1).kinds() == (K.BUDGET_STALE,)
    assert s.state.budget.hold is None and s.state.budget.period is None
