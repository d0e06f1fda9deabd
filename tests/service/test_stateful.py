"""Random interleavings, duplicates and delays of every event through service.handle.

A hypothesis state machine plays the world: requests and stops arrive, node agents write
markers for whatever their VM was assigned, markers are redelivered late, VMs are preempted,
the clock jumps and the sweeper ticks. After every step the invariants of
docs/architecture.md must hold; at the end, with only sweeps and time left, every accepted
request is terminal.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.core.messages import Assignment, NodeMarker, ShepherdCommand, StopRequest
from pcp.core.names import LABEL_ATTEMPT, LABEL_DEADLINE, LABEL_RUN, STACK_DOC
from pcp.core.state import StackState
from pcp.service import Service
from tests.core.helpers import T0, policy, req

pytestmark = pytest.mark.service

RUN_IDS = [f"r{i}" for i in range(6)]
EXAMPLES = 500 if os.environ.get("HYPOTHESIS_PROFILE") == "ci" else 80


class Lifecycle(RuleBasedStateMachine):
    @initialize(workers=st.integers(1, 15), keep_alive=st.sampled_from([0.5, 2.0]))
    def setup(self, workers: int, keep_alive: float) -> None:
        self.policy = policy(workers=workers, keep_alive_hours=keep_alive, max_run_hours=3,
                             boot_timeout_minutes=20, sweep_interval_minutes=5)
        self.store = MemoryStore()
        self.fleet = MemoryFleet("tiny", self.policy.worker_vms)
        self.bus = MemoryBus()
        self.svc = Service(self.store, self.fleet, self.bus, self.policy, sleep=lambda _: None)
        self.now = T0
        self.accepted: list[str] = []
        self.first_started: list[str] = []
        self.terminal: dict[str, str] = {}
        self.written: list[str] = []
        self.up_since: dict[tuple[str, str | None, str | None], int] = {}

    # ------------------------------------------------------------ the world acts

    def state(self) -> StackState:
        blob = self.store.get(STACK_DOC)
        return StackState() if blob is None else StackState.from_json(blob.data)

    def after(self) -> None:
        state = self.state()
        run = state.active
        if run is not None and run.attempt == 1 and run.run_id not in self.first_started:
            self.first_started.append(run.run_id)
        for vm in self.fleet.vms.values():
            key = (vm.name, vm.labels.get(LABEL_RUN), vm.labels.get(LABEL_ATTEMPT))
            if vm.status == "RUNNING":
                self.up_since.setdefault(key, vm.starts)
            else:
                self.forget(vm.name)

    def forget(self, name: str) -> None:
        for key in [k for k in self.up_since if k[0] == name]:
            del self.up_since[key]

    @rule(run_id=st.sampled_from(RUN_IDS), keep=st.booleans(),
          restarts=st.integers(0, 1), hours=st.sampled_from([None, 0.5, 1.0, 9.0]))
    def start_request(self, run_id: str, keep: bool, restarts: int, hours: float | None) -> None:
        known = self.state().find(run_id) is not None
        self.svc.handle(req(run_id, keep_vm_alive=keep, max_restarts=restarts,
                            max_hours=hours), self.now)
        if not known:
            self.accepted.append(run_id)
        self.after()

    @rule(run_id=st.sampled_from(RUN_IDS))
    def stop_request(self, run_id: str) -> None:
        self.svc.handle(StopRequest(run_id, "test"), self.now)
        self.after()

    def assignments(self) -> list[Assignment]:
        found = []
        for vm in self.fleet.vms.values():
            if vm.status == "RUNNING" and "pcp-assignment" in vm.metadata:
                found.append(Assignment.from_json(vm.metadata["pcp-assignment"]))
        starts = [ShepherdCommand.from_json(d) for d in self.bus.on("shepherd")]
        shepherd = [c.assignment for c in starts if c.action == "start" and c.assignment]
        if shepherd:
            found.append(shepherd[-1])
        return found

    @rule(data=st.data(), kind=st.sampled_from(["booted", "done"]),
          code=st.sampled_from([0, 0, 0, 0, 1]))
    def node_writes_marker(self, data: st.DataObject, kind: str, code: int) -> None:
        options = self.assignments()
        if not options:
            return
        a = data.draw(st.sampled_from(options))
        m = NodeMarker(run_id=a.run_id, node=a.node, kind=kind, attempt=a.attempt,  # type: ignore[arg-type]
                       at=self.now, exit_code=code if kind == "done" else None)
        self.store.put(m.path, m.to_json())
        self.written.append(m.path)
        self.svc.handle_marker(m.path, self.now)
        self.after()

    @precondition(lambda self: bool(self.written))
    @rule(data=st.data())
    def marker_redelivered(self, data: st.DataObject) -> None:
        self.svc.handle_marker(data.draw(st.sampled_from(self.written)), self.now)
        self.after()

    @rule(data=st.data())
    def vm_preempted(self, data: st.DataObject) -> None:
        running = sorted(self.fleet.running())
        if running:
            name = data.draw(st.sampled_from(running))
            self.fleet.preempt(name)
            self.forget(name)

    @rule(minutes=st.sampled_from([1, 4, 10, 30, 90]))
    def time_passes(self, minutes: int) -> None:
        self.now += timedelta(minutes=minutes)

    @rule()
    def sweep(self) -> None:
        self.svc.sweep(self.now)
        self.after()
        self.check_deadlines()

    # ------------------------------------------------------------ invariants

    def check_deadlines(self) -> None:
        """Invariant 5: right after a sweep, no VM runs past its run's deadline."""
        epoch = self.now.timestamp()
        for vm in self.fleet.vms.values():
            if vm.status == "RUNNING":
                deadline = int(vm.labels.get(LABEL_DEADLINE, "0"))
                assert deadline > epoch, f"{vm.name} runs past its deadline"

    @invariant()
    def one_run_holds_nodes(self) -> None:
        if not hasattr(self, "svc"):
            return
        state = self.state()
        holders = {vm.labels.get(LABEL_RUN) for vm in self.fleet.vms.values()
                   if vm.status == "RUNNING"}
        allowed = set()
        if state.active is not None:
            allowed.add(state.active.run_id)
        if state.lease is not None:
            allowed.add(state.lease.run_id)
        assert holders <= allowed, f"VMs held by {holders}, allowed {allowed}"

    @invariant()
    def terminal_never_changes(self) -> None:
        if not hasattr(self, "svc"):
            return
        for line in self.state().recent:
            seen = self.terminal.setdefault(line.run_id, line.reason.value)
            assert seen == line.reason.value, f"{line.run_id} changed from {seen}"
        for name in self.store.list("runs/"):
            if name.endswith("/run.json"):
                doc = json.loads(self.store.get(name).data)  # type: ignore[union-attr]
                if doc["reason"] is not None and doc["run_id"] in self.terminal:
                    assert doc["reason"] == self.terminal[doc["run_id"]]

    @invariant()
    def queue_is_fifo(self) -> None:
        if not hasattr(self, "svc"):
            return
        order = [self.accepted.index(r) for r in self.first_started]
        assert order == sorted(order), f"started {self.first_started}, accepted {self.accepted}"

    @invariant()
    def keep_alive_is_a_bounded_lease(self) -> None:
        if not hasattr(self, "svc"):
            return
        lease = self.state().lease
        if lease is not None:
            assert lease.until - self.now <= timedelta(hours=self.policy.keep_alive_hours)

    @invariant()
    def no_running_vm_is_started_again(self) -> None:
        """Duplicates never restart a VM that is up under the same attempt; a VM that went
        down before booting may be started again (healing), bounded by the boot timeout."""
        if not hasattr(self, "svc"):
            return
        for vm in self.fleet.vms.values():
            key = (vm.name, vm.labels.get(LABEL_RUN), vm.labels.get(LABEL_ATTEMPT))
            if vm.status == "RUNNING" and key in self.up_since:
                assert vm.starts == self.up_since[key], f"{vm.name} restarted while up"

    @invariant()
    def idle_stack_runs_nothing(self) -> None:
        if not hasattr(self, "svc"):
            return
        state = self.state()
        if state.active is None and state.lease is None:
            assert self.fleet.running() == set()

    def teardown(self) -> None:
        if not hasattr(self, "svc"):
            return
        for _ in range(60):
            self.now += timedelta(minutes=30)
            self.svc.sweep(self.now)
            state = self.state()
            if state.active is None and not state.queue and state.lease is None:
                break
        state = self.state()
        assert state.active is None and not state.queue and state.lease is None
        assert self.fleet.running() == set()
        for run_id in self.accepted:
            found = state.find(run_id)
            assert found is not None and found.status.value in (
                "succeeded", "failed", "cancelled", "rejected"), run_id


Lifecycle.TestCase.settings = settings(
    max_examples=EXAMPLES, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLifecycle = Lifecycle.TestCase
