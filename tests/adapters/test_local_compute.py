"""ComputeFleet against LocalCompute: concurrency, errors, retries, operation waiting, the hard
cap, and the local endpoint's own behaviour (status machine, metadata server, hooks).

Everything goes through the production google-cloud-compute client over real sockets.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.api_core import exceptions as gexc

from pcp.adapters.compute_fleet import ComputeFleet
from pcp.core.errors import CapacityError
from pcp_dev.local.compute import LocalCompute, VmRecord
from pcp_dev.local.metadata import MetadataServer
from tests.adapters.test_fleet_contract import PROJECT, STACK, ZONE, assignment

pytestmark = pytest.mark.adapters

NAMES = [f"pcp-{STACK}-worker-{i}" for i in range(8)]


class Hooks:
    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.lock = threading.Lock()

    def on_start(self, vm: VmRecord) -> None:
        with self.lock:
            self.started.append(vm.name)

    def on_stop(self, vm: VmRecord) -> None:
        with self.lock:
            self.stopped.append(vm.name)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
def compute(hooks: Hooks) -> Iterator[LocalCompute]:
    with LocalCompute(PROJECT, ZONE, hooks.on_start, hooks.on_stop) as endpoint:
        for i, name in enumerate(NAMES):
            endpoint.add_instance(name, {"pcp-stack": STACK, "pcp-node": f"worker-{i}"},
                                  {"pcp-bucket": "b"})
        yield endpoint
        assert endpoint.invalid_responses == []  # every answer fitted the compute v1 schema


def fleet_for(compute: LocalCompute, **kwargs: float) -> ComputeFleet:
    options = {"op_timeout": 30.0, "backoff_seconds": 0.05, **kwargs}
    return ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, **options)  # type: ignore[arg-type]


def start(fleet: ComputeFleet, *indices: int, attempt: int = 1) -> None:
    assignments = [assignment(i, attempt=attempt) for i in indices]
    fleet.start(assignments, assignments[0].deadline)


# ------------------------------------------------------------------ the fleet


def test_starts_are_concurrent(compute: LocalCompute) -> None:
    fleet = fleet_for(compute)
    fleet.list()  # warm up: import the client library outside the timings
    compute.faults.delay_seconds["*"] = 0.2
    t0 = time.perf_counter()
    start(fleet, 0)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    start(fleet, *range(1, 8))
    seven = time.perf_counter() - t0
    assert all(compute.vm(n).status == "RUNNING" for n in NAMES)
    # one after another would take 7x; concurrently it is about 1x (generous bound)
    assert seven < 4 * one, (one, seven)
    assert one >= 5 * 0.2  # get, setMetadata, setLabels, setScheduling, get, start


@pytest.mark.parametrize("code,words", [
    ("ZONE_RESOURCE_POOL_EXHAUSTED", "no capacity for nvidia-tesla-t4 in us-central1-a "
                                     "(ZONE_RESOURCE_POOL_EXHAUSTED)"),
    ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS",
     "no capacity for nvidia-tesla-t4 in us-central1-a "
     "(ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS)"),
    ("QUOTA_EXCEEDED", "no quota for nvidia-tesla-t4 in us-central1-a (QUOTA_EXCEEDED)"),
])
def test_exhausted_zone_or_quota_is_a_capacity_error_in_plain_words(
        compute: LocalCompute, code: str, words: str) -> None:
    compute.faults.fail_next("start", NAMES[1], error=code)
    fleet = fleet_for(compute)
    with pytest.raises(CapacityError) as info:
        start(fleet, 0, 1)
    assert str(info.value).startswith(words)
    assert compute.count("start", NAMES[1]) == 1  # not retried: it would not help
    assert compute.vm(NAMES[1]).status == "TERMINATED"
    assert compute.vm(NAMES[0]).status == "RUNNING"  # the other VM was still handled


def test_start_of_a_vm_that_does_not_exist_is_refused_not_retried(
        compute: LocalCompute) -> None:
    fleet = ComputeFleet(PROJECT, ZONE, "ghost", compute.endpoint, op_timeout=30.0,
                         backoff_seconds=0.05)
    a = replace(assignment(0), stack="ghost")
    with pytest.raises(CapacityError, match="VM pcp-ghost-worker-0 does not exist in "
                                            "us-central1-a: deploy the stack"):
        fleet.start([a], a.deadline)
    assert fleet.calls["get"] == 1


def test_capacity_wins_over_other_errors(compute: LocalCompute) -> None:
    compute.faults.fail_next("start", NAMES[0], error="QUOTA_EXCEEDED")
    compute.faults.fail_next("setMetadata", NAMES[1], error=400)
    with pytest.raises(CapacityError):
        start(fleet_for(compute), 0, 1)


def test_transient_503_on_start_is_retried(compute: LocalCompute) -> None:
    compute.faults.fail_next("start", NAMES[0], error=503)
    fleet = fleet_for(compute)
    start(fleet, 0)
    assert compute.vm(NAMES[0]).status == "RUNNING"
    assert compute.count("start", NAMES[0]) == 2
    assert fleet.calls["start"] == 2


def test_api_rate_limit_is_retried_not_taken_for_gpu_quota(compute: LocalCompute) -> None:
    compute.faults.fail_next("setLabels", NAMES[0], error=429)
    start(fleet_for(compute), 0)
    assert compute.count("setLabels", NAMES[0]) == 2
    assert compute.vm(NAMES[0]).status == "RUNNING"


def test_transient_errors_give_up_after_the_attempts(compute: LocalCompute) -> None:
    for _ in range(3):
        compute.faults.fail_next("get", NAMES[0], error=503)
    fleet = fleet_for(compute, attempts=3)
    with pytest.raises(gexc.ServiceUnavailable):
        start(fleet, 0)
    assert compute.count("get", NAMES[0]) == 3
    assert compute.vm(NAMES[0]).status == "TERMINATED"


def test_other_http_errors_propagate_without_retry(compute: LocalCompute) -> None:
    compute.faults.fail_next("setScheduling", NAMES[0], error=400)
    with pytest.raises(gexc.BadRequest):
        start(fleet_for(compute), 0)
    assert compute.count("setScheduling") == 1
    assert compute.vm(NAMES[0]).status == "TERMINATED"  # never started without its cap


def test_a_hard_cap_that_did_not_take_stops_the_start(compute: LocalCompute) -> None:
    compute.faults.drop_next("setScheduling", NAMES[0])
    with pytest.raises(RuntimeError, match="maxRunDuration did not take"):
        start(fleet_for(compute), 0)
    assert compute.count("start") == 0
    assert compute.vm(NAMES[0]).status == "TERMINATED"


def test_slow_operations_are_awaited_through_the_local_endpoint(compute: LocalCompute) -> None:
    compute.faults.slow_seconds.update({"start": 0.4, "setScheduling": 0.2})
    fleet = fleet_for(compute)
    t0 = time.perf_counter()
    start(fleet, 0)
    assert time.perf_counter() - t0 >= 0.6
    assert compute.vm(NAMES[0]).status == "RUNNING"
    assert compute.count("operations.wait") >= 2
    assert fleet.calls["operations.wait"] == compute.count("operations.wait")
    wait_paths = [p for m, p in compute.calls if p.endswith("/wait")]
    assert all(p.startswith(f"/compute/v1/projects/{PROJECT}/zones/{ZONE}/operations/")
               for p in wait_paths)


def test_operation_deadline_is_enforced(compute: LocalCompute) -> None:
    compute.faults.slow_seconds["start"] = 5.0
    compute.wait_cap_seconds = 0.2
    fleet = fleet_for(compute, op_timeout=1.0)
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        start(fleet, 0)
    assert time.perf_counter() - t0 < 3.0


def test_an_invocation_deadline_bounds_every_call_in_it(compute: LocalCompute) -> None:
    """A function invocation's budget (its timeout less the margin) caps the calls made
    inside it together, below the fleet's own per-call op_timeout."""
    compute.faults.slow_seconds["start"] = 5.0
    compute.wait_cap_seconds = 0.2
    fleet = fleet_for(compute, op_timeout=30.0)
    fleet.list()  # import the client library outside the timing
    t0 = time.perf_counter()
    with fleet.invocation(1.0), pytest.raises(TimeoutError):
        start(fleet, 0)
    assert time.perf_counter() - t0 < 3.0
    compute.faults.slow_seconds["start"] = 0.0
    fleet.list()  # outside the block the budget is gone: a later call is not refused


def test_stale_metadata_fingerprint_is_retried(compute: LocalCompute) -> None:
    compute.faults.fail_next("setMetadata", NAMES[0], error=412)
    compute.faults.fail_next("setLabels", NAMES[0], error=412)
    start(fleet_for(compute), 0)
    vm = compute.vm(NAMES[0])
    assert compute.count("setMetadata", NAMES[0]) == 2
    assert compute.count("setLabels", NAMES[0]) == 2
    assert json.loads(vm.metadata["pcp-assignment"])["node"] == "worker-0"
    assert vm.metadata["pcp-bucket"] == "b"
    assert vm.labels["pcp-run"] == "run-a" and vm.labels["pcp-node"] == "worker-0"
    assert vm.status == "RUNNING"


def test_max_run_duration_stops_the_vm(compute: LocalCompute, hooks: Hooks) -> None:
    compute.run_clock_scale = 1 / 30  # GCE's shortest cap, 30 s, passes in 1 s
    fleet = fleet_for(compute, margin_seconds=0)
    a = assignment(0)
    deadline = datetime.now(UTC) + timedelta(seconds=1)
    fleet.start([a], deadline)
    assert compute.vm(NAMES[0]).status == "RUNNING"
    assert compute.vm(NAMES[0]).max_run_seconds() == 30  # the floor, not the 1 s wanted
    stop_by = time.monotonic() + 5
    while compute.vm(NAMES[0]).status != "TERMINATED" and time.monotonic() < stop_by:
        time.sleep(0.05)
    assert compute.vm(NAMES[0]).status == "TERMINATED"
    assert hooks.stopped == [NAMES[0]]
    assert compute.count("stop") == 0  # the endpoint did it, not a client


def test_a_cap_shorter_than_gce_allows_is_refused_by_the_fleet(compute: LocalCompute) -> None:
    with pytest.raises(ValueError, match="min_run_seconds 1 is outside"):
        fleet_for(compute, min_run_seconds=1)


def test_list_uses_the_stack_label_filter(compute: LocalCompute) -> None:
    compute.add_instance("pcp-huge-worker-0", {"pcp-stack": "huge"})
    fleet = fleet_for(compute)
    assert sorted(v.name for v in fleet.list()) == sorted(NAMES)
    list_paths = [p for m, p in compute.calls if p.endswith("/instances")]
    assert len(list_paths) == 1 and fleet.calls["list"] == 1


def test_stop_waits_for_the_vm_to_be_down(compute: LocalCompute, hooks: Hooks) -> None:
    fleet = fleet_for(compute)
    start(fleet, 0, 1)
    compute.faults.slow_seconds["stop"] = 0.3
    fleet.stop(NAMES[:2])
    assert [compute.vm(n).status for n in NAMES[:2]] == ["TERMINATED", "TERMINATED"]
    assert sorted(hooks.stopped) == NAMES[:2]


# ------------------------------------------------------------------ the endpoint itself


def test_hooks_fire_on_start_stop_and_not_on_power_off(compute: LocalCompute,
                                                       hooks: Hooks) -> None:
    fleet = fleet_for(compute)
    start(fleet, 0, 1)
    assert sorted(hooks.started) == NAMES[:2]
    fleet.stop([NAMES[0]])
    assert hooks.stopped == [NAMES[0]]
    compute.power_off(NAMES[1])  # the guest shut itself down
    assert compute.vm(NAMES[1]).status == "TERMINATED"
    assert hooks.stopped == [NAMES[0]]
    start(fleet, 1, attempt=2)
    assert hooks.started.count(NAMES[1]) == 2


def test_status_machine_through_the_real_client(compute: LocalCompute) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import compute_v1

    opts = {"api_endpoint": compute.endpoint}
    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    ic = compute_v1.InstancesClient(transport="rest", credentials=anonymous,
                                    client_options=opts)
    ops = compute_v1.ZoneOperationsClient(transport="rest", credentials=anonymous,
                                          client_options=opts)
    ref: dict[str, Any] = {"project": PROJECT, "zone": ZONE, "instance": NAMES[0]}
    done = compute_v1.Operation.Status.DONE
    assert ic.stop_unary(**ref).status == done  # stop of TERMINATED: a no-op
    compute.faults.slow_seconds["start"] = 0.3
    op = ic.start_unary(**ref)
    assert op.status != done
    assert ic.get(**ref).status == "PROVISIONING"
    assert ops.wait(project=PROJECT, zone=ZONE, operation=op.name).status == done
    assert ic.get(**ref).status == "RUNNING"
    compute.faults.slow_seconds.clear()
    assert ic.start_unary(**ref).status == done  # start of RUNNING: a no-op
    assert compute.vm(NAMES[0]).starts == 1
    with pytest.raises(gexc.NotFound):
        ic.get(project=PROJECT, zone=ZONE, instance="pcp-tiny-worker-99")
    with pytest.raises(gexc.PreconditionFailed):
        ic.set_metadata_unary(**ref, metadata_resource=compute_v1.Metadata(
            fingerprint="c3RhbGU=", items=[]))  # well-formed base64, not the current one
    with pytest.raises(gexc.BadRequest):
        list(ic.list(request=compute_v1.ListInstancesRequest(
            project=PROJECT, zone=ZONE, filter="name = x")))


def test_metadata_server_serves_live_attributes_with_the_header(
        compute: LocalCompute) -> None:
    name = NAMES[0]
    with MetadataServer(lambda: compute.metadata_of(name), name) as server:
        def get(path: str, header: bool = True) -> tuple[int, str]:
            req = urllib.request.Request(f"{server.url}/computeMetadata/v1/instance/{path}")
            if header:
                req.add_header("Metadata-Flavor", "Google")
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    assert resp.headers["Metadata-Flavor"] == "Google"
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        assert get("attributes/pcp-bucket") == (200, "b")
        assert get("attributes/pcp-bucket", header=False)[0] == 403
        assert get("attributes/pcp-assignment")[0] == 404
        assert get("name") == (200, name)
        start(fleet_for(compute), 0)  # setMetadata through the API is visible at once
        status, body = get("attributes/pcp-assignment")
        assert status == 200 and json.loads(body)["node"] == "worker-0"
        status, body = get("attributes/?recursive=true")
        assert status == 200 and set(json.loads(body)) == {"pcp-bucket", "pcp-assignment"}
        assert server.host.startswith("127.0.0.1:")


def test_importing_the_adapter_does_not_import_the_compute_library() -> None:
    """The functions import the adapter on cold start; compute_v1 costs ~1.5 s to import."""
    code = ("import sys, pcp.adapters.compute_fleet, pcp_dev.local.compute; "
            "sys.exit('google.cloud.compute_v1' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
