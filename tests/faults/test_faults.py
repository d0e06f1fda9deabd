"""One targeted test per fault kind: the fault happens, then the specific healing follows.

The real service over the in-memory twins, with the campaign's wrappers forcing exactly one
injection where the test says so. "Redelivery" is the test calling the handler again, as
Pub/Sub or Eventarc would after the handler raised.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from google.api_core import exceptions as gexc

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.core.lifecycle import NoteKind
from pcp.core.messages import NodeMarker, ShepherdCommand, StartRequest
from pcp.core.names import LABEL_ATTEMPT, LABEL_KEEP_ALIVE, LABEL_RUN, STACK_DOC, SWEEPS, run_doc
from pcp.core.state import Reason, StackState
from pcp_dev.faults.wrappers import (
    Crash,
    Fault,
    FaultBus,
    FaultFleet,
    FaultService,
    FaultStore,
    Injector,
)
from tests.core.helpers import at, policy, req

pytestmark = pytest.mark.faults


class Rig:
    """The service behind the fault wrappers, with nothing injected unless forced."""

    def __init__(self, workers: int = 1, **over: object) -> None:
        self.policy = policy(workers=workers, **over)
        self.store = MemoryStore()
        self.fleet = MemoryFleet(self.policy.stack, self.policy.worker_vms)
        self.bus = MemoryBus()
        self.injector = Injector(random.Random(0))
        self.boots: Counter[tuple[str, str, int]] = Counter()
        self.svc = FaultService(
            FaultStore(self.store, self.injector),
            FaultFleet(self.fleet, self.injector,
                       lambda vm, run, attempt: self.boots.update([(vm, run, attempt)])),
            FaultBus(self.bus, self.injector), self.policy, self.injector)

    def state(self) -> StackState:
        blob = self.store.get(STACK_DOC)
        assert blob is not None, "control/stack.json is missing"
        return StackState.from_json(blob.data)

    def write(self, run_id: str, node: str, kind: str, minute: float, attempt: int = 1,
              code: int | None = 0) -> str:
        """A node agent writes a marker; the test decides whether its event is delivered."""
        m = NodeMarker(run_id=run_id, node=node, kind=kind, attempt=attempt,  # type: ignore[arg-type]
                       at=at(minute), exit_code=code if kind == "done" else None)
        self.store.put(m.path, m.to_json())
        return m.path

    def deliver(self, path: str, minute: float) -> str:
        return self.svc.handle_marker(path, at(minute)).reason

    def boot_all(self, run_id: str = "r1", minute: float = 2, attempt: int = 1) -> None:
        for node in self.policy.node_names:
            self.deliver(self.write(run_id, node, "booted", minute, attempt), minute)

    def shepherd_starts(self) -> list[ShepherdCommand]:
        commands = [ShepherdCommand.from_json(d) for d in self.bus.on("shepherd")]
        return [c for c in commands if c.action == "start"]

    def last_audit(self) -> dict[str, object]:
        name = self.store.list(SWEEPS)[-1]
        blob = self.store.get(name)
        assert blob is not None
        return json.loads(blob.data)  # type: ignore[no-any-return]


# ---------------------------------------------------------------- the function dies


def test_crash_after_save_before_start_nodes_is_healed_by_the_next_sweep() -> None:
    rig = Rig(workers=2)
    rig.injector.force(Fault.CRASH)
    with pytest.raises(Crash, match="before start_nodes"):
        rig.svc.handle(req("r1"), at(0))
    assert rig.state().active is not None and rig.fleet.running() == set()
    assert rig.shepherd_starts() == []
    out = rig.svc.sweep(at(5))
    assert "re-issued start for worker-0, worker-1" in out.reason
    assert rig.fleet.running() == set(rig.policy.worker_vms)
    assert len(rig.shepherd_starts()) == 1
    assert set(rig.boots.values()) == {1}


def test_crash_after_save_before_start_nodes_is_healed_by_the_redelivery() -> None:
    rig = Rig(workers=2)
    rig.injector.force(Fault.CRASH)
    with pytest.raises(Crash):
        rig.svc.handle(req("r1"), at(0))
    out = rig.svc.handle(req("r1"), at(0.2))  # the trigger redelivers the request
    assert "re-issued the start of shepherd, worker-0, worker-1" in out.reason
    assert rig.fleet.running() == set(rig.policy.worker_vms)
    assert "re-issued start" not in rig.svc.sweep(at(5)).reason
    assert set(rig.boots.values()) == {1}


def test_crash_before_stop_nodes_of_the_last_done_marker_the_sweep_stops_the_orphans() -> None:
    rig = Rig()
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    rig.deliver(rig.write("r1", "worker-0", "done", 30), 30)
    rig.injector.force(Fault.CRASH)
    with pytest.raises(Crash):
        rig.deliver(rig.write("r1", "shepherd", "done", 31), 31)
    assert rig.state().recent[0].reason.value == "succeeded"
    assert rig.fleet.running() == {"pcp-tiny-worker-0"}
    out = rig.svc.sweep(at(35))
    assert "stopping orphan VMs pcp-tiny-worker-0" in out.reason
    assert rig.fleet.running() == set()


def test_crash_mid_commands_leaves_the_rest_to_the_sweeper() -> None:
    rig = Rig(workers=2)
    rig.svc.crash_next(1)  # after StartNodes, before the shepherd command
    with pytest.raises(Crash, match="before shepherd_start"):
        rig.svc.handle(req("r1"), at(0))
    assert rig.fleet.running() == set(rig.policy.worker_vms) and rig.shepherd_starts() == []
    out = rig.svc.sweep(at(5))
    assert "re-sent the start command to the shepherd" in out.reason
    assert "re-issued start" not in out.reason
    assert len(rig.shepherd_starts()) == 1


# ---------------------------------------------------------------- delivery faults


def test_duplicate_start_and_markers_boot_each_vm_once() -> None:
    rig = Rig(workers=3)
    for minute in (0, 0.1, 4):
        rig.svc.handle(req("r1"), at(minute))
    for _ in range(2):
        rig.boot_all(minute=5)
    assert rig.state().active is not None and rig.state().active.phase.value == "running"  # type: ignore[union-attr]
    assert len(rig.boots) == 3 and set(rig.boots.values()) == {1}
    # Each duplicate re-sent the shepherd its start: the same attempt, which it runs once.
    assert {(c.run_id, c.attempt) for c in rig.shepherd_starts()} == {("r1", 1)}


def test_done_delivered_before_booted_still_ends_the_run() -> None:
    rig = Rig()
    rig.svc.handle(req("r1"), at(0))
    booted = [rig.write("r1", n, "booted", 2) for n in rig.policy.node_names]
    done = [rig.write("r1", n, "done", 8) for n in rig.policy.node_names]
    for path in [*done, *booted]:  # reordered: every done first, the booted ones late
        rig.deliver(path, 9)
    assert rig.state().recent[0].reason.value == "succeeded"
    assert rig.fleet.running() == set()


def test_a_delayed_marker_of_an_earlier_attempt_is_ignored() -> None:
    rig = Rig(max_run_hours=1)
    rig.svc.handle(req("r1", max_restarts=1), at(0))
    rig.boot_all()
    rig.fleet.preempt("pcp-tiny-worker-0")
    assert "node_lost" in rig.svc.sweep(at(5)).reason
    assert rig.state().active is not None and rig.state().active.attempt == 2  # type: ignore[union-attr]
    # The shepherd of attempt 1 was told to stop; its done (SIGTERM) arrives late.
    late = rig.write("r1", "shepherd", "done", 6, attempt=1, code=143)
    assert "stale done marker from shepherd, attempt 1" in rig.deliver(late, 12)
    assert "stale" not in rig.svc.sweep(at(13)).reason  # the sweep skips it too
    assert rig.state().active is not None and rig.state().active.attempt == 2  # type: ignore[union-attr]
    assert rig.boots[("pcp-tiny-worker-0", "r1", 2)] == 1


def test_a_dropped_done_marker_is_found_by_the_sweep_and_the_run_ends() -> None:
    rig = Rig(workers=2)
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    rig.deliver(rig.write("r1", "shepherd", "done", 30), 30)
    rig.deliver(rig.write("r1", "worker-0", "done", 30), 30)
    rig.write("r1", "worker-1", "done", 30)  # the object is there, its event never comes
    assert rig.state().active is not None and len(rig.fleet.running()) == 2
    out = rig.svc.sweep(at(34))
    ended = [n for n in out.transition.notes if n.kind is NoteKind.RUN_ENDED]
    assert [(n.run_id, n.ended) for n in ended] == [("r1", Reason.SUCCEEDED)], out.reason
    assert rig.state().recent[0].reason.value == "succeeded"
    assert rig.fleet.running() == set()
    assert rig.last_audit()["markers"] == 6


def test_dropped_booted_markers_are_found_by_the_sweep_before_the_boot_timeout() -> None:
    rig = Rig(boot_timeout_minutes=10)
    rig.svc.handle(req("r1"), at(0))
    for node in rig.policy.node_names:
        rig.write("r1", node, "booted", 2)
    out = rig.svc.sweep(at(5))
    assert "every node booted" in out.reason
    assert "boot_timeout" not in rig.svc.sweep(at(15)).reason
    assert rig.state().active is not None and rig.state().active.phase.value == "running"  # type: ignore[union-attr]


# ---------------------------------------------------------------- transient errors


def test_a_storage_5xx_on_a_marker_is_retried_by_the_trigger() -> None:
    rig = Rig()
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    path = rig.write("r1", "worker-0", "done", 20, code=3)
    rig.injector.force(Fault.STORE_5XX)
    with pytest.raises(gexc.GoogleAPICallError):
        rig.deliver(path, 20)
    assert rig.state().active is not None  # nothing happened
    assert "worker-0 exited with code 3" in rig.deliver(path, 20.2)  # the redelivery
    assert rig.state().recent[0].reason.value == "failed" and rig.fleet.running() == set()


def test_a_storage_timeout_after_the_save_leaves_orphans_for_the_sweeper() -> None:
    rig = Rig()
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    rig.deliver(rig.write("r1", "shepherd", "done", 20), 20)
    path = rig.write("r1", "worker-0", "done", 20)
    rig.injector.force(Fault.STORE_TIMEOUT)  # the stack document is written, the reply lost
    with pytest.raises(gexc.DeadlineExceeded):
        rig.deliver(path, 20)
    assert "(succeeded): no-op" in rig.deliver(path, 20.2)  # the redelivery sees it ended
    assert rig.fleet.running() == {"pcp-tiny-worker-0"}  # nobody ran StopNodes
    run = json.loads(rig.store.get(run_doc("r1")).data)  # type: ignore[union-attr]
    assert run["status"] == "starting"  # nor ArchiveRun: stack.json's recent is the record
    assert "stopping orphan VMs" in rig.svc.sweep(at(25)).reason
    assert rig.fleet.running() == set()
    assert rig.state().recent[0].reason.value == "succeeded"


def test_a_compute_5xx_on_start_is_healed_by_the_sweep() -> None:
    rig = Rig(workers=2)
    rig.injector.force(Fault.FLEET_5XX)
    with pytest.raises(gexc.GoogleAPICallError):
        rig.svc.handle(req("r1"), at(0))
    assert len(rig.shepherd_starts()) == 1  # the other commands still ran
    assert json.loads(rig.store.get(run_doc("r1")).data)["status"] == "starting"  # type: ignore[union-attr]
    assert "re-issued start for worker-0, worker-1" in rig.svc.sweep(at(5)).reason
    assert rig.fleet.running() == set(rig.policy.worker_vms)


def test_a_compute_timeout_after_the_start_took_effect_boots_nothing_twice() -> None:
    rig = Rig(workers=2)
    rig.injector.force(Fault.FLEET_TIMEOUT)
    with pytest.raises(gexc.DeadlineExceeded):
        rig.svc.handle(req("r1"), at(0))
    rig.svc.handle(req("r1"), at(0.2))
    out = rig.svc.sweep(at(5))
    assert "re-issued start" not in out.reason
    assert set(rig.boots.values()) == {1} and len(rig.boots) == 2


def test_a_partial_start_is_completed_by_the_sweep() -> None:
    rig = Rig(workers=4)
    rig.injector.force(Fault.FLEET_PARTIAL)
    with pytest.raises(gexc.DeadlineExceeded, match="of 4 VMs started"):
        rig.svc.handle(req("r1"), at(0))
    started = len(rig.fleet.running())
    assert 1 <= started < 4
    assert "re-issued start for" in rig.svc.sweep(at(5)).reason
    assert rig.fleet.running() == set(rig.policy.worker_vms)
    assert len(rig.boots) == 4 and set(rig.boots.values()) == {1}


def test_a_pubsub_5xx_on_the_shepherd_command_is_re_sent_by_the_sweep() -> None:
    rig = Rig()
    rig.injector.force(Fault.BUS_5XX)
    with pytest.raises(gexc.GoogleAPICallError):
        rig.svc.handle(req("r1"), at(0))
    assert rig.shepherd_starts() == [] and rig.fleet.running() == {"pcp-tiny-worker-0"}
    assert "re-sent the start command" in rig.svc.sweep(at(5)).reason
    assert len(rig.shepherd_starts()) == 1


def test_a_pubsub_timeout_after_publish_only_duplicates_an_idempotent_command() -> None:
    rig = Rig()
    rig.injector.force(Fault.BUS_TIMEOUT)
    with pytest.raises(gexc.DeadlineExceeded):
        rig.svc.handle(req("r1"), at(0))
    rig.svc.sweep(at(5))
    starts = rig.shepherd_starts()
    assert len(starts) == 2 and {(c.run_id, c.attempt) for c in starts} == {("r1", 1)}


# ---------------------------------------------------------------- Compute and the nodes


def test_zone_exhausted_fails_the_run_in_plain_words_and_the_queue_moves_on() -> None:
    rig = Rig()
    rig.injector.force(Fault.CAPACITY)
    out = rig.svc.handle(req("r1"), at(0))
    assert any("ZONE_RESOURCE_POOL_EXHAUSTED" in e for e in out.errors)
    line = rig.state().recent[0]
    assert line.status.value == "failed" and "could not start the VMs" in line.detail
    assert rig.fleet.running() == set()
    rig.svc.handle(req("r2"), at(1))
    assert rig.fleet.running() == {"pcp-tiny-worker-0"}


def test_a_preempted_vm_fails_the_attempt_fast_and_the_next_attempt_boots() -> None:
    rig = Rig(workers=2)
    rig.svc.handle(req("r1", max_restarts=1), at(0))
    rig.boot_all()
    rig.fleet.preempt("pcp-tiny-worker-1")
    out = rig.svc.sweep(at(10))
    assert "node_lost: worker-1 lost: VM pcp-tiny-worker-1 is TERMINATED" in out.reason
    assert rig.fleet.running() == set(rig.policy.worker_vms)
    assert {v.labels[LABEL_ATTEMPT] for v in rig.fleet.vms.values()} == {"2"}
    assert rig.boots[("pcp-tiny-worker-1", "r1", 1)] == 1
    assert rig.boots[("pcp-tiny-worker-1", "r1", 2)] == 1


def test_a_shepherd_that_never_boots_is_re_sent_its_start_then_times_out() -> None:
    rig = Rig(boot_timeout_minutes=10)
    rig.svc.handle(req("r1"), at(0))
    rig.deliver(rig.write("r1", "worker-0", "booted", 2), 2)
    assert "re-sent the start command" in rig.svc.sweep(at(5)).reason
    out = rig.svc.sweep(at(10))
    assert "boot_timeout: shepherd did not boot within 10 min" in out.reason
    assert rig.fleet.running() == set()


def test_a_shepherd_that_dies_after_booting_never_writes_done_and_the_deadline_ends_it() -> None:
    rig = Rig(workers=2, max_run_hours=1)
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    for node in ("worker-0", "worker-1"):
        rig.deliver(rig.write("r1", node, "done", 30), 30)
    assert rig.state().active is not None
    assert "deadline" not in rig.svc.sweep(at(55)).reason
    out = rig.svc.sweep(at(60))
    assert "timed_out" in out.reason and rig.fleet.running() == set()
    stops = [c for c in (ShepherdCommand.from_json(d) for d in rig.bus.on("shepherd"))
             if c.action == "stop"]
    assert stops and stops[-1].run_id == "r1"


def test_a_hung_worker_agent_writes_nothing_and_the_deadline_ends_the_run() -> None:
    rig = Rig(max_run_hours=1)
    rig.svc.handle(req("r1"), at(0))
    rig.deliver(rig.write("r1", "shepherd", "booted", 1), 1)
    rig.deliver(rig.write("r1", "worker-0", "booted", 1), 1)  # then the agent hangs
    rig.deliver(rig.write("r1", "shepherd", "done", 20), 20)
    for minute in range(25, 60, 5):
        assert rig.svc.sweep(at(minute)).commands == ()
    assert "timed_out" in rig.svc.sweep(at(60)).reason
    assert rig.fleet.running() == set()


def test_a_non_zero_exit_fails_fast_and_stops_every_node() -> None:
    rig = Rig(workers=3)
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    out = rig.deliver(rig.write("r1", "worker-2", "done", 12, code=137), 12)
    assert "failed: worker-2 exited with code 137" in out and rig.fleet.running() == set()


# ---------------------------------------------------------------- the stack document


def test_stack_document_deleted_mid_run_the_sweep_stops_every_vm_and_audits_it() -> None:
    rig = Rig(workers=3)
    rig.svc.handle(req("r1"), at(0))
    rig.svc.handle(req("r2"), at(1))
    rig.boot_all()
    rig.store.delete(STACK_DOC)
    out = rig.svc.sweep(at(5))
    assert "stack state was lost" in out.reason and rig.fleet.running() == set()
    audit = rig.last_audit()
    assert audit["state_lost"] is True
    assert {v["status"] for v in audit["vms"]} == {"RUNNING"}  # type: ignore[union-attr]
    assert audit["actions"][0]["command"] == "stop_nodes"  # type: ignore[index]
    # By design the queue died with the document: r2 is nowhere, r1 only in its run record.
    assert rig.state().find("r2") is None and rig.store.get(run_doc("r2")) is None
    assert json.loads(rig.store.get(run_doc("r1")).data)["status"] == "starting"  # type: ignore[union-attr]


def test_stack_document_deleted_during_a_lease_keeps_labelled_vms_for_one_sweep() -> None:
    rig = Rig(keep_alive_hours=1)
    rig.svc.handle(req("r1", keep_vm_alive=True), at(0))
    rig.boot_all()
    for node in rig.policy.node_names:
        rig.deliver(rig.write("r1", node, "done", 10), 10)
    vm = rig.fleet.vms["pcp-tiny-worker-0"]
    assert vm.status == "RUNNING" and LABEL_KEEP_ALIVE in vm.labels
    rig.store.delete(STACK_DOC)
    out = rig.svc.sweep(at(15))
    assert rig.last_audit()["state_lost"] is True and out.commands == ()
    assert vm.status == "RUNNING"  # the label is the only record of the lease
    out = rig.svc.sweep(at(20))  # the fresh document holds no lease: stop, on the safe side
    assert "stopping orphan VMs" in out.reason and vm.status == "TERMINATED"


def test_a_redelivered_start_after_the_document_was_lost_runs_the_request_again() -> None:
    """Dedupe lives in the document: losing it forgets finished runs (counted as re-runs)."""
    rig = Rig()
    rig.svc.handle(req("r1"), at(0))
    rig.boot_all()
    for node in rig.policy.node_names:
        rig.deliver(rig.write("r1", node, "done", 10), 10)
    rig.store.delete(STACK_DOC)
    rig.svc.handle(StartRequest(run_id="r1"), at(20))
    assert rig.fleet.vms["pcp-tiny-worker-0"].labels[LABEL_RUN] == "r1"
    assert rig.boots[("pcp-tiny-worker-0", "r1", 1)] == 2
    assert rig.state().active is not None and rig.state().active.started_at == at(20)  # type: ignore[union-attr]
