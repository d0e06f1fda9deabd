"""decide(): tables of (state, event, now) -> transition for every event and phase."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pcp.core.commands import ArchiveRun, CommandShepherd, LabelNodes, StartNodes, StopNodes
from pcp.core.events import Reconcile, Rejected, StartFailed, VmView
from pcp.core.lifecycle import late_markers
from pcp.core.messages import StopRequest
from pcp.core.names import LABEL_KEEP_ALIVE
from pcp.core.state import NodePhase, Phase, Reason, Run, StackState, Status
from tests.core.helpers import Stack, at, kinds, marker, of, policy, req

pytestmark = pytest.mark.core


# ---------------------------------------------------------------- start requests


def test_start_on_idle_stack_starts_every_node() -> None:
    s = Stack(policy(workers=3))
    t = s(req("r1"))
    assert kinds(t) == ["StartNodes", "CommandShepherd", "ArchiveRun"]
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes)
    assert start.vms == ("pcp-tiny-worker-0", "pcp-tiny-worker-1", "pcp-tiny-worker-2")
    assert [a.rank for a in start.assignments] == [1, 2, 3]
    assert {a.num_nodes for a in start.assignments} == {4}
    assert start.deadline == at(6 * 60)
    shepherd = of(t, CommandShepherd)[0]
    assert isinstance(shepherd, CommandShepherd)
    assert shepherd.command.assignment is not None and shepherd.command.assignment.rank == 0
    assert s.state.active is not None and s.state.active.status is Status.STARTING
    assert "accepted" in t.reason and "starting" in t.reason


@pytest.mark.parametrize(("requested", "default", "expected"), [
    (None, "all-nodes", "all-nodes"), (None, "workers-only", "workers-only"),
    ("workers-only", "all-nodes", "workers-only"), ("all-nodes", "workers-only", "all-nodes")])
def test_the_layout_comes_from_the_request_else_the_stack(
        requested: str | None, default: str, expected: str) -> None:
    t = Stack(policy(workers=2, default_layout=default))(req("r1", layout=requested))
    start, shepherd = of(t, StartNodes)[0], of(t, CommandShepherd)[0]
    assert isinstance(start, StartNodes) and isinstance(shepherd, CommandShepherd)
    assert shepherd.command.assignment is not None
    layouts = {a.layout for a in (*start.assignments, shepherd.command.assignment)}
    assert layouts == {expected}


def test_start_while_busy_queues_fifo() -> None:
    s = Stack()
    s(req("r1"))
    t2 = s(req("r2"))
    t3 = s(req("r3"))
    assert kinds(t2) == [] and kinds(t3) == []
    assert [r.run_id for r in s.state.queue] == ["r2", "r3"]
    assert "queue position 2" in t3.reason
    assert s.state.queue_position("r3") == 2


def test_duplicate_start_of_a_starting_run_reissues_what_has_not_booted() -> None:
    s = Stack(policy(workers=2))
    s(req("r1"))
    s(marker("r1", "worker-1", "booted"))
    before = s.state
    t = s(req("r1"))
    assert t.state == before
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes) and start.vms == ("pcp-tiny-worker-0",)
    assert kinds(t) == ["StartNodes", "CommandShepherd"]
    assert "re-issued the start of shepherd, worker-0" in t.reason


def test_a_rejected_run_id_can_be_reused_by_a_corrected_request() -> None:
    s = Stack()
    s(Rejected("exp-1", "training_config has unbalanced quotes"))
    t = s(req("exp-1"))
    assert "run exp-1 accepted" in t.reason
    assert s.state.active is not None and s.state.active.run_id == "exp-1"
    assert all(r.run_id != "exp-1" for r in s.state.recent)


@pytest.mark.parametrize("phase", ["running", "queued", "ended"])
def test_duplicate_start_is_a_noop(phase: str) -> None:
    s = Stack()
    s(req("r0"))
    if phase == "running":
        run = "r0"
        s.boot_all("r0")
    elif phase == "queued":
        run = "r1"
        s(req("r1"))
    else:
        run = "r0"
        s.boot_all("r0")
        s.finish_all("r0")
    before = s.state
    t = s(req(run))
    assert t.state == before and t.commands == ()
    assert f"duplicate start request for run {run}" in t.reason


def test_max_hours_is_capped_by_the_stack() -> None:
    s = Stack(policy(max_run_hours=6))
    t = s(req("r1", max_hours=10.0))
    assert "max_hours 10 capped to the stack limit 6" in t.reason
    assert s.state.active is not None and s.state.active.deadline == at(360)
    s2 = Stack()
    s2(req("r1", max_hours=0.5))
    assert s2.state.active is not None and s2.state.active.deadline == at(30)


@pytest.mark.parametrize(
    ("request_fields", "policy_fields", "fragment"),
    [
        ({"stack": "small"}, {}, "start request is for stack 'small', but this is stack 'tiny'"),
        ({}, {"default_binary": None}, "no binary"),
    ],
)
def test_start_rejections(request_fields: dict[str, object], policy_fields: dict[str, object],
                          fragment: str) -> None:
    s = Stack(policy(**policy_fields))
    t = s(req("r1", **request_fields))
    assert fragment in t.reason
    assert kinds(t) == ["ArchiveRun"]
    assert s.state.active is None and s.state.recent[0].status is Status.REJECTED
    assert fragment in s.state.recent[0].detail


def test_full_queue_rejects() -> None:
    s = Stack(policy(max_queue=2))
    for i in range(3):
        s(req(f"r{i}"))
    t = s(req("r9"))
    assert "queue of stack tiny is full (2 runs waiting)" in t.reason
    assert s.state.find("r9") is not None and s.state.find("r9").status is Status.REJECTED


def test_rejected_event_is_recorded_once() -> None:
    s = Stack()
    t = s(Rejected("run-55", "start request is not valid JSON"))
    assert kinds(t) == ["ArchiveRun"]
    archived = of(t, ArchiveRun)[0]
    assert isinstance(archived, ArchiveRun) and archived.run.status is Status.REJECTED
    again = s(Rejected("run-55", "start request is not valid JSON"))
    assert again.commands == () and "no-op" in again.reason


# ---------------------------------------------------------------- markers


def test_all_booted_makes_the_run_running() -> None:
    s = Stack(policy(workers=2))
    s(req("r1"))
    s(marker("r1", "worker-0", "booted"))
    s(marker("r1", "worker-1", "booted"))
    assert s.state.active is not None and s.state.active.phase is Phase.STARTING
    t = s(marker("r1", "shepherd", "booted"))
    assert "every node booted, run is running" in t.reason
    assert s.state.active.phase is Phase.RUNNING


def test_all_done_with_zero_succeeds_and_stops_vms() -> None:
    s = Stack(policy(workers=2))
    s(req("r1"))
    s.boot_all()
    s(marker("r1", "worker-0", "done", 30))
    s(marker("r1", "worker-1", "done", 30))
    t = s(marker("r1", "shepherd", "done", 60), minute=60)
    assert "succeeded: all 3 nodes exited with code 0" in t.reason
    stop = of(t, StopNodes)[0]
    assert isinstance(stop, StopNodes) and stop.vms == ("pcp-tiny-worker-0", "pcp-tiny-worker-1")
    archived = of(t, ArchiveRun)[0]
    assert isinstance(archived, ArchiveRun)
    assert archived.run.status is Status.SUCCEEDED
    # Two workers at $1/h and the shepherd at $0.5/h for one hour.
    assert archived.run.cost_usd == pytest.approx(2.5)
    assert s.state.active is None and s.state.recent[0].reason is Reason.SUCCEEDED


def test_nonzero_exit_fails_fast_and_stops_everything() -> None:
    s = Stack(policy(workers=3))
    s(req("r1"))
    s.boot_all()
    t = s(marker("r1", "worker-1", "done", 5, code=3), minute=5)
    assert "run r1 failed: worker-1 exited with code 3" in t.reason
    assert "StopNodes" in kinds(t)
    shepherd_stop = of(t, CommandShepherd)[0]
    assert isinstance(shepherd_stop, CommandShepherd)
    assert shepherd_stop.command.action == "stop"
    assert s.state.recent[0].status is Status.FAILED


def test_killed_by_signal_fails() -> None:
    s = Stack()
    s(req("r1"))
    s.boot_all()
    t = s(marker("r1", "worker-0", "done", 5, code=None, signal="SIGKILL"))
    assert "worker-0 exited on signal SIGKILL" in t.reason


def test_done_before_booted_counts_as_booted() -> None:
    s = Stack()
    s(req("r1"))
    s(marker("r1", "worker-0", "done", 3))
    node = s.state.active.node("worker-0") if s.state.active else None
    assert node is not None and node.phase is NodePhase.DONE and node.booted_at == at(3)


@pytest.mark.parametrize(
    ("event", "fragment"),
    [
        (marker("r1", "worker-0", "booted"), "duplicate booted marker from worker-0"),
        (marker("zz", "worker-0", "done"), "for run zz (unknown): no-op"),
        (marker("r1", "worker-0", "done", attempt=2), "stale done marker from worker-0, attempt 2"),
        (marker("r1", "worker-5", "done"), "worker-5, which is not a node of run r1"),
    ],
)
def test_markers_that_change_nothing(event: object, fragment: str) -> None:
    s = Stack()
    s(req("r1"))
    s(marker("r1", "worker-0", "booted"))
    before = s.state
    t = s(event)
    assert t.state == before and t.commands == ()
    assert fragment in t.reason


def test_late_marker_for_archived_run_is_a_noop() -> None:
    s = Stack()
    s(req("r1"))
    s.boot_all()
    s.finish_all()
    before = s.state
    t = s(marker("r1", "worker-0", "done", 9, code=1))
    assert t.state == before and t.commands == ()
    assert "(succeeded): no-op" in t.reason


def ended_after_a_failure() -> tuple[Stack, Run]:
    """worker-1 fails; worker-0 and the shepherd are still running when the run ends."""
    s = Stack(policy(workers=2))
    s(req("r1"))
    s.boot_all()
    s(marker("r1", "worker-1", "done", 5, code=3), minute=5)
    ended = s.state.unarchived[-1]
    assert ended.phase is Phase.ENDED and ended.node("worker-0").phase is NodePhase.BOOTED
    return s, ended


def test_late_done_markers_fill_in_the_exit_codes_of_an_ended_run() -> None:
    s, ended = ended_after_a_failure()
    late = (marker("r1", "worker-0", "done", 6, code=None, signal="SIGTERM"),
            marker("r1", "shepherd", "done", 7, code=143))
    updated = late_markers(ended, late)
    assert updated is not None
    assert [(n.name, n.phase, n.exit_code, n.signal) for n in updated.nodes] == [
        ("shepherd", NodePhase.DONE, 143, None), ("worker-0", NodePhase.DONE, None, "SIGTERM"),
        ("worker-1", NodePhase.DONE, 3, None)]
    assert updated.node("shepherd").done_at == at(7)
    # The outcome stays: reason, detail, status, end time and history are untouched.
    assert (updated.reason, updated.detail, updated.status, updated.ended_at,
            updated.history) == (ended.reason, ended.detail, ended.status, ended.ended_at,
                                 ended.history)
    assert updated.status is Status.FAILED
    # decide() itself leaves the stack alone: the late marker changes no decision.
    before = s.state
    t = s(late[0], minute=6)
    assert t.state == before and t.commands == ()


def test_late_markers_never_replace_a_recorded_exit_or_cross_attempts() -> None:
    _, ended = ended_after_a_failure()
    assert late_markers(ended, (marker("r1", "worker-1", "done", 9, code=0),)) is None
    assert late_markers(ended, (marker("r1", "worker-0", "done", 9, attempt=2),)) is None
    assert late_markers(ended, (marker("r2", "worker-0", "done", 9),)) is None
    assert late_markers(ended, (marker("r1", "worker-9", "done", 9),)) is None
    assert late_markers(ended, ()) is None
    # Two done markers for one node (a redelivery): the first written wins.
    twice = late_markers(ended, (marker("r1", "worker-0", "done", 8, code=2),
                                 marker("r1", "worker-0", "done", 6, code=143)))
    assert twice is not None and twice.node("worker-0").exit_code == 143


def test_late_markers_leave_a_live_run_to_decide() -> None:
    s = Stack()
    s(req("r1"))
    s.boot_all()
    assert s.state.active is not None
    assert late_markers(s.state.active, (marker("r1", "worker-0", "done", 5),)) is None


# ---------------------------------------------------------------- stop requests


def test_stop_active_run_cancels_and_stops_nodes() -> None:
    s = Stack()
    s(req("r1"))
    t = s(StopRequest("r1", "workflow cancelled", "ci"))
    assert "run r1 cancelled: workflow cancelled (by ci)" in t.reason
    assert "StopNodes" in kinds(t)
    assert s.state.recent[0].status is Status.CANCELLED


def test_stop_queued_run_removes_it_from_the_queue() -> None:
    s = Stack()
    s(req("r1"))
    s(req("r2"))
    s(req("r3"))
    t = s(StopRequest("r2"))
    assert "removed from the queue at position 1" in t.reason
    assert [r.run_id for r in s.state.queue] == ["r3"]
    assert kinds(t) == ["ArchiveRun"]
    assert s.state.find("r2") is not None and s.state.find("r2").status is Status.CANCELLED


def test_stop_unknown_run_is_rejected_clearly() -> None:
    s = Stack()
    t = s(StopRequest("ghost"))
    assert t.commands == () and t.state == StackState()
    assert "rejected stop: unknown run 'ghost'" in t.reason


def test_stop_after_end_is_a_noop() -> None:
    s = Stack()
    s(req("r1"))
    s(StopRequest("r1"))
    t = s(StopRequest("r1"))
    assert t.commands == () and "already cancelled" in t.reason


def test_stop_starts_the_next_queued_run() -> None:
    s = Stack()
    s(req("r1"))
    s(req("r2"))
    t = s(StopRequest("r1"))
    assert kinds(t)[:2] == ["CommandShepherd", "StopNodes"]
    assert "StartNodes" in kinds(t)
    assert s.state.active is not None and s.state.active.run_id == "r2"
    # the stop of r1 is issued before the start of r2, so the VMs boot clean
    assert kinds(t).index("StopNodes") < kinds(t).index("StartNodes")


# ---------------------------------------------------------------- time


def test_boot_timeout_ends_the_run() -> None:
    s = Stack(policy(workers=2, boot_timeout_minutes=10))
    s(req("r1"))
    s(marker("r1", "worker-0", "booted", 2))
    s(marker("r1", "shepherd", "booted", 2))
    assert s(s.vms(), minute=9.9).commands == ()
    t = s(s.vms(), minute=10)
    assert "boot_timeout: worker-1 did not boot within 10 min" in t.reason
    assert s.state.recent[0].reason is Reason.BOOT_TIMEOUT


def test_deadline_times_out_and_ignores_keep_alive() -> None:
    s = Stack()
    s(req("r1", max_hours=1.0, keep_vm_alive=True))
    s.boot_all()
    t = s(s.vms(), minute=60)
    assert "timed_out" in t.reason and "StopNodes" in kinds(t)
    assert s.state.lease is None


def test_timers_fire_on_any_event_not_only_sweeps() -> None:
    s = Stack()
    s(req("r1", max_hours=1.0))
    s.boot_all()
    t = s(req("r2"), minute=61)
    assert "r1 timed_out" in t.reason
    assert s.state.active is not None and s.state.active.run_id == "r2"


# ---------------------------------------------------------------- keep-alive


def test_keep_alive_leases_vms_then_sweeper_stops_them() -> None:
    s = Stack(policy(keep_alive_hours=2))
    s(req("r1", keep_vm_alive=True))
    s.boot_all()
    t = s(marker("r1", "worker-0", "done", 10), minute=10)
    t = s(marker("r1", "shepherd", "done", 10), minute=10)
    assert "StopNodes" not in kinds(t)
    label = of(t, LabelNodes)[0]
    assert isinstance(label, LabelNodes)
    assert dict(label.labels)[LABEL_KEEP_ALIVE] == str(int(at(130).timestamp()))
    assert s.state.lease is not None and s.state.lease.until == at(130)
    assert s(s.vms(run_id="r1"), minute=129).commands == ()
    t = s(s.vms(run_id="r1"), minute=130)
    assert "keep-alive lease of run r1 ended" in t.reason and "StopNodes" in kinds(t)
    assert s.state.lease is None


def test_keep_alive_never_outlives_the_deadline() -> None:
    s = Stack(policy(keep_alive_hours=2))
    s(req("r1", keep_vm_alive=True, max_hours=1.0))
    s.boot_all()
    s.finish_all(minute=50)
    assert s.state.lease is not None and s.state.lease.until == at(60)


def test_next_run_takes_over_kept_alive_vms() -> None:
    s = Stack()
    s(req("r1", keep_vm_alive=True))
    s.boot_all()
    s.finish_all()
    t = s(req("r2"), minute=5)
    assert "taken over by run r2" in t.reason and s.state.lease is None
    assert "StartNodes" in kinds(t)


def test_stop_ends_a_lease_early() -> None:
    s = Stack()
    s(req("r1", keep_vm_alive=True))
    s.boot_all()
    s.finish_all()
    t = s(StopRequest("r1", "done debugging"), minute=5)
    assert "ended early" in t.reason and kinds(t) == ["StopNodes"]
    assert s.state.lease is None


def test_cancel_does_not_keep_vms_alive() -> None:
    s = Stack()
    s(req("r1", keep_vm_alive=True))
    t = s(StopRequest("r1"))
    assert "StopNodes" in kinds(t) and s.state.lease is None


# ---------------------------------------------------------------- reconcile


def test_lost_node_fails_fast() -> None:
    s = Stack(policy(workers=2))
    s(req("r1"))
    s.boot_all()
    ours = {"pcp-run": "r1", "pcp-attempt": "1"}
    obs = Reconcile(vms=(VmView("pcp-tiny-worker-0", "RUNNING", ours),
                         VmView("pcp-tiny-worker-1", "TERMINATED", ours)))
    t = s(obs, minute=5)
    assert "node_lost: worker-1 lost: VM pcp-tiny-worker-1 is TERMINATED" in t.reason
    assert kinds(t).count("StopNodes") == 1


def test_vm_that_stops_before_booting_is_started_again_until_the_boot_timeout() -> None:
    s = Stack(policy(boot_timeout_minutes=10))
    s(req("r1"))
    s(marker("r1", "shepherd", "booted"))
    t = s(s.vms("TERMINATED"), minute=2)
    assert kinds(t) == ["StartNodes"] and "re-issued start for worker-0" in t.reason
    t = s(s.vms("TERMINATED"), minute=10)
    assert "boot_timeout: worker-0 did not boot within 10 min" in t.reason


def test_reconcile_applies_markers_whose_events_were_lost() -> None:
    s = Stack()
    s(req("r1"))
    markers = tuple(marker("r1", n, k, 2) for n in ("shepherd", "worker-0")
                    for k in ("booted", "done"))
    t = s(Reconcile(vms=s.vms().vms, markers=markers), minute=3)
    assert "succeeded" in t.reason
    assert s.state.recent[0].status is Status.SUCCEEDED


def test_done_marker_seen_before_the_vm_powered_off_is_not_a_lost_node() -> None:
    s = Stack()
    s(req("r1"))
    s.boot_all()
    obs = Reconcile(vms=s.vms("TERMINATED").vms,
                    markers=(marker("r1", "worker-0", "done", 4),))
    t = s(obs, minute=5)
    assert "node_lost" not in t.reason
    assert s.state.active is not None and s.state.active.node("worker-0").phase is NodePhase.DONE


def test_reconcile_reissues_a_start_lost_between_save_and_execute() -> None:
    s = Stack()
    s(req("r1"))
    t = s(s.vms("TERMINATED", run_id=None), minute=1)
    assert kinds(t) == ["StartNodes", "CommandShepherd"]
    assert "re-issued start for worker-0" in t.reason
    assert "re-sent the start command to the shepherd" in t.reason


def test_reconcile_does_not_restart_booting_vms() -> None:
    s = Stack()
    s(req("r1"))
    s(marker("r1", "shepherd", "booted"))
    t = s(s.vms("STAGING"), minute=1)
    assert t.commands == ()


def test_orphans_are_stopped() -> None:
    s = Stack(policy(workers=2))
    t = s(Reconcile(vms=(VmView("pcp-tiny-worker-0", "RUNNING", {}),
                         VmView("pcp-tiny-worker-1", "TERMINATED", {}),
                         VmView("pcp-tiny-worker-7", "STAGING", {}))))
    stop = of(t, StopNodes)[0]
    assert isinstance(stop, StopNodes)
    assert stop.vms == ("pcp-tiny-worker-0", "pcp-tiny-worker-7")
    assert "no run or lease holds it" in t.reason


def test_lost_state_respects_labelled_leases_only() -> None:
    s = Stack(policy(workers=2))
    future = str(int(at(30).timestamp()))
    past = str(int(at(-30).timestamp()))
    obs = Reconcile(vms=(VmView("pcp-tiny-worker-0", "RUNNING", {LABEL_KEEP_ALIVE: future}),
                         VmView("pcp-tiny-worker-1", "RUNNING", {LABEL_KEEP_ALIVE: past,
                                                                 "pcp-run": "r9"})),
                    state_lost=True)
    t = s(obs)
    stop = of(t, StopNodes)[0]
    assert isinstance(stop, StopNodes) and stop.vms == ("pcp-tiny-worker-1",)
    assert "stack state was lost" in t.reason


# ---------------------------------------------------------------- restarts and failures


def test_node_lost_with_restarts_left_runs_again_at_the_head_of_the_queue() -> None:
    s = Stack()
    s(req("r1", max_restarts=1))
    s(req("r2"))
    s.boot_all()
    t = s(s.vms("TERMINATED"), minute=5)
    assert "will restart as attempt 2" in t.reason
    active = s.state.active
    assert active is not None and active.run_id == "r1" and active.attempt == 2
    assert [r.run_id for r in s.state.queue] == ["r2"]
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes) and start.attempt == 2
    # markers from the first attempt no longer count
    t = s(marker("r1", "worker-0", "done", 6, code=1, attempt=1), minute=6)
    assert "stale done marker" in t.reason
    # the second loss is final
    s(marker("r1", "worker-0", "booted", 7, attempt=2), minute=7)
    s(marker("r1", "shepherd", "booted", 7, attempt=2), minute=7)
    t = s(s.vms("TERMINATED"), minute=8)
    assert "node_lost" in t.reason and "restart" not in t.reason
    assert s.state.find("r1") is not None and s.state.find("r1").status is Status.FAILED
    assert s.state.active is not None and s.state.active.run_id == "r2"


def test_boot_timeout_restarts_too() -> None:
    s = Stack(policy(boot_timeout_minutes=5))
    s(req("r1", max_restarts=2))
    s(s.vms(), minute=5)
    s(s.vms(), minute=10)
    assert s.state.active is not None and s.state.active.attempt == 3
    t = s(s.vms(), minute=15)
    assert "boot_timeout" in t.reason and s.state.active is None
    assert s.state.recent[0].run_id == "r1" and s.state.recent[0].reason is Reason.BOOT_TIMEOUT


def test_failure_is_not_restarted() -> None:
    s = Stack()
    s(req("r1", max_restarts=3))
    s.boot_all()
    s(marker("r1", "worker-0", "done", 3, code=2))
    assert s.state.active is None and s.state.recent[0].status is Status.FAILED


def test_start_failure_ends_the_run_with_the_plain_reason() -> None:
    s = Stack()
    s(req("r1"))
    s(req("r2"))
    t = s(StartFailed("r1", 1, "no capacity for nvidia-tesla-t4 in us-central1-a"))
    assert "could not start the VMs: no capacity for nvidia-tesla-t4" in t.reason
    assert s.state.active is not None and s.state.active.run_id == "r2"
    stale = s(StartFailed("r1", 1, "again"))
    assert stale.commands == () and "stale" in stale.reason


# ---------------------------------------------------------------- records


def test_sweep_rewrites_a_run_record_whose_write_was_lost_then_forgets_it() -> None:
    s = Stack()
    s(req("r1"))
    s(req("r2"))
    s(StopRequest("r1"))
    s(StopRequest("r2"))
    assert [r.run_id for r in s.state.unarchived] == ["r1", "r2"]
    t = s(Reconcile(vms=s.vms("TERMINATED").vms, archived=frozenset({"r2"})), minute=5)
    rewritten = of(t, ArchiveRun)
    assert [c.run.run_id for c in rewritten if isinstance(c, ArchiveRun)] == ["r1"]
    assert "re-wrote the record of r1" in t.reason
    assert [r.run_id for r in s.state.unarchived] == ["r1"]
    s(Reconcile(vms=s.vms("TERMINATED").vms, archived=frozenset({"r1"})), minute=10)
    assert s.state.unarchived == ()


def test_history_records_every_change_with_its_reason() -> None:
    s = Stack()
    s(req("r1"))
    s.boot_all()
    t = s(marker("r1", "worker-0", "done", 3, code=4), minute=3)
    run = of(t, ArchiveRun)[0]
    assert isinstance(run, ArchiveRun)
    changes = [h.change for h in run.run.history]
    assert changes == ["-> queued", "queued -> starting", "starting -> running",
                       "running -> ended"]
    assert run.run.history[-1].reason == "failed: worker-0 exited with code 4"


def test_status_is_derived_from_the_reason_for_every_reason() -> None:
    s = Stack()
    s(req("r1"))
    assert s.state.active is not None
    for reason in Reason:
        ended = replace(s.state.active, phase=Phase.ENDED, reason=reason)
        assert ended.status.value in {"succeeded", "failed", "cancelled", "rejected"}


def test_recent_is_bounded() -> None:
    s = Stack(policy(recent_limit=3))
    for i in range(5):
        s(req(f"r{i}"))
        s(StopRequest(f"r{i}"))
    assert [r.run_id for r in s.state.recent] == ["r4", "r3", "r2"]


def test_state_round_trips_through_json() -> None:
    s = Stack(policy(workers=2))
    s(req("r1", keep_vm_alive=True))
    s(req("r2"))
    s.boot_all()
    s(Rejected("bad-1", "not JSON"))
    assert StackState.from_json(s.state.to_json()) == s.state
    s.finish_all()
    assert StackState.from_json(s.state.to_json()) == s.state


def test_a_vm_in_its_first_boot_is_left_to_finish() -> None:
    """Created RUNNING by `pulumi up` minutes ago and never given a run: the sweeper does not
    interrupt its bootstrap; once the grace is over, or once it has had a run, it is an orphan
    like any other."""
    s = Stack(policy(workers=3))
    minute = 60
    t0 = int(at(0).timestamp())
    vms = (VmView("pcp-tiny-worker-0", "RUNNING", {}, created=t0 - 10 * minute),
           VmView("pcp-tiny-worker-1", "RUNNING", {"pcp-run": "r0"}, created=t0 - 10 * minute),
           VmView("pcp-tiny-worker-2", "RUNNING", {}, created=t0 - 31 * minute))
    t = s(Reconcile(vms=vms))
    stop = of(t, StopNodes)[0]
    assert isinstance(stop, StopNodes)
    assert stop.vms == ("pcp-tiny-worker-1", "pcp-tiny-worker-2")
    assert "left pcp-tiny-worker-0 running: never given a run and created less than 30 min " \
        "ago (first boot)" in t.reason
    later = s(Reconcile(vms=vms[:1]), minute=21)
    assert [c.vms for c in of(later, StopNodes)] == [("pcp-tiny-worker-0",)]
