"""Service: load, decide, save under a generation check, execute; over the in-memory twins."""

from __future__ import annotations

import json
import threading

import pytest

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.core.errors import Conflict, PermanentError
from pcp.core.messages import NodeMarker, ShepherdCommand, StopRequest
from pcp.core.names import STACK_DOC, run_doc, summary_doc
from pcp.core.policy import Policy
from pcp.core.state import StackState, Status
from pcp.service import ConflictExhausted, Service
from tests.core.helpers import at, marker, policy, req

pytestmark = pytest.mark.service


def make(p: Policy | None = None) -> tuple[Service, MemoryStore, MemoryFleet, MemoryBus]:
    p = p or policy()
    store, fleet, bus = MemoryStore(), MemoryFleet(p.stack, p.worker_vms), MemoryBus()
    return Service(store, fleet, bus, p, sleep=lambda _: None), store, fleet, bus


def write_marker(store: MemoryStore, m: NodeMarker) -> str:
    store.put(m.path, m.to_json())
    return m.path


def stack(store: MemoryStore) -> StackState:
    blob = store.get(STACK_DOC)
    assert blob is not None
    return StackState.from_json(blob.data)


def lose_first_race(store: MemoryStore) -> None:
    """The next write of the stack document loses a compare-and-swap race (once)."""
    original_put, lost = store.put, {"once": False}

    def put(name: str, data: bytes, **kw: object) -> int:
        if name == STACK_DOC and not lost["once"]:
            lost["once"] = True
            raise Conflict(name)
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = put  # type: ignore[method-assign]


def test_a_whole_run_through_the_service() -> None:
    svc, store, fleet, bus = make(policy(workers=2))
    svc.handle(req("r1"), at(0))
    assert fleet.running() == {"pcp-tiny-worker-0", "pcp-tiny-worker-1"}
    meta = json.loads(fleet.vms["pcp-tiny-worker-1"].metadata["pcp-assignment"])
    assert meta["rank"] == 2 and meta["head_host"] == "mac"
    shepherd = ShepherdCommand.from_json(bus.on("shepherd")[0])
    assert shepherd.action == "start" and shepherd.assignment is not None
    assert json.loads(store.get(run_doc("r1")).data)["status"] == "starting"  # type: ignore[union-attr]
    for node in ("shepherd", "worker-0", "worker-1"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    store.put("runs/r1/shepherd/metrics.json", b'{"final_loss": 0.01, "loss": [1, 0.01]}')
    for node in ("shepherd", "worker-0", "worker-1"):
        out = svc.handle_marker(write_marker(store, marker("r1", node, "done", 30)), at(30))
    assert "succeeded" in out.reason
    assert fleet.running() == set()
    summary = json.loads(store.get(summary_doc("r1")).data)  # type: ignore[union-attr]
    assert summary["status"] == "succeeded" and summary["duration_s"] == 1800
    assert summary["metrics"] == {"final_loss": 0.01}
    assert "runs/r1/shepherd/metrics.json" in summary["files"]
    assert summary["estimated_cost_usd"] == pytest.approx(0.5 * (2 * 1.0 + 0.5))


def test_lost_race_rereads_and_decides_again() -> None:
    svc, store, fleet, _ = make()
    svc.handle(req("r1"), at(0))
    original_put = store.put
    raced = {"done": False}

    def racing_put(name: str, data: bytes, **kw: object) -> int:
        if name == STACK_DOC and not raced["done"]:
            raced["done"] = True
            # Someone else queues r2 between our load and our save.
            other = make()[0]
            other.store = store
            other.handle(req("r2"), at(0))
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = racing_put  # type: ignore[method-assign]
    out = svc.handle(req("r3"), at(0))
    assert out.conflicts == 1 and out.saved
    assert [r.run_id for r in stack(store).queue] == ["r2", "r3"]


def test_bounded_retries_then_a_clear_error() -> None:
    svc, store, _, _ = make()
    svc.max_attempts = 3

    def always_conflict(name: str, data: bytes, **kw: object) -> int:
        raise Conflict(name)

    store.put = always_conflict  # type: ignore[method-assign]
    with pytest.raises(ConflictExhausted, match="lost 3 races in a row"):
        svc.handle(req("r1"), at(0))


def test_concurrent_markers_lose_no_update() -> None:
    p = policy(workers=15)
    svc, store, fleet, _ = make(p)
    svc.handle(req("r1"), at(0))
    paths = [write_marker(store, marker("r1", n, "done", 5)) for n in p.node_names]
    barrier = threading.Barrier(len(paths))
    errors: list[BaseException] = []

    def deliver(path: str) -> None:
        try:
            barrier.wait()
            svc.handle_marker(path, at(5))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=deliver, args=(p_,)) for p_ in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = stack(store)
    assert final.recent[0].status is Status.SUCCEEDED and final.active is None
    assert all(vm.stops == 1 for vm in fleet.vms.values())


def test_capacity_error_ends_the_run_in_plain_words() -> None:
    svc, store, fleet, _ = make()
    fleet.exhausted = True
    out = svc.handle(req("r1"), at(0))
    assert out.errors and "ZONE_RESOURCE_POOL_EXHAUSTED" in out.errors[0]
    line = stack(store).recent[0]
    assert line.status is Status.FAILED
    assert line.detail.startswith("could not start the VMs: ZONE_RESOURCE_POOL_EXHAUSTED")


def test_crash_between_save_and_execute_heals_on_the_next_sweep() -> None:
    svc, store, fleet, bus = make()

    def crash(command: object, now: object) -> None:
        raise RuntimeError("function instance died")

    svc._run = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(RuntimeError):
        svc.handle(req("r1"), at(0))
    assert fleet.running() == set() and stack(store).active is not None
    healthy = make()[0]
    healthy.store, healthy.fleet, healthy.bus = store, fleet, bus
    out = healthy.sweep(at(1))
    assert "re-issued start for worker-0" in out.reason
    assert fleet.running() == {"pcp-tiny-worker-0"}
    assert len(bus.on("shepherd")) == 1


def test_sweep_stops_everything_when_the_stack_document_is_lost() -> None:
    svc, store, fleet, _ = make(policy(workers=3))
    svc.handle(req("r1"), at(0))
    store.delete(STACK_DOC)
    out = svc.sweep(at(1))
    assert fleet.running() == set()
    assert "stack state was lost" in out.reason
    audits = store.list("control/sweeps/")
    record = json.loads(store.get(audits[-1]).data)  # type: ignore[union-attr]
    assert record["state_lost"] is True and record["actions"][0]["command"] == "stop_nodes"
    assert {v["status"] for v in record["vms"]} == {"RUNNING"}


def test_corrupt_stack_document_is_kept_aside_and_the_sweep_still_acts() -> None:
    svc, store, fleet, _ = make()
    svc.handle(req("r1"), at(0))
    store.put(STACK_DOC, b"{ this is not json")
    svc.sweep(at(1))
    assert fleet.running() == set()
    kept = [n for n in store.list("control/") if "corrupt" in n]
    assert len(kept) == 1 and store.get(kept[0]).data == b"{ this is not json"  # type: ignore[union-attr]
    assert stack(store) == StackState(recent=())


def test_marker_that_was_deleted_is_permanent() -> None:
    svc, _, _, _ = make()
    with pytest.raises(PermanentError, match="does not exist"):
        svc.handle_marker("markers/r1/worker-0/done.json", at(0))
    with pytest.raises(PermanentError, match="is not a node marker"):
        svc.handle_marker("runs/r1/worker-0/stdout.log", at(0))


def test_nothing_is_written_when_nothing_changes() -> None:
    svc, store, _, _ = make()
    svc.handle(req("r1"), at(0))
    writes = store.writes
    out = svc.handle(req("r1"), at(0))
    assert not out.saved and store.writes == writes


def test_rejection_is_recorded_for_status() -> None:
    svc, store, fleet, _ = make()
    svc.reject("run-9", "start request is not valid JSON: Expecting value", at(0))
    record = json.loads(store.get(run_doc("run-9")).data)  # type: ignore[union-attr]
    assert record["status"] == "rejected" and "not valid JSON" in record["detail"]
    assert fleet.running() == set()


def test_stop_request_through_the_service() -> None:
    svc, store, fleet, bus = make()
    svc.handle(req("r1"), at(0))
    svc.handle(StopRequest("r1", "enough"), at(3))
    assert fleet.running() == set()
    stop = ShepherdCommand.from_json(bus.on("shepherd")[-1])
    assert stop.action == "stop" and "enough" in stop.reason


def test_after_a_lost_race_every_marker_in_the_bucket_is_folded_into_one_write() -> None:
    p = policy(workers=15)
    svc, store, fleet, _ = make(p)
    svc.handle(req("r1"), at(0))
    paths = []
    for node in p.node_names:
        m = marker("r1", node, "done", 5)
        store.put(m.path, m.to_json(), metadata=m.to_metadata())
        paths.append(m.path)
    lose_first_race(store)
    out = svc.handle_marker(paths[3], at(5))
    assert out.conflicts == 1
    assert "succeeded: all 16 nodes exited with code 0" in out.reason
    assert fleet.running() == set()
    # the other markers' own events now change nothing and write nothing
    writes = store.writes
    for path in paths:
        assert not svc.handle_marker(path, at(6)).saved
    assert store.writes == writes


def test_a_marker_described_in_metadata_is_not_read() -> None:
    svc, store, _, _ = make()
    svc.handle(req("r1"), at(0))
    m = marker("r1", "worker-0", "booted", 1)
    store.put(m.path, b"unreadable", metadata=m.to_metadata())
    out = svc.handle_marker(m.path, at(1), metadata=m.to_metadata())
    assert out.reason == "worker-0 booted"


def test_a_lost_run_record_write_is_healed_by_the_sweep() -> None:
    svc, store, fleet, _ = make()
    svc.handle(req("r1"), at(0))
    original_put = store.put

    def flaky_put(name: str, data: bytes, **kw: object) -> int:
        if name == run_doc("r1") and b'"phase":"ended"' in data:
            raise RuntimeError("503 from storage")
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = flaky_put  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        svc.handle(StopRequest("r1", "enough"), at(2))
    assert json.loads(store.get(run_doc("r1")).data)["status"] == "starting"  # type: ignore[union-attr]
    store.put = original_put  # type: ignore[method-assign]
    out = svc.sweep(at(3))
    assert "re-wrote the record of r1" in out.reason
    assert json.loads(store.get(run_doc("r1")).data)["status"] == "cancelled"  # type: ignore[union-attr]
    assert store.get(summary_doc("r1")) is not None
    assert "re-wrote" not in svc.sweep(at(4)).reason
    assert stack(store).unarchived == ()


def test_a_late_stop_of_an_ended_run_does_not_stop_the_next_run() -> None:
    svc, store, fleet, _ = make()
    svc.handle(req("r1"), at(0))
    out = svc.handle(StopRequest("r1"), at(1))
    late = [c for c in out.commands if type(c).__name__ == "StopNodes"]
    svc.handle(req("r2"), at(2))
    assert fleet.running() == {"pcp-tiny-worker-0"}
    svc.execute(tuple(late), at(3))  # r1's stop, redelivered after r2 started the VM
    assert fleet.running() == {"pcp-tiny-worker-0"}


def test_the_current_run_is_read_when_each_vm_is_stopped_not_before() -> None:
    """A stop that is slow to reach Compute (a cold start, say) while the next run starts
    the VM must still spare it: the fence is read at the last moment."""
    svc, store, fleet, bus = make()
    svc.handle(req("r1"), at(0))

    class SlowFleet(MemoryFleet):
        def stop(self, vms, spare=None, owner=None):  # type: ignore[no-untyped-def]
            if spare is not None and not self.started_r2:
                self.started_r2 = True
                svc.handle(req("r2"), at(2))  # meanwhile, the next run starts the VM
            super().stop(vms, spare, owner)

    slow = SlowFleet(fleet.stack, list(fleet.vms))
    slow.vms, slow.started_r2 = fleet.vms, False  # type: ignore[attr-defined]
    svc.fleet = slow
    svc.handle(StopRequest("r1"), at(1))
    assert stack(store).active is not None and stack(store).active.run_id == "r2"  # type: ignore[union-attr]
    assert fleet.running() == {"pcp-tiny-worker-0"}


def test_a_retry_after_a_lost_race_is_stamped_with_a_fresh_clock() -> None:
    svc, store, _, _ = make()
    svc.clock = lambda: at(7)
    lose_first_race(store)
    out = svc.handle(req("r1"), at(0))
    assert out.conflicts == 1
    active = stack(store).active
    assert active is not None and active.accepted_at == at(7) and active.started_at == at(7)


def test_progress_alone_writes_nothing_and_the_document_changes_with_the_run() -> None:
    p = policy(workers=3)
    svc, store, _, _ = make(p)
    svc.handle(req("r1"), at(0))
    writes = store.writes
    reads: list[str] = []
    original_get = store.get
    store.get = lambda name: reads.append(name) or original_get(name)  # type: ignore[method-assign]
    for node in p.node_names[:-1]:
        m = marker("r1", node, "booted", 1)
        store.put(m.path, m.to_json(), metadata=m.to_metadata())
        assert not svc.handle_marker(m.path, at(1), metadata=m.to_metadata()).saved
    assert store.writes == writes + len(p.node_names) - 1  # only the markers themselves
    assert reads == [], "progress alone reads nothing either: one listing per marker"
    last = marker("r1", p.node_names[-1], "booted", 1)
    store.put(last.path, last.to_json(), metadata=last.to_metadata())
    out = svc.handle_marker(last.path, at(1))
    assert out.saved and "run is running" in out.reason
    doc = stack(store)
    assert doc.active is not None and doc.active.status.value == "running"
    # the document holds no node progress: that lives in the markers
    assert all(n.phase.value == "pending" for n in doc.active.nodes)


@pytest.mark.parametrize(("fields", "node"), [
    ({}, "shepherd"), ({"layout": "all-nodes"}, "shepherd"),
    ({"layout": "workers-only"}, "worker-0"),
    ({"layout": "workers-only", "metrics_node": "worker-1"}, "worker-1"),
    ({"metrics_node": "worker-1"}, "worker-1")])
def test_the_summary_takes_the_metrics_of_rank_0_or_the_node_the_run_names(
        fields: dict[str, str], node: str) -> None:
    svc, store, _, _ = make(policy(workers=2))
    svc.handle(req("r1", **fields), at(0))
    for name in ("shepherd", "worker-0", "worker-1"):
        store.put(f"runs/r1/{name}/metrics.json", json.dumps({"from": name}).encode())
        svc.handle_marker(write_marker(store, marker("r1", name, "done", 5)), at(5))
    summary = json.loads(store.get(summary_doc("r1")).data)  # type: ignore[union-attr]
    assert summary["status"] == "succeeded"
    assert summary["metrics"] == {"from": node} and summary["metrics_node"] == node


def test_late_done_markers_update_an_ended_runs_record_not_its_outcome() -> None:
    svc, store, _, _ = make(policy(workers=2))
    svc.handle(req("r1"), at(0))
    for node in ("shepherd", "worker-0", "worker-1"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    out = svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)),
                            at(5))
    assert "failed: worker-1 exited with code 3" in out.reason

    def nodes(doc: str) -> dict[str, object]:
        blob = store.get(doc)
        assert blob is not None
        return {n["name"]: (n["phase"], n["exit_code"], n["signal"])
                for n in json.loads(blob.data)["nodes"]}

    assert nodes(summary_doc("r1"))["worker-0"] == ("booted", None, None)
    late = marker("r1", "worker-0", "done", 6, code=None, signal="SIGTERM")
    out = svc.handle_marker(write_marker(store, late), at(6))
    assert "worker-0 exited after run r1 ended" in out.reason
    svc.handle_marker(write_marker(store, marker("r1", "shepherd", "done", 7, code=143)), at(7))
    for doc in (run_doc("r1"), summary_doc("r1")):
        assert nodes(doc) == {"shepherd": ("done", 143, None),
                              "worker-0": ("done", None, "SIGTERM"),
                              "worker-1": ("done", 3, None)}
    summary = json.loads(store.get(summary_doc("r1")).data)  # type: ignore[union-attr]
    assert summary["status"] == "failed"
    assert summary["detail"] == "worker-1 exited with code 3"
    assert stack(store).recent[0].status is Status.FAILED
    # A redelivered late marker writes nothing more.
    generation = store.get(run_doc("r1")).generation  # type: ignore[union-attr]
    again = svc.handle_marker(late.path, at(8))
    assert "exited after run" not in again.reason
    assert store.get(run_doc("r1")).generation == generation  # type: ignore[union-attr]


def test_a_late_marker_that_loses_a_race_on_the_record_is_not_lost() -> None:
    svc, store, _, _ = make(policy(workers=2))
    svc.handle(req("r1"), at(0))
    for node in ("shepherd", "worker-0", "worker-1"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)), at(5))
    original_put, lost = store.put, {"once": False}

    def put(name: str, data: bytes, **kw: object) -> int:
        if name == run_doc("r1") and kw.get("if_generation_match") and not lost["once"]:
            lost["once"] = True  # meanwhile the shepherd's late marker lands
            write_marker(store, marker("r1", "shepherd", "done", 6, code=0))
            raise Conflict(name)
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = put  # type: ignore[method-assign]
    svc.handle_marker(write_marker(store, marker("r1", "worker-0", "done", 6, code=143)), at(6))
    assert lost["once"]
    record = json.loads(store.get(run_doc("r1")).data)  # type: ignore[union-attr]
    assert {n["name"]: n["exit_code"] for n in record["nodes"]} == {
        "shepherd": 0, "worker-0": 143, "worker-1": 3}
    assert record["status"] == "failed"


def _failed_run_with_two_nodes_running(p: Policy | None = None) -> tuple[Service, MemoryStore]:
    """r1 booted on every node; ending it is the next marker's job (worker-1 exits 3)."""
    svc, store, _, _ = make(p or policy(workers=2))
    svc.handle(req("r1"), at(0))
    for node in ("shepherd", "worker-0", "worker-1"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    return svc, store


def _exit_codes(store: MemoryStore, doc: str) -> dict[str, int | None]:
    blob = store.get(doc)
    assert blob is not None, doc
    return {n["name"]: n["exit_code"] for n in json.loads(blob.data)["nodes"]}


def test_a_marker_landing_while_the_archive_writes_the_ended_record_is_not_lost() -> None:
    """The archive lists the markers, then writes the record. A `done` that lands between
    the two, and whose handler reads the record before that write (still the record of
    the start), is found by the archive's listing after its write."""
    svc, store = _failed_run_with_two_nodes_running()
    original_put, raced = store.put, {"done": False}

    def put(name: str, data: bytes, **kw: object) -> int:
        if name == run_doc("r1") and kw.get("if_generation_match") is None \
                and json.loads(data)["phase"] == "ended" and not raced["done"]:
            raced["done"] = True
            late = write_marker(store, marker("r1", "worker-0", "done", 6, code=143))
            out = svc.handle_marker(late, at(6))  # reads the record of the start
            assert "exited after run" not in out.reason
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = put  # type: ignore[method-assign]
    svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)), at(5))
    assert raced["done"]
    for doc in (run_doc("r1"), summary_doc("r1")):
        assert _exit_codes(store, doc) == {"shepherd": None, "worker-0": 143, "worker-1": 3}
    record = json.loads(store.get(run_doc("r1")).data)  # type: ignore[union-attr]
    assert record["status"] == "failed" and record["detail"] == "worker-1 exited with code 3"


def test_a_summary_the_archive_overwrites_after_a_late_marker_is_written_again() -> None:
    """A late marker's handler updates the record and summary between the archive's
    record and summary writes; the archive's stale summary does not stay."""
    svc, store = _failed_run_with_two_nodes_running()
    original_put, raced = store.put, {"done": False}

    def put(name: str, data: bytes, **kw: object) -> int:
        if name == summary_doc("r1") and not raced["done"]:
            raced["done"] = True
            late = write_marker(store, marker("r1", "shepherd", "done", 6, code=0))
            out = svc.handle_marker(late, at(6))
            assert "shepherd exited after run r1 ended" in out.reason
        return original_put(name, data, **kw)  # type: ignore[arg-type]

    store.put = put  # type: ignore[method-assign]
    svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)), at(5))
    assert raced["done"]
    assert _exit_codes(store, summary_doc("r1")) == {"shepherd": 0, "worker-0": None,
                                                      "worker-1": 3}
    assert _exit_codes(store, run_doc("r1")) == _exit_codes(store, summary_doc("r1"))


def test_the_sweep_records_a_late_marker_whose_event_was_lost() -> None:
    svc, store = _failed_run_with_two_nodes_running()
    svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)), at(5))
    write_marker(store, marker("r1", "worker-0", "done", 6, code=143))  # no event comes
    out = svc.sweep(at(7))
    assert "worker-0" not in out.reason and any(
        n.kind.value == "late_done_recorded" and n.run_id == "r1" for n in out.transition.notes)
    for doc in (run_doc("r1"), summary_doc("r1")):
        assert _exit_codes(store, doc) == {"shepherd": None, "worker-0": 143, "worker-1": 3}
    generation = store.get(run_doc("r1")).generation  # type: ignore[union-attr]
    svc.sweep(at(8))  # nothing new: nothing written
    assert store.get(run_doc("r1")).generation == generation  # type: ignore[union-attr]
    write_marker(store, marker("r1", "shepherd", "done", 70, code=0))
    svc.sweep(at(5 + 61))  # more than an hour after the end: no longer looked at
    assert _exit_codes(store, run_doc("r1"))["shepherd"] is None


def test_a_node_that_writes_done_and_powers_off_during_a_sweep_is_not_lost() -> None:
    """The sweep lists the markers, then the VMs. A worker that writes `done` and powers
    its VM off (the dead-man's switch) in between looks booted on a VM that is down; the
    sweep lists the markers again before calling it lost."""
    svc, store, fleet, _ = make(policy(workers=2))
    svc.handle(req("r1"), at(0))
    for node in ("shepherd", "worker-0", "worker-1"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    original_list = fleet.list

    def list_after_the_power_off() -> list:  # type: ignore[type-arg]
        write_marker(store, marker("r1", "worker-0", "done", 2))  # its event is still on the way
        fleet.vms["pcp-tiny-worker-0"].status = "TERMINATED"
        return original_list()

    fleet.list = list_after_the_power_off  # type: ignore[method-assign]
    out = svc.sweep(at(2))
    assert "lost" not in out.reason, out.reason
    active = stack(store).active
    assert active is not None and active.status is Status.RUNNING
    fleet.list = original_list  # type: ignore[method-assign]
    # A node whose VM went down with no done marker is still lost.
    fleet.vms["pcp-tiny-worker-1"].status = "TERMINATED"
    assert "worker-1 lost" in svc.sweep(at(3)).reason


def test_a_late_marker_keeps_the_records_wandb_links() -> None:
    svc, store = _failed_run_with_two_nodes_running(
        policy(workers=2, default_wandb_project="proj", default_wandb_entity="team"))
    svc.handle_marker(write_marker(store, marker("r1", "worker-1", "done", 5, code=3)), at(5))
    out = svc.handle_marker(write_marker(store, marker("r1", "worker-0", "done", 6)), at(6))
    assert "worker-0 exited after run r1 ended" in out.reason
    record = json.loads(store.get(run_doc("r1")).data)  # type: ignore[union-attr]
    assert record["wandb"]["project"] == "proj" and record["wandb"]["group"] == "r1"
    assert _exit_codes(store, run_doc("r1"))["worker-0"] == 0


def test_a_torchrun_run_takes_its_metrics_from_worker_0() -> None:
    svc, store, _, _ = make(policy(workers=1))
    svc.handle(req("r1", binary="torchrun:pkg.train"), at(0))
    store.put("runs/r1/worker-0/metrics.json", b'{"final_loss": 0.5}')
    for node in ("shepherd", "worker-0"):
        svc.handle_marker(write_marker(store, marker("r1", node, "booted", 1)), at(1))
    for node in ("worker-0", "shepherd"):
        svc.handle_marker(write_marker(store, marker("r1", node, "done", 2)), at(2))
    summary = json.loads(store.get(summary_doc("r1")).data)  # type: ignore[union-attr]
    assert summary["metrics_node"] == "worker-0" and summary["metrics"] == {"final_loss": 0.5}
