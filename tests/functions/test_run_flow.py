"""A whole run through the four functions, over the emulators and the local Compute endpoint.

Start request -> VMs RUNNING with their assignment, shepherd commanded -> booted and done
markers in both event shapes -> run succeeded, VMs TERMINATED, summary written. Stop and
sweep go through their functions too.
"""

from __future__ import annotations

import json

import pytest

from pcp.core.messages import Assignment
from pcp.core.names import LABEL_ATTEMPT, LABEL_DEADLINE, LABEL_RUN, LABEL_STACK
from tests.functions import events
from tests.functions.conftest import MakeStack, log_lines

pytestmark = [pytest.mark.functions, pytest.mark.emulator]


@pytest.mark.parametrize("shape", ["finalized", "notification"])
def test_start_then_markers_run_to_success(make_stack: MakeStack, shape: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=2)
    response = fn.start({"run_id": "exp-1", "training_config": "--lr 0.1 --name 'a b'",
                         "requested_by": "test"})
    assert response.status_code == 200, response.data

    # The workers are up under the run, with their assignment and the run's labels.
    assert fn.running() == fn.vm_names
    for rank, name in enumerate(fn.vm_names, start=1):
        vm = fn.vm(name)
        assignment = Assignment.from_json(vm.metadata["pcp-assignment"])
        assert (assignment.run_id, assignment.node, assignment.rank) == (
            "exp-1", f"worker-{rank - 1}", rank)
        assert assignment.args == ("--lr", "0.1", "--name", "a b")
        assert assignment.head_node == "shepherd.test:9000"
        assert vm.metadata["pcp-bucket"] == fn.bucket.name  # Pulumi's keys survive
        assert vm.labels[LABEL_RUN] == "exp-1" and vm.labels[LABEL_ATTEMPT] == "1"
        assert vm.labels[LABEL_DEADLINE].isdigit() and vm.labels[LABEL_STACK] == fn.stack
        assert vm.max_run_seconds() is not None  # the GCE hard cap is armed

    # The shepherd got its start command on its topic.
    [command] = fn.pull_shepherd(1)
    assert (command.action, command.run_id, command.attempt) == ("start", "exp-1", 1)
    assert command.assignment is not None and command.assignment.role == "shepherd"

    state = fn.state()
    assert state["active"]["run_id"] == "exp-1" and state["active"]["status"] == "starting"
    assert fn.read("runs/exp-1/run.json")["status"] == "starting"
    [line] = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "start"]
    assert (line["severity"], line["run_id"], line["stack"]) == ("INFO", "exp-1", fn.stack)
    assert line["commands"] == 3 and line["conflicts"] == 0

    nodes = ["shepherd", *(f"worker-{i}" for i in range(fn.workers))]
    for node in nodes:
        assert fn.marker("exp-1", node, "booted", shape=shape).status_code == 200
    assert fn.state()["active"]["status"] == "running"

    for node in nodes:
        assert fn.marker("exp-1", node, "done", shape=shape).status_code == 200

    state = fn.state()
    assert state["active"] is None
    assert [(r["run_id"], r["status"]) for r in state["recent"]] == [("exp-1", "succeeded")]
    assert fn.running() == []
    assert all(fn.vm(n).status == "TERMINATED" for n in fn.vm_names)
    summary = fn.read("runs/exp-1/summary.json")
    assert summary is not None and summary["status"] == "succeeded"
    assert sorted((n["name"], n["exit_code"]) for n in summary["nodes"]) == [
        (n, 0) for n in sorted(nodes)]
    assert fn.read("runs/exp-1/run.json")["status"] == "succeeded"
    lines = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "marker"]
    assert len(lines) == 2 * len(nodes)
    assert "succeeded" in lines[-1]["reason"] and lines[-1]["run_id"] == "exp-1"


def test_bare_message_starts_a_run_named_after_the_message(make_stack: MakeStack) -> None:
    """`gcloud pubsub topics publish pcp-tiny-start --message='{}'` must start a run."""
    fn = make_stack(workers=1)
    assert fn.start({}, message_id="4815162342").status_code == 200
    assert fn.state()["active"]["run_id"] == "run-4815162342"
    assert fn.running() == fn.vm_names


def test_stop_cancels_the_run_and_stops_its_vms(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    assert fn.start({"run_id": "exp-2"}).status_code == 200
    assert fn.running() == fn.vm_names
    assert fn.stop({"run_id": "exp-2", "reason": "changed my mind"}).status_code == 200
    state = fn.state()
    assert state["active"] is None and state["recent"][0]["status"] == "cancelled"
    assert fn.running() == []
    stops = [c for c in fn.pull_shepherd(2) if c.action == "stop"]
    assert [c.run_id for c in stops] == ["exp-2"]


def test_sweep_writes_its_audit_record_and_stops_an_orphan(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    vm = fn.vm_names[0]
    fn.compute.add_instance(vm, labels={LABEL_STACK: fn.stack}, status="RUNNING")  # orphan
    assert fn.sweep().status_code == 200
    assert fn.vm(vm).status == "TERMINATED"
    [name] = fn.names("control/sweeps/")
    record = fn.read(name)
    assert record["actions"] == [{"command": "stop_nodes", "vms": [vm],
                                  "reason": "orphan: stack state was lost"}]


def test_bad_stop_and_sweep_messages_are_recorded(make_stack: MakeStack,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    assert fn.stop({"reason": "no run named"}).status_code == 200
    assert fn.post("on_sweep", _pubsub(b'{"op": "explode"}')).status_code == 200
    details = sorted(fn.read(n)["kind"] for n in fn.names("control/rejected/"))
    assert details == ["stop", "sweep"]
    warned = [x for x in log_lines(capsys.readouterr().out) if x["severity"] == "WARNING"]
    assert [x["event"] for x in warned] == ["stop", "sweep"]
    assert "must name a run_id" in warned[0]["reason"]


def _pubsub(data: bytes) -> dict:
    return events.pubsub_event(data)


def test_log_lines_are_json_with_the_filter_keys(make_stack: MakeStack,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    fn.start({"run_id": "exp-3"})
    out = capsys.readouterr().out
    ours = [json.loads(x) for x in out.splitlines() if '"event":"start"' in x]
    assert len(ours) == 1
    assert {"severity", "stack", "run_id", "event", "reason", "message"} <= set(ours[0])


def test_binary_content_mode_is_served(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    event = events.pubsub_event(json.dumps({"run_id": "binary"}), topic="pcp-tiny-start")
    assert fn.post("on_start", event, binary=True).status_code == 200
    name, generation = fn.write_marker("binary", "shepherd", "booted")
    marker = fn.marker_event(name, generation, "finalized")
    assert fn.post("on_marker", marker, binary=True).status_code == 200
    nodes = {n["name"]: n["phase"] for n in fn.state()["active"]["nodes"]}
    assert nodes["shepherd"] == "booted"


def test_pubsub_push_body_is_served(make_stack: MakeStack) -> None:
    """What a push subscription sends (the local replica): functions-framework converts the
    plain {message, subscription} body into a messagePublished CloudEvent, whose source names
    the topic the push URL's path names."""
    fn = make_stack(workers=1)
    start = events.pubsub_event(json.dumps({"run_id": "pushed"}))["data"]
    client = fn.apps["on_start"].test_client()
    path = "/projects/pcp-test/topics/pcp-tiny-"
    assert client.post(path + "start", json=start).status_code == 200
    assert fn.state()["active"]["run_id"] == "pushed"
    name, generation = fn.write_marker("pushed", "worker-0", "booted")
    notification = fn.marker_event(name, generation, "notification")["data"]
    assert fn.apps["on_marker"].test_client().post(path + "markers",
                                                   json=notification).status_code == 200
    nodes = {n["name"]: n["phase"] for n in fn.state()["active"]["nodes"]}
    assert nodes["worker-0"] == "booted"


@pytest.mark.parametrize("shape", ["finalized", "notification"])
def test_marker_described_in_the_event_metadata_is_not_read(make_stack: MakeStack,
                                                             shape: str) -> None:
    fn = make_stack(workers=1)
    assert fn.start({"run_id": "described"}).status_code == 200
    # The object's body is unreadable on purpose: only the event's metadata describes it.
    for node in ("shepherd", "worker-0"):
        for kind in ("booted", "done"):
            name, generation = fn.write_marker("described", node, kind, body=b"not json",
                                               described=True)
            meta = fn.read_metadata(name)
            assert fn.post("on_marker", fn.marker_event(name, generation, shape,
                                                        metadata=meta)).status_code == 200
    assert fn.state()["recent"][0]["status"] == "succeeded"
    assert fn.running() == []
