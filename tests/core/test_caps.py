"""The dollar cap per run: `max_cost_usd` becomes the run's deadline, shared by its restarts.

The deadline is what every guard enforces (the sweeper's `_expire`, GCE's maxRunDuration armed
from `StartNodes.deadline`, the node's dead-man's switch from `Assignment.deadline`), so these
tests check that the cap reaches each of them, and a state machine checks the invariant: no
run's cost at its deadline exceeds its cap.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pcp.core.commands import CommandShepherd, StartNodes
from pcp.core.errors import PermanentError
from pcp.core.messages import StartRequest
from pcp.core.state import Phase, Reason, Status
from tests.core.helpers import T0, Stack, at, marker, of, policy, req

pytestmark = pytest.mark.core


def near(deadline: object, expected: object) -> bool:
    """The deadline is floored to whole milliseconds, so it may be up to 1 ms early."""
    return expected - timedelta(milliseconds=1) <= deadline <= expected  # type: ignore[operator]


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), "5", True, 10**400, 2e9])
def test_max_cost_usd_must_be_a_positive_finite_number(value: object) -> None:
    with pytest.raises(PermanentError, match="max_cost_usd"):
        StartRequest.from_dict({"run_id": "r1", "max_cost_usd": value})


def test_max_cost_usd_round_trips() -> None:
    r = StartRequest.from_dict({"run_id": "r1", "max_cost_usd": 2.5})
    assert r.max_cost_usd == 2.5
    assert StartRequest.from_json(r.to_json()) == r


# The tiny stack of the helpers: 1 worker at $1/h and the shepherd at $0.5/h = $1.5/h.
@pytest.mark.parametrize(("max_hours", "cap", "hours", "by"), [
    (None, None, 6.0, "max_hours"),        # no cap: the stack's max_run_hours
    (2.0, None, 2.0, "max_hours"),
    (None, 3.0, 2.0, "max_cost_usd"),      # $3 at $1.5/h: 2 h, earlier than 6
    (1.0, 3.0, 1.0, "max_hours"),          # max_hours is earlier
    (None, 100.0, 6.0, "max_hours"),       # the cap is never reached within 6 h
    (None, 0.75, 0.5, "max_cost_usd"),
])
def test_the_deadline_is_the_earlier_of_max_hours_and_the_cap(
        max_hours: float | None, cap: float | None, hours: float, by: str) -> None:
    s = Stack(policy())
    t = s(req("r1", max_hours=max_hours, max_cost_usd=cap))
    run = s.state.active
    assert run is not None and run.deadline_by == by
    assert near(run.deadline, T0 + timedelta(hours=hours))
    # Every guard gets that deadline: GCE's cap and the nodes' dead-man's switch.
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes) and start.deadline == run.deadline
    assert all(a.deadline == run.deadline for a in start.assignments)
    shepherd = of(t, CommandShepherd)[0]
    assert isinstance(shepherd, CommandShepherd)
    assert shepherd.command.assignment is not None
    assert shepherd.command.assignment.deadline == run.deadline


def test_the_stack_default_applies_when_the_request_names_no_cap() -> None:
    s = Stack(policy(max_cost_usd=1.5))
    s(req("r1"))
    run = s.state.active
    assert run is not None and run.max_cost_usd == 1.5 and run.deadline_by == "max_cost_usd"
    assert near(run.deadline, T0 + timedelta(hours=1))
    assert "the stack's default" in run.history[0].reason
    s2 = Stack(policy(max_cost_usd=1.5))
    s2(req("r1", max_cost_usd=30.0))  # the request's own cap replaces the default
    assert s2.state.active is not None and s2.state.active.max_cost_usd == 30.0


def test_a_cap_on_a_stack_without_prices_is_rejected_with_the_reason() -> None:
    s = Stack(policy(worker_hourly_usd=0.0, shepherd_hourly_usd=0.0))
    s(req("r1", max_cost_usd=5.0))
    line = s.state.find("r1")
    assert line is not None and line.status is Status.REJECTED
    assert "no hourly prices" in line.detail and s.state.active is None


def test_the_sweeper_ends_a_capped_run_at_its_deadline_saying_why() -> None:
    s = Stack(policy())
    s(req("r1", max_cost_usd=0.75))  # 30 min
    s.boot_all("r1")
    assert s.state.active is not None and s.state.active.phase is Phase.RUNNING
    s(s.vms(), 29)
    assert s.state.active is not None
    s(s.vms(), 30)
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.TIMED_OUT
    assert line.detail.startswith("cost cap $0.75 reached")
    assert line.cost_usd == pytest.approx(0.75)


def test_restarts_share_the_cap() -> None:
    s = Stack(policy(boot_timeout_minutes=20))
    s(req("r1", max_cost_usd=1.5, max_restarts=3))  # 1 h in all
    s.boot_all("r1")
    s(s.vms(status="TERMINATED"), 24)  # lost after 24 min: $0.6 spent
    run = s.state.active
    assert run is not None and run.attempt == 2
    assert run.cost_usd == pytest.approx(0.6)
    assert near(run.deadline, at(24) + timedelta(minutes=36))  # $0.9 left: 36 min, not a fresh hour
    assert run.deadline_by == "max_cost_usd"
    assert "$0.6 spent before" in run.history[-1].reason
    # The second attempt never boots: the boot timeout (20 min) ends it, $0.5 more.
    s(s.vms(run_id="r1", attempt=2), 44)
    run = s.state.active
    assert run is not None and run.attempt == 3
    assert near(run.deadline, at(44) + timedelta(minutes=16))
    # The third runs to its deadline: the cap is spent, so no fourth attempt starts.
    s.boot_all("r1", minute=45, attempt=3)
    s(s.vms(run_id="r1", attempt=3), 60)
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.TIMED_OUT
    assert line.cost_usd == pytest.approx(1.5)


def test_an_attempt_that_ends_with_the_cap_spent_does_not_restart() -> None:
    s = Stack(policy())
    s(req("r1", max_cost_usd=0.75, max_restarts=2))
    s.boot_all("r1")
    s(s.vms(status="TERMINATED"), 31)  # lost, but only after its 30 min were spent
    line = s.state.find("r1")
    # The deadline came first: the sweep ends it as timed out, and no restart follows.
    assert line is not None and line.reason is Reason.TIMED_OUT and s.state.active is None


def test_a_lost_node_with_the_cap_spent_ends_without_a_restart() -> None:
    s = Stack(policy())
    s(req("r1", max_cost_usd=0.75, max_restarts=2))
    s.boot_all("r1")
    # The last sweep inside the deadline finds the node lost with $0.75 spent to the ms.
    s(s.vms(status="TERMINATED"), 29.99999)
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.NODE_LOST
    assert "no restart: the cost cap $0.75 is spent" in line.detail
    assert s.state.active is None and not s.state.queue


class CappedRuns(RuleBasedStateMachine):
    """Random caps, max_hours, restarts, boots, lost VMs and sweeps through decide(): the
    cost of every attempt's run at its deadline, with its earlier attempts, stays within the
    run's cap, and an attempt is never started with nothing left to spend."""

    @initialize(workers=st.integers(1, 7), worker_price=st.sampled_from([0.35, 1.0, 2.48]),
                shepherd_price=st.sampled_from([0.0, 0.5]),
                default_cap=st.none() | st.floats(0.01, 50))
    def setup(self, workers: int, worker_price: float, shepherd_price: float,
              default_cap: float | None) -> None:
        self.s = Stack(policy(workers, worker_hourly_usd=worker_price,
                              shepherd_hourly_usd=shepherd_price, max_run_hours=6,
                              boot_timeout_minutes=15, max_cost_usd=default_cap))
        self.minute = 0.0
        self.count = 0

    @rule(cap=st.none() | st.floats(0.01, 100), hours=st.none() | st.floats(0.05, 12),
          restarts=st.integers(0, 4))
    def start(self, cap: float | None, hours: float | None, restarts: int) -> None:
        self.count += 1
        self.s(req(f"r{self.count}", max_cost_usd=cap, max_hours=hours, max_restarts=restarts),
               self.minute)

    @rule()
    def boot(self) -> None:
        run = self.s.state.active
        if run is not None:
            self.s.boot_all(run.run_id, self.minute, run.attempt)

    @rule(minutes=st.floats(0.01, 120))
    def time_passes_and_a_sweep_sees_the_vms_up(self, minutes: float) -> None:
        self.minute += minutes
        run = self.s.state.active
        self.s(self.s.vms(run_id=run.run_id if run else None,
                          attempt=run.attempt if run else 1), self.minute)

    @rule(minutes=st.floats(0.01, 60))
    def a_vm_is_lost(self, minutes: float) -> None:
        self.minute += minutes
        run = self.s.state.active
        self.s(self.s.vms(status="TERMINATED", run_id=run.run_id if run else None),
               self.minute)

    @invariant()
    def no_run_costs_more_than_its_cap_at_its_deadline(self) -> None:
        run = self.s.state.active
        if run is None or run.max_cost_usd is None or run.started_at is None:
            return
        assert run.deadline is not None
        p = self.s.policy
        at_deadline = (run.cost_usd or 0.0) + p.estimate_cost(run.started_at, run.deadline)
        assert at_deadline <= run.max_cost_usd + 1e-4, (run.run_id, run.attempt, at_deadline)
        assert run.attempt == 1 or (run.cost_usd or 0.0) < run.max_cost_usd

    @invariant()
    def the_deadline_never_passes_max_hours(self) -> None:
        run = self.s.state.active
        if run is None or run.started_at is None or run.deadline is None:
            return
        hours = self.s.policy.run_hours(run.request.max_hours)
        assert run.deadline <= run.started_at + timedelta(hours=hours)


TestCappedRuns = CappedRuns.TestCase
TestCappedRuns.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                   suppress_health_check=[HealthCheck.too_slow])


def test_a_node_ended_by_its_deadline_times_the_run_out() -> None:
    """The node's dead-man's switch ends the binary at the deadline; its `done` (a signal)
    may reach the control plane before the sweeper does: the reason is still the deadline."""
    s = Stack(policy())
    s(req("r1", max_cost_usd=0.75))  # 30 min
    s.boot_all("r1")
    s(marker("r1", "worker-0", "done", 30.01, code=None, signal="SIGTERM"), 30.02)
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.TIMED_OUT
    assert line.detail.startswith("cost cap $0.75 reached") and "SIGTERM" in line.detail
    s2 = Stack(policy())
    s2(req("r1", max_cost_usd=0.75))
    s2.boot_all("r1")
    s2(marker("r1", "worker-0", "done", 20, code=3), 20)  # before it: an ordinary failure
    line = s2.state.find("r1")
    assert line is not None and line.reason is Reason.FAILED


def test_a_late_duplicate_start_past_the_deadline_boots_nothing() -> None:
    """Found by the fault campaign with a short cap: a start redelivered after the deadline
    of a run still starting re-issued its VMs' start (a second boot of the attempt)."""
    s = Stack(policy())
    s(req("r1", max_cost_usd=0.05))  # 2 min
    t = s(req("r1"), 2.5)
    assert not of(t, StartNodes)
    line = s.state.find("r1")
    assert line is not None and line.reason is Reason.TIMED_OUT
