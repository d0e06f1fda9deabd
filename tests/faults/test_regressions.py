"""Bugs the fault campaign found, each pinned by the smallest schedule that shows it."""

from __future__ import annotations

import pytest

from pcp.core.messages import Assignment, NodeMarker, StartRequest
from pcp.core.names import LABEL_KEEP_ALIVE, LABEL_RUN
from pcp_dev.faults.world import Plan, World
from pcp_dev.faults.wrappers import Fault
from tests.core.helpers import at, policy, req
from tests.faults.test_faults import Rig

pytestmark = pytest.mark.faults


def test_a_refused_start_does_not_lease_the_vms_it_took_over() -> None:
    """Found by the campaign (2 schedules in 3000), fixed in lifecycle._end.

    r1 ends with keep-alive; r2 (keep_vm_alive too) takes the VMs over, but Compute refuses
    its start. r2 used to lease the VMs, still labelled and armed for r1, past r1's deadline.
    """
    rig = Rig(keep_alive_hours=0.5, max_run_hours=1)
    rig.svc.handle(req("r1", keep_vm_alive=True), at(0))
    rig.boot_all()
    for node in rig.policy.node_names:
        rig.deliver(rig.write("r1", node, "done", 40), 40)
    vm = rig.fleet.vms["pcp-tiny-worker-0"]
    assert vm.status == "RUNNING" and rig.state().lease is not None
    rig.injector.force(Fault.CAPACITY)
    rig.svc.handle(req("r2", keep_vm_alive=True), at(50))
    assert rig.state().lease is None and rig.state().recent[0].run_id == "r2"
    assert vm.status == "TERMINATED" and vm.labels[LABEL_RUN] == "r1"


def test_an_attempt_that_never_fully_booted_does_not_lease_its_vms() -> None:
    """A boot timeout with keep_vm_alive: a worker may run no assignment of this attempt."""
    rig = Rig(workers=2, boot_timeout_minutes=10)
    rig.svc.handle(req("r1", keep_vm_alive=True), at(0))
    rig.deliver(rig.write("r1", "worker-0", "booted", 2), 2)
    out = rig.svc.sweep(at(10))
    assert "boot_timeout" in out.reason and "kept alive" not in out.reason
    assert rig.state().lease is None and rig.fleet.running() == set()
    assert all(LABEL_KEEP_ALIVE not in v.labels for v in rig.fleet.vms.values())


def test_a_vm_lost_while_booting_may_boot_again_but_a_booted_node_may_not() -> None:
    """Found by the campaign: a VM preempted before its node booted was booted a second time
    for the same attempt by a redelivered start, while the sweeper called it lost. The
    lifecycle now re-starts such a VM on purpose (both paths agree; the boot timeout bounds
    it), so the campaign counts that re-boot, and still flags a second boot of a node the
    control plane saw boot."""
    world = World(Plan(policy=policy(workers=1)), 1)
    world.svc.handle(StartRequest("a"), at(0))
    world.fleet.preempt("pcp-tiny-worker-0")  # lost while booting
    out = world.svc.sweep(at(1))
    assert "re-issued start for worker-0" in out.reason
    assert world.report.outcomes["VM re-booted after it was lost while booting"] == 1
    assert world.report.violations == []
    for node in world.policy.node_names:
        m = NodeMarker(run_id="a", node=node, kind="booted", attempt=1, at=at(2))
        world.store.put(m.path, m.to_json())
        world.svc.handle_marker(m.path, at(2))
    vm = world.fleet.vms["pcp-tiny-worker-0"]
    a = Assignment.from_json(vm.metadata["pcp-assignment"])
    world.fleet.preempt(vm.name)
    world.svc.fleet.start([a], a.deadline)  # what a buggy re-issue would do
    assert [v.split(":")[0] for v in world.report.violations] == ["double_start"]
    assert "node booted" in world.report.violations[0]
