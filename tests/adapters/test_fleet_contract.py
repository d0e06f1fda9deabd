"""The Fleet contract (pcp/core/ports.py), one suite over MemoryFleet and ComputeFleet.

ComputeFleet runs the production google-cloud-compute client against LocalCompute, which
checks fingerprints and keeps GCE's status machine, so what is asserted here is read back
from the endpoint's records, not from the adapter's own account of what it did.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from pcp.adapters.compute_fleet import ComputeFleet
from pcp.adapters.memory import MemoryFleet
from pcp.core.messages import Assignment
from pcp.core.names import LABEL_ATTEMPT, LABEL_DEADLINE, LABEL_KEEP_ALIVE, LABEL_RUN
from pcp.core.ports import Fleet
from pcp_dev.local.compute import LocalCompute

pytestmark = pytest.mark.adapters

STACK = "tiny"
PROJECT = "pcp-test"
ZONE = "us-central1-a"
NAMES = tuple(f"pcp-{STACK}-worker-{i}" for i in range(3))


def assignment(i: int, run_id: str = "run-a", attempt: int = 1) -> Assignment:
    now = datetime.now(UTC).replace(microsecond=0)
    return Assignment(run_id=run_id, attempt=attempt, stack=STACK, node=f"worker-{i}",
                      role="worker", rank=i + 1, num_nodes=4, head_host="10.0.0.1", port=9000,
                      binary=None, args=("--epochs", "1"), deadline=now + timedelta(hours=1),
                      boot_deadline=now + timedelta(minutes=15))


@dataclass
class VmState:
    status: str
    labels: dict[str, str]
    metadata: dict[str, str]
    starts: int
    stops: int
    max_run_seconds: float | None


class Harness(ABC):
    """A fleet plus a way to read its VMs' real state, for either implementation."""

    fleet: Fleet

    @abstractmethod
    def vm(self, name: str) -> VmState: ...

    @abstractmethod
    def set_running(self, name: str, labels: dict[str, str]) -> None: ...


class MemoryHarness(Harness):
    def __init__(self) -> None:
        self.memory = MemoryFleet(STACK, NAMES)
        self.fleet = self.memory

    def vm(self, name: str) -> VmState:
        v = self.memory.vms[name]
        return VmState(v.status, dict(v.labels), dict(v.metadata), v.starts, v.stops,
                       v.max_run_seconds)

    def set_running(self, name: str, labels: dict[str, str]) -> None:
        self.memory.vms[name].status = "RUNNING"
        self.memory.vms[name].labels.update(labels)


class ComputeHarness(Harness):
    def __init__(self, compute: LocalCompute) -> None:
        self.compute = compute
        for i, name in enumerate(NAMES):
            compute.add_instance(name, {"pcp-stack": STACK, "pcp-role": "worker",
                                        "pcp-node": f"worker-{i}"},
                                 {"pcp-bucket": "pcp-tiny-bucket", "pcp-stack": STACK})
        compute.add_instance("pcp-small-worker-0", {"pcp-stack": "small"}, status="RUNNING")
        self.fleet = ComputeFleet(PROJECT, ZONE, STACK, compute.endpoint, op_timeout=30.0,
                                  backoff_seconds=0.05)

    def vm(self, name: str) -> VmState:
        v = self.compute.vm(name)
        return VmState(v.status, dict(v.labels), dict(v.metadata), v.starts, v.stops,
                       v.max_run_seconds())

    def set_running(self, name: str, labels: dict[str, str]) -> None:
        v = self.compute.vm(name)
        v.labels = {**v.labels, **labels}
        v.status, v.started_at = "RUNNING", time.monotonic()


@pytest.fixture
def compute_harness() -> Iterator[ComputeHarness]:
    with LocalCompute(PROJECT, ZONE) as compute:
        yield ComputeHarness(compute)
        assert compute.invalid_responses == []  # every answer fitted the compute v1 schema


@pytest.fixture(params=["memory", "compute"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return MemoryHarness()
    compute: ComputeHarness = request.getfixturevalue("compute_harness")
    return compute


def test_list_shows_the_stacks_vms_with_status_and_labels(harness: Harness) -> None:
    harness.set_running(NAMES[1], {"pcp-run": "run-x"})
    views = {v.name: v for v in harness.fleet.list()}
    assert set(views) == set(NAMES)
    assert views[NAMES[0]].status == "TERMINATED" and not views[NAMES[0]].up
    assert views[NAMES[1]].status == "RUNNING" and views[NAMES[1]].up
    assert views[NAMES[1]].labels["pcp-run"] == "run-x"
    assert all(v.labels["pcp-stack"] == STACK for v in views.values())


def test_start_boots_every_vm_with_labels_metadata_and_hard_cap(harness: Harness) -> None:
    assignments = [assignment(i) for i in range(3)]
    deadline = assignments[0].deadline
    harness.fleet.start(assignments, deadline)
    for a, name in zip(assignments, NAMES, strict=True):
        vm = harness.vm(name)
        assert vm.status == "RUNNING"
        assert vm.labels[LABEL_RUN] == "run-a"
        assert vm.labels[LABEL_ATTEMPT] == "1"
        assert vm.labels[LABEL_DEADLINE] == str(int(deadline.timestamp()))
        assert vm.labels["pcp-stack"] == STACK  # merged, not replaced
        assert Assignment.from_dict(json.loads(vm.metadata["pcp-assignment"])) == a
        assert vm.max_run_seconds is not None
        assert vm.starts == 1


def test_start_arms_max_run_duration_for_deadline_plus_margin(
        compute_harness: ComputeHarness) -> None:
    """Compute only: the in-memory twin records that a cap was armed, not its value."""
    harness = compute_harness
    a = assignment(0)
    harness.fleet.start([a], a.deadline)
    vm = harness.compute.vm(NAMES[0])
    wanted = a.deadline.timestamp() - time.time() + harness.fleet.margin_seconds
    assert vm.max_run_seconds() == pytest.approx(wanted, abs=5)
    assert vm.scheduling["instanceTerminationAction"] == "STOP"
    # the fields Pulumi set are kept
    assert vm.scheduling["onHostMaintenance"] == "TERMINATE"
    assert vm.scheduling["automaticRestart"] is False
    assert vm.metadata["pcp-bucket"] == "pcp-tiny-bucket"  # metadata merged, not replaced


def test_start_is_idempotent(harness: Harness) -> None:
    assignments = [assignment(i) for i in range(2)]
    harness.fleet.start(assignments, assignments[0].deadline)
    before = [harness.vm(n) for n in NAMES[:2]]
    harness.fleet.start(assignments, assignments[0].deadline)
    after = [harness.vm(n) for n in NAMES[:2]]
    assert [v.starts for v in after] == [v.starts for v in before] == [1, 1]
    assert [v.stops for v in after] == [v.stops for v in before]
    if isinstance(harness, ComputeHarness):
        assert harness.compute.count("start") == 2  # none issued by the second call
        assert harness.compute.count("setMetadata") == 2


def test_start_under_a_new_attempt_restarts_the_vm(harness: Harness) -> None:
    first = assignment(0, attempt=1)
    harness.fleet.start([first], first.deadline)
    second = assignment(0, attempt=2)
    harness.fleet.start([second], second.deadline)
    vm = harness.vm(NAMES[0])
    assert vm.status == "RUNNING"
    assert (vm.starts, vm.stops) == (2, 1)
    assert vm.labels[LABEL_ATTEMPT] == "2"
    assert json.loads(vm.metadata["pcp-assignment"])["attempt"] == 2


def test_start_takes_over_a_vm_kept_alive_by_another_run(harness: Harness) -> None:
    harness.set_running(NAMES[0], {LABEL_RUN: "run-old", LABEL_ATTEMPT: "1",
                                   LABEL_KEEP_ALIVE: "1999999999"})
    a = assignment(0, run_id="run-new")
    harness.fleet.start([a], a.deadline)
    vm = harness.vm(NAMES[0])
    assert vm.status == "RUNNING"
    assert vm.labels[LABEL_RUN] == "run-new"
    assert vm.stops == 1
    assert LABEL_KEEP_ALIVE not in vm.labels


def test_stop_running_stopped_and_missing_vms_succeeds(harness: Harness) -> None:
    a = assignment(0)
    harness.fleet.start([a], a.deadline)
    harness.fleet.stop([NAMES[0], NAMES[1], f"pcp-{STACK}-worker-9"])
    assert harness.vm(NAMES[0]).status == "TERMINATED"
    assert harness.vm(NAMES[0]).stops == 1
    assert harness.vm(NAMES[1]).status == "TERMINATED"
    assert harness.vm(NAMES[1]).stops == 0
    harness.fleet.stop([NAMES[0]])  # again: still fine, nothing changes
    assert harness.vm(NAMES[0]).stops == 1


def test_a_stop_spares_the_vms_of_the_current_run_attempt(harness: Harness) -> None:
    harness.set_running(NAMES[0], {LABEL_RUN: "run-next", LABEL_ATTEMPT: "1"})
    harness.set_running(NAMES[1], {LABEL_RUN: "run-old", LABEL_ATTEMPT: "1"})
    harness.set_running(NAMES[2], {LABEL_RUN: "run-next", LABEL_ATTEMPT: "2"})
    harness.fleet.stop(NAMES, spare=lambda: ("run-next", 2))
    assert harness.vm(NAMES[2]).status == "RUNNING"  # a late stop must not hit run-next #2
    assert harness.vm(NAMES[0]).status == "TERMINATED"  # an earlier attempt is fair game
    assert harness.vm(NAMES[1]).status == "TERMINATED"
    harness.fleet.stop([NAMES[2]])
    assert harness.vm(NAMES[2]).status == "TERMINATED"


def test_a_stop_of_its_own_run_does_not_ask_whom_to_spare(harness: Harness) -> None:
    harness.set_running(NAMES[0], {LABEL_RUN: "run-a", LABEL_ATTEMPT: "1"})
    harness.set_running(NAMES[1], {LABEL_RUN: "run-b", LABEL_ATTEMPT: "1"})
    asked: list[int] = []

    def spare() -> tuple[str, int]:
        asked.append(1)
        return ("run-b", 1)

    harness.fleet.stop(NAMES[:2], spare=spare, owner="run-a")
    assert harness.vm(NAMES[0]).status == "TERMINATED"
    assert harness.vm(NAMES[1]).status == "RUNNING"
    assert len(asked) == 1  # only for the VM the stopped run does not hold


def test_set_labels_merges_and_skips_missing_vms(harness: Harness) -> None:
    harness.fleet.set_labels([NAMES[0], f"pcp-{STACK}-worker-9"],
                             {LABEL_KEEP_ALIVE: "1900000000", LABEL_RUN: "run-z"})
    labels = harness.vm(NAMES[0]).labels
    assert labels[LABEL_KEEP_ALIVE] == "1900000000"
    assert labels[LABEL_RUN] == "run-z"
    assert labels["pcp-stack"] == STACK
    assert LABEL_KEEP_ALIVE not in harness.vm(NAMES[1]).labels
