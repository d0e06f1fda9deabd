"""LocalCompute refuses what Compute Engine refuses, with the real API's error reason.

One parametrized test per rule, so that a later change cannot make the stand-in lenient
again without a failing case. Calls go through the production google-cloud-compute client
where it will send them, and as raw HTTP where the client would refuse to (unknown fields,
wrong types). The sources of the rules are in docs/local-replica.md.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from pcp.adapters.compute_fleet import ComputeFleet
from pcp_dev.local.compute import LocalCompute
from pcp_dev.local.compute_schema import ResponseInvalid, compute_v1
from tests.adapters.test_fleet_contract import PROJECT, STACK, ZONE, assignment

pytestmark = pytest.mark.adapters

VM = f"pcp-{STACK}-worker-0"
BASE = f"/compute/v1/projects/{PROJECT}/zones/{ZONE}"


@pytest.fixture
def compute() -> Iterator[LocalCompute]:
    with LocalCompute(PROJECT, ZONE, time_scale=0.0) as endpoint:
        endpoint.add_instance(VM, {"pcp-stack": STACK}, {"pcp-bucket": "b"})
        yield endpoint
        assert endpoint.invalid_responses == []


def clients(endpoint: str) -> tuple[Any, Any]:
    """The production clients, instances and zone operations, pointed at the endpoint."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1 as cv1

    options = {"credentials": AnonymousCredentials(),  # type: ignore[no-untyped-call]
               "client_options": {"api_endpoint": endpoint}, "transport": "rest"}
    return cv1.InstancesClient(**options), cv1.ZoneOperationsClient(**options)


@pytest.fixture
def client(compute: LocalCompute) -> Any:
    return clients(compute.endpoint)[0]


def ref(instance: str = VM) -> dict[str, str]:
    return {"project": PROJECT, "zone": ZONE, "instance": instance}


def reason_of(call: Callable[[], Any]) -> tuple[int, str]:
    """Run a client call that must fail; its HTTP code and the reason in the error body."""
    with pytest.raises(gexc.GoogleAPICallError) as info:
        call()
    errors = [e for e in info.value.errors if isinstance(e, dict)]
    assert errors, info.value
    return int(info.value.code or 0), str(errors[0]["reason"])


def raw(compute: LocalCompute, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """A request the client library would not send; its HTTP code and error reason."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{compute.endpoint}{BASE}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, ""
    except urllib.error.HTTPError as e:
        error = json.loads(e.read())["error"]
        assert error["code"] == e.code and error["message"]
        return e.code, error["errors"][0]["reason"]


def current_labels(client: Any) -> tuple[str, dict[str, str]]:
    inst = client.get(**ref())
    return inst.label_fingerprint, dict(inst.labels)


# ------------------------------------------------------------------ the schema


@pytest.mark.parametrize("method,path,body", [
    ("POST", f"/instances/{VM}/setScheduling", {"maxRunDurationSeconds": 60}),  # unknown field
    ("POST", f"/instances/{VM}/setScheduling", {"automaticRestart": "false"}),  # a bool
    ("POST", f"/instances/{VM}/setScheduling", {"onHostMaintenance": "STOP"}),  # an enum
    ("POST", f"/instances/{VM}/setScheduling", {"maxRunDuration": {"seconds": "1h"}}),  # int64
    ("POST", f"/instances/{VM}/setScheduling", {"maxRunDuration": {"seconds": "60", "minutes": 1}}),
    ("POST", f"/instances/{VM}/setScheduling", {"availabilityDomain": 2**31}),  # int32 range
    ("POST", f"/instances/{VM}/setScheduling", ["STOP"]),  # not an object
    ("POST", f"/instances/{VM}/setMetadata", {"items": {"k": "v"}}),  # not an array
    ("POST", f"/instances/{VM}/setMetadata", {"fingerprint": "not base64!"}),  # bytes
    ("POST", f"/instances/{VM}/setMetadata", {"items": [{"key": "k", "val": "v"}]}),
    ("POST", f"/instances/{VM}/setLabels", {"labels": {"a": 1}}),  # map values are strings
    ("POST", f"/instances/{VM}/start", {"force": True}),  # start takes no body
    ("POST", f"/instances/{VM}/stop?graceful=false", None),  # unknown query parameter
    ("POST", f"/instances/{VM}/stop?noGracefulShutdown=maybe", None),  # a boolean parameter
    ("GET", "/instances/Worker_0", None),  # the instance name's pattern
    ("GET", "/operations/op.1", None),  # the operation name's pattern
])
def test_a_request_outside_the_schema_is_invalid(compute: LocalCompute, method: str, path: str,
                                                 body: Any) -> None:
    assert raw(compute, method, path, body) == (400, "invalid")
    assert compute.vm(VM).status == "TERMINATED"


@pytest.mark.parametrize("body", [
    {"maxRunDuration": {"seconds": 3600}},  # proto3 JSON: an int64 may come as a number
    {"maxRunDuration": {"seconds": "3600"}, "instanceTerminationAction": "STOP",
     "onHostMaintenance": "TERMINATE", "automaticRestart": False},
])
def test_a_request_inside_the_schema_is_accepted(compute: LocalCompute,
                                                 body: dict[str, Any]) -> None:
    assert raw(compute, "POST", f"/instances/{VM}/setScheduling", body) == (200, "")
    assert compute.vm(VM).max_run_seconds() == 3600


@pytest.mark.parametrize("field,value", [
    ("id", 1001),  # uint64 is written as a string
    ("status", "STOPPED_BY_USER"),  # not in the enum
    ("labels", {"a": 1}),  # map values are strings
    ("gpuCount", 1),  # no such field
    ("scheduling", {"maxRunDuration": {"seconds": 30.5}}),
])
def test_a_response_outside_the_schema_is_caught(field: str, value: Any) -> None:
    good = {"kind": "compute#instance", "id": "1001", "name": VM, "status": "RUNNING",
            "labels": {"a": "b"}, "scheduling": {"maxRunDuration": {"seconds": "30"}}}
    compute_v1().check_response("Instance", good)
    with pytest.raises(ResponseInvalid):
        compute_v1().check_response("Instance", {**good, field: value})


def test_the_endpoint_answers_500_rather_than_write_a_bad_response(
        compute: LocalCompute, client: Any) -> None:
    compute.vm(VM).accelerator = ("nvidia-tesla-t4", 2**40)  # a bug: an int32 overflows
    with pytest.raises(gexc.InternalServerError):
        client.get(**ref())
    assert len(compute.invalid_responses) == 1
    compute.invalid_responses.clear()


# ------------------------------------------------------------------ statuses


@pytest.mark.parametrize("kind,status,reason", [
    ("setScheduling", "RUNNING", "invalid"),
    ("setScheduling", "STAGING", "invalid"),
    ("setScheduling", "STOPPING", "invalid"),
    ("setScheduling", "SUSPENDED", "invalid"),
    ("setScheduling", "REPAIRING", "invalid"),
    ("start", "STOPPING", "resourceNotReady"),
    ("start", "SUSPENDING", "resourceNotReady"),
    ("start", "SUSPENDED", "resourceNotReady"),
    ("start", "REPAIRING", "resourceNotReady"),
    ("stop", "SUSPENDING", "resourceNotReady"),
])
def test_a_method_is_refused_in_a_status_gce_refuses_it_in(
        compute: LocalCompute, client: Any, kind: str, status: str, reason: str) -> None:
    from google.cloud import compute_v1 as cv1

    compute.set_status(VM, status)
    calls = {"start": lambda: client.start_unary(**ref()),
             "stop": lambda: client.stop_unary(**ref()),
             "setScheduling": lambda: client.set_scheduling_unary(
                 **ref(), scheduling_resource=cv1.Scheduling(
                     max_run_duration=cv1.Duration(seconds=60),
                     instance_termination_action="STOP"))}
    assert reason_of(calls[kind]) == (400, reason)
    assert compute.vm(VM).status == status
    assert compute.vm(VM).max_run_seconds() is None


@pytest.mark.parametrize("status", ["RUNNING", "SUSPENDED", "REPAIRING", "TERMINATED"])
def test_a_stop_is_taken_in_every_status_gce_takes_it_in(
        compute: LocalCompute, status: str) -> None:
    instances, operations = clients(compute.endpoint)
    compute.set_status(VM, status)
    op = instances.stop_unary(**ref())
    operations.wait(project=PROJECT, zone=ZONE, operation=op.name)
    assert compute.vm(VM).status == "TERMINATED"


# ------------------------------------------------------------------ labels, metadata, scheduling


@pytest.mark.parametrize("labels", [
    {"Pcp-run": "x"},  # uppercase key
    {"1pcp": "x"},  # a key starts with a letter
    {"pcp-run": "run.a"},  # '.' in a value
    {"pcp-run": "A"},  # uppercase value
    {"k" * 64: "x"},  # a key of 64 characters
    {"pcp-run": "v" * 64},  # a value of 64 characters
    {"": "x"},  # an empty key
    {f"l{i}": "x" for i in range(65)},  # 65 labels
])
def test_labels_outside_gce_rules_are_invalid(client: Any, compute: LocalCompute,
                                             labels: dict[str, str]) -> None:
    from google.cloud import compute_v1 as cv1

    fingerprint, before = current_labels(client)
    assert reason_of(lambda: client.set_labels_unary(
        **ref(), instances_set_labels_request_resource=cv1.InstancesSetLabelsRequest(
            label_fingerprint=fingerprint, labels=labels))) == (400, "invalid")
    assert compute.vm(VM).labels == before


@pytest.mark.parametrize("labels", [
    {"k" * 63: "v" * 63},
    {"pcp-run": ""},
    {"équipe": "café"},  # international lowercase letters are allowed
    {f"l{i}": "x" for i in range(64)},
])
def test_labels_inside_gce_rules_are_taken(client: Any, compute: LocalCompute,
                                          labels: dict[str, str]) -> None:
    from google.cloud import compute_v1 as cv1

    fingerprint, _ = current_labels(client)
    client.set_labels_unary(**ref(), instances_set_labels_request_resource=(
        cv1.InstancesSetLabelsRequest(label_fingerprint=fingerprint, labels=labels)))
    assert compute.vm(VM).labels == labels


@pytest.mark.parametrize("items", [
    {"pcp.assignment": "x"},  # '.' in a key
    {"k" * 129: "x"},  # a key of 129 characters
    {"big": "x" * (256 * 1024 + 1)},  # a value over 256 KiB
    {f"k{i}": "x" * (200 * 1024) for i in range(3)},  # 600 KiB in all
])
def test_metadata_outside_gce_limits_is_invalid(client: Any, compute: LocalCompute,
                                               items: dict[str, str]) -> None:
    from google.cloud import compute_v1 as cv1

    inst = client.get(**ref())
    assert reason_of(lambda: client.set_metadata_unary(**ref(), metadata_resource=cv1.Metadata(
        fingerprint=inst.metadata.fingerprint,
        items=[cv1.Items(key=k, value=v) for k, v in items.items()]))) == (400, "invalid")
    assert compute.vm(VM).metadata == {"pcp-bucket": "b"}


def test_metadata_at_gce_limits_is_taken(client: Any, compute: LocalCompute) -> None:
    from google.cloud import compute_v1 as cv1

    items = {"k" * 128: "x" * (256 * 1024), "b": "y" * (255 * 1024)}
    inst = client.get(**ref())
    client.set_metadata_unary(**ref(), metadata_resource=cv1.Metadata(
        fingerprint=inst.metadata.fingerprint,
        items=[cv1.Items(key=k, value=v) for k, v in items.items()]))
    assert compute.vm(VM).metadata == items


@pytest.mark.parametrize("fields", [
    {"instance_termination_action": "STOP"},  # an action with nothing to trigger it
    {"instance_termination_action": "DELETE"},
    {"max_run_duration": 29, "instance_termination_action": "STOP"},  # under 30 s
    {"max_run_duration": 120 * 24 * 3600 + 1, "instance_termination_action": "STOP"},
    {"max_run_duration": 60, "termination_time": "2030-01-01T00:00:00Z",
     "instance_termination_action": "STOP"},  # a duration and a time
    {"termination_time": "tomorrow", "instance_termination_action": "STOP"},
])
def test_scheduling_outside_gce_rules_is_invalid(client: Any, compute: LocalCompute,
                                                fields: dict[str, Any]) -> None:
    from google.cloud import compute_v1 as cv1

    if "max_run_duration" in fields:
        fields = {**fields, "max_run_duration": cv1.Duration(seconds=fields["max_run_duration"])}
    assert reason_of(lambda: client.set_scheduling_unary(
        **ref(), scheduling_resource=cv1.Scheduling(**fields))) == (400, "invalid")
    assert "instanceTerminationAction" not in compute.vm(VM).scheduling


# ------------------------------------------------------------------ fingerprints, missing things


@pytest.mark.parametrize("kind", ["setMetadata", "setLabels"])
def test_a_stale_fingerprint_is_condition_not_met(client: Any, compute: LocalCompute,
                                                  kind: str) -> None:
    from google.cloud import compute_v1 as cv1

    stale = "c3RhbGU="  # well-formed base64, not the current fingerprint
    calls = {"setMetadata": lambda: client.set_metadata_unary(
                 **ref(), metadata_resource=cv1.Metadata(fingerprint=stale, items=[])),
             "setLabels": lambda: client.set_labels_unary(
                 **ref(), instances_set_labels_request_resource=cv1.InstancesSetLabelsRequest(
                     label_fingerprint=stale, labels={}))}
    assert reason_of(calls[kind]) == (412, "conditionNotMet")
    assert compute.vm(VM).metadata == {"pcp-bucket": "b"}
    assert compute.vm(VM).labels == {"pcp-stack": STACK}


@pytest.mark.parametrize("method,path", [
    ("GET", f"/instances/pcp-{STACK}-worker-9"),
    ("POST", f"/instances/pcp-{STACK}-worker-9/start"),
    ("GET", "/operations/operation-1-start-0"),
    ("POST", "/operations/operation-1-start-0/wait"),
    ("POST", f"/instances/{VM}/suspend"),  # a method not served is not found, not accepted
])
def test_what_does_not_exist_is_not_found(compute: LocalCompute, method: str, path: str) -> None:
    assert raw(compute, method, path) == (404, "notFound")


# ------------------------------------------------------------------ timed transitions


def test_stopping_takes_the_guest_shutdown_and_refuses_a_start() -> None:
    from google.cloud import compute_v1 as cv1

    with LocalCompute(PROJECT, ZONE, time_scale=0.02) as compute:  # 10 s shutdown in 0.2 s
        compute.add_instance(VM, {"pcp-stack": STACK}, status="RUNNING")
        instances, operations = clients(compute.endpoint)
        t0 = time.monotonic()
        op = instances.stop_unary(**ref())
        assert op.status != cv1.Operation.Status.DONE  # it ends when the VM is TERMINATED
        assert instances.get(**ref()).status == "STOPPING"
        assert reason_of(lambda: instances.start_unary(**ref())) == (400, "resourceNotReady")
        done = operations.wait(project=PROJECT, zone=ZONE, operation=op.name)
        assert done.status == cv1.Operation.Status.DONE
        assert time.monotonic() - t0 >= 0.2
        assert compute.vm(VM).status == "TERMINATED"
        assert compute.invalid_responses == []


@pytest.mark.parametrize("model,window", [("STANDARD", 120.0), ("SPOT", 30.0)])
def test_the_soft_off_window_caps_a_slow_guest(model: str, window: float) -> None:
    scale = 0.01  # the windows become 1.2 s and 0.3 s; the guest alone would take 10 s
    with LocalCompute(PROJECT, ZONE, time_scale=scale) as compute:
        compute.guest_shutdown_seconds = 1000.0  # a guest that never finishes by itself
        compute.add_instance(VM, {"pcp-stack": STACK}, status="RUNNING", scheduling={
            "provisioningModel": model, "automaticRestart": False,
            "onHostMaintenance": "TERMINATE"})
        fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0)
        fleet.list()  # warm up: the client library's import is not part of the stop
        t0 = time.monotonic()
        fleet.stop([VM])
        took = time.monotonic() - t0
        assert compute.vm(VM).status == "TERMINATED"
        assert window * scale <= took < window * scale + 0.6, took


def test_a_boot_passes_through_provisioning_and_staging() -> None:
    seen: list[str] = []
    with LocalCompute(PROJECT, ZONE, time_scale=0.01) as compute:  # 30 s of boot in 0.3 s
        compute.add_instance(VM, {"pcp-stack": STACK})
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                status = compute.vm(VM).status
                if not seen or seen[-1] != status:
                    seen.append(status)
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0)
        a = assignment(0)
        t0 = time.monotonic()
        fleet.start([a], a.deadline)
        took = time.monotonic() - t0
        final = compute.vm(VM).status  # the watcher may not have looked since
        stop.set()
        watcher.join()
    assert final == "RUNNING"
    assert [*seen, final][:4] == ["TERMINATED", "PROVISIONING", "STAGING", "RUNNING"]
    assert took >= 0.3  # the start operation ends when the VM is RUNNING


# ------------------------------------------------------------------ what the strict rules fixed


@pytest.mark.parametrize("status", ["SUSPENDED", "REPAIRING", "STOPPING", "STAGING"])
def test_the_fleet_brings_a_vm_down_from_any_status_before_arming_it(
        compute: LocalCompute, status: str) -> None:
    """setScheduling needs TERMINATED: a VM left SUSPENDED, REPAIRING or STOPPING used to be
    armed as it was, which Compute Engine refuses (the start event then retried for a day)."""
    compute.set_status(VM, status)
    if status == "STOPPING":  # someone else's stop, finishing a moment later
        threading.Timer(0.3, compute.power_off, args=(VM,)).start()
    fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0,
                         backoff_seconds=0.05)
    a = assignment(0)
    fleet.start([a], a.deadline)
    vm = compute.vm(VM)
    assert vm.status == "RUNNING" and vm.starts == 1
    assert vm.max_run_seconds() is not None
    assert vm.labels["pcp-run"] == a.run_id
    assert compute.count("stop", VM) == (0 if status == "STOPPING" else 1)
    assert compute.count("resume", VM) == 0  # stopped, never resumed


def test_the_fleet_waits_out_a_suspending_vm(compute: LocalCompute) -> None:
    compute.set_status(VM, "SUSPENDING")
    threading.Timer(0.3, compute.set_status, args=(VM, "SUSPENDED")).start()
    fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0,
                         backoff_seconds=0.05)
    a = assignment(0)
    fleet.start([a], a.deadline)
    assert compute.vm(VM).status == "RUNNING"
    assert compute.count("stop", VM) == 1  # only once it was SUSPENDED


def test_a_stop_of_a_suspending_vm_waits_until_it_can_be_stopped(compute: LocalCompute) -> None:
    compute.set_status(VM, "SUSPENDING")
    threading.Timer(0.3, compute.set_status, args=(VM, "SUSPENDED")).start()
    fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0,
                         backoff_seconds=0.05)
    fleet.stop([VM])
    assert compute.vm(VM).status == "TERMINATED"
    assert compute.count("stop", VM) == 2  # refused while SUSPENDING, taken when SUSPENDED


def test_a_stop_of_a_stopping_vm_ends_when_the_vm_is_down(compute: LocalCompute) -> None:
    from google.cloud import compute_v1 as cv1

    instances, operations = clients(compute.endpoint)
    compute.set_status(VM, "STOPPING")  # someone else's stop, with time_scale 0 even
    threading.Timer(0.5, compute.power_off, args=(VM,)).start()
    t0 = time.monotonic()
    op = instances.stop_unary(**ref())
    assert time.monotonic() - t0 < 0.4  # answered at once, not held open
    assert op.status != cv1.Operation.Status.DONE
    assert operations.wait(project=PROJECT, zone=ZONE,
                           operation=op.name).status == cv1.Operation.Status.DONE
    assert compute.vm(VM).status == "TERMINATED"
