"""Whole schedules written by hand: one fault, its healing, and nothing else going wrong."""

from __future__ import annotations

from datetime import datetime

import pytest
from google.api_core import exceptions as gexc

from pcp.core.messages import StartRequest
from pcp.core.policy import Policy
from pcp.service import Outcome
from pcp_dev.faults.world import Plan, Report, World
from pcp_dev.faults.wrappers import Fault, FaultService

pytestmark = pytest.mark.faults


def plan(workers: int = 2, **over: object) -> Plan:
    policy = Policy(stack="camp", worker_count=workers, shepherd_host="shepherd.invalid",
                    max_run_hours=1.0, boot_timeout_minutes=10.0, keep_alive_hours=0.5,
                    default_binary="github:example/trainer#train")
    fields: dict[str, object] = dict(policy=policy, slow_boot=0.0, overrun=0.0,
                                     boot_minutes=(1.0, 3.0), work_minutes=(10.0, 20.0))
    fields.update(over)
    return Plan(**fields)  # type: ignore[arg-type]


def run(p: Plan, seed: int = 1) -> Report:
    report = World(p, seed).run()
    assert report.violations == [], "\n".join(report.trace)
    return report


def test_every_marker_event_lost_the_sweeper_still_ends_every_run() -> None:
    p = plan(rates={Fault.DROP_MARKER: 1.0},
             requests=[(0.0, StartRequest("a"), 1), (5.0, StartRequest("b"), 1)])
    report = run(p)
    assert report.outcomes["succeeded"] == 2
    # Every run ended through a sweep reading its markers (any event folds them, so the
    # running transition may also come with another event).
    assert report.heals["sweeper: runs found ended (done markers)"] == 2
    assert report.heals["sweeper: runs found running (booted markers)"] >= 1
    delivered = [t for t in report.trace if "marker markers/" in t and "(delivery" in t]
    assert delivered == []  # no marker event ever came


def test_a_shepherd_down_past_the_boot_timeout_fails_the_attempt_and_the_restart_runs() -> None:
    p = plan(requests=[(0.0, StartRequest("a", max_restarts=1), 1)],
             shepherd_deaths=[(0.1, 15.0)])
    report = run(p)
    assert report.heals["sweeper: boot timeouts"] == 1
    assert report.outcomes["restart attempts started"] == 1
    assert report.outcomes["succeeded"] == 1


def test_a_broken_dead_mans_switch_and_a_hung_agent_leave_it_to_the_sweeper() -> None:
    p = plan(workers=1, deadman=False, rates={Fault.AGENT_HUNG: 1.0},
             requests=[(0.0, StartRequest("a"), 1)])
    report = run(p)
    assert report.outcomes["failed: boot_timeout"] == 1  # the hung worker never booted
    assert report.heals["node dead-man's switch power-offs"] == 0
    assert report.heals.get("GCE maxRunDuration stops", 0) == 0


def test_deleting_the_stack_document_loses_the_queue_but_stops_every_vm() -> None:
    p = plan(requests=[(0.0, StartRequest("a"), 1), (1.0, StartRequest("b"), 1),
                       (60.0, StartRequest("c"), 1)],
             doc_deletions=[8.0])
    report = run(p)
    assert report.outcomes["lost to stack document deletion"] == 2  # a (running) and b (queued)
    assert report.outcomes["succeeded"] == 1  # c came after the loss and ran
    assert any("stack state was lost" in line for line in report.trace)


def test_transient_errors_everywhere_are_retried_until_every_run_ends() -> None:
    rates = {Fault.STORE_5XX: 0.1, Fault.FLEET_5XX: 0.2, Fault.BUS_5XX: 0.2,
             Fault.STORE_TIMEOUT: 0.05, Fault.FLEET_TIMEOUT: 0.1, Fault.BUS_TIMEOUT: 0.1}
    p = plan(rates=rates, requests=[(0.0, StartRequest("a"), 1), (2.0, StartRequest("b"), 2)])
    report = run(p, seed=3)
    assert report.heals["trigger: redeliveries after an error"] > 5
    assert report.outcomes["succeeded"] + report.outcomes["failed"] == 2


class DownAfterStart(FaultService):
    """The whole control plane fails from the moment the first VM has started."""

    def handle(self, event: object, now: datetime) -> Outcome:
        if any(vm.starts for vm in self.fleet.inner.vms.values()):  # type: ignore[attr-defined]
            raise gexc.ServiceUnavailable("every function is failing")
        return super().handle(event, now)  # type: ignore[arg-type]


@pytest.mark.parametrize("deadman", [True, False])
def test_with_every_function_failing_the_node_or_the_gce_cap_stops_the_vms(deadman: bool) -> None:
    p = plan(workers=2, deadman=deadman, settle_hours=2.0,
             requests=[(0.0, StartRequest("a", max_hours=0.5), 1)])
    world = World(p, 1, service=DownAfterStart)
    report = world.run()
    assert world.fleet.running() == set()
    assert {v.status for v in world.fleet.vms.values()} == {"TERMINATED"}
    if deadman:  # the agents power off when they finish
        assert report.heals["node dead-man's switch power-offs"] == 2
        assert report.heals["GCE maxRunDuration stops"] == 0
    else:  # nothing but Compute Engine's maxRunDuration (deadline + half a sweep interval)
        assert report.heals["GCE maxRunDuration stops"] == 2
        # The cap alone keeps invariant 5 (finding 2, fixed); the run itself cannot end while
        # every function fails, which the other checks rightly report.
        assert not [v for v in report.violations if "past_deadline" in v]
        assert any("run_not_terminal" in v for v in report.violations)
