"""The node agents of the simulated world: one per worker VM, and the shepherd daemon.

They behave as pcp/agent does, at the level the control plane can see: a worker agent reads
its VM's assignment when the VM boots and writes `booted`, then `done` with an exit code; on
SIGTERM (its VM stopping) it may still write `done` with the signal; its dead-man's switch
powers the VM off when its part is over or the deadline passes. The shepherd daemon takes
`start` and `stop` commands from its topic, in order, and catches up after it was down.
Faults: a hung agent (writes nothing, never powers off), a non-zero exit, a broken dead-man's
switch, a shepherd that dies silently, a maintenance or preemption notice (the agent stops its
binary and writes `done` with the reason, or dies before it could; then Compute Engine stops
the VM after the notice time, unless it was stopped and booted again meanwhile).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from pcp.core.messages import Assignment, NodeMarker, ShepherdCommand
from pcp.core.names import ASSIGNMENT_KEY, marker_path
from pcp_dev.faults.wrappers import Fault

if TYPE_CHECKING:
    from pcp_dev.faults.world import World

SIGTERM_DONE = 0.5  # chance that an agent still writes `done` when its VM is stopped


@dataclass
class Session:
    """One boot of a node agent for one assignment: a worker VM boot or a shepherd start."""

    assignment: Assignment
    vm: str | None
    boot: int
    hung: bool = False
    alive: bool = True
    booted: bool = False
    done: bool = False

    @property
    def key(self) -> tuple[str, int]:
        return self.assignment.run_id, self.assignment.attempt


class Agents:
    def __init__(self, world: World) -> None:
        self.w = world
        self.workers: dict[str, Session] = {}
        self.shepherd: Session | None = None
        self.shepherd_down_until = world.now
        self.inbox: list[ShepherdCommand] = []
        self.finished: set[tuple[str, int]] = set()
        self.shepherd_boots = 0
        self.bus_seen = 0
        self.work_of: dict[tuple[str, int], float] = {}

    # ------------------------------------------------------------ workers

    def observe(self) -> None:
        """React to what happened to each VM since the last action; read the shepherd topic."""
        for vm in self.w.fleet.vms.values():
            s = self.workers.get(vm.name)
            if s is not None and s.alive and (vm.status != "RUNNING" or vm.starts != s.boot):
                self.sigterm(s)
            if vm.status == "RUNNING" and (s is None or vm.starts != s.boot):
                a = Assignment.from_json(vm.metadata[ASSIGNMENT_KEY])
                s = Session(a, vm.name, vm.starts, hung=self.w.injector.roll(Fault.AGENT_HUNG))
                self.workers[vm.name] = s
                self.begin(s)
                if self.w.plan.hard_cap:
                    margin = timedelta(seconds=self.w.policy.hard_cap_margin_seconds)
                    self.w.at(a.deadline + margin, self.hard_cap, vm.name, vm.starts)
        self.poll_shepherd()

    def already_done(self, a: Assignment) -> bool:
        """Like pcp/agent: a node that wrote `done` for this attempt (or a later one) on an
        earlier boot does not run it again."""
        blob = self.w.store.get(marker_path(a.run_id, a.node, "done"))
        if blob is None:
            return False
        return NodeMarker.from_json(blob.data, marker_path(a.run_id, a.node, "done")).attempt \
            >= a.attempt

    def begin(self, s: Session) -> None:
        plan, rng = self.w.plan, self.w.rng
        if self.already_done(s.assignment):
            s.done = True
            self.w.trace(f"{s.assignment.node} already wrote done for {s.key}: not running it")
            if s.vm is not None and plan.deadman and not s.hung:
                self.w.at(self.w.now + timedelta(seconds=30), self.deadman, s,
                          "this node already finished the attempt")
            return
        boot = rng.uniform(*plan.boot_minutes)
        if rng.random() < plan.slow_boot:
            boot = self.w.policy.boot_timeout_minutes + rng.uniform(1.0, 10.0)
        work = self.work(s.key) + rng.uniform(0.0, 1.0)
        self.w.at(self.w.now + timedelta(minutes=boot), self.booted, s)
        self.w.at(self.w.now + timedelta(minutes=boot + work), self.done, s)
        if s.vm is not None and plan.deadman and not s.hung:
            self.w.at(s.assignment.deadline, self.deadman, s, "the run's deadline passed")

    def work(self, key: tuple[str, int]) -> float:
        """How long an attempt trains: one figure per attempt, as nodes finish together."""
        if key not in self.work_of:
            plan, rng = self.w.plan, self.w.rng
            if rng.random() < plan.overrun:
                self.work_of[key] = 60 * self.w.policy.max_run_hours + rng.uniform(5.0, 60.0)
            else:
                self.work_of[key] = rng.uniform(*plan.work_minutes)
        return self.work_of[key]

    def write(self, s: Session, kind: str, code: int | None = None,
              signal: str | None = None, end_reason: str | None = None) -> None:
        a = s.assignment
        m = NodeMarker(run_id=a.run_id, node=a.node, kind=kind,  # type: ignore[arg-type]
                       attempt=a.attempt, at=self.w.now, exit_code=code, signal=signal,
                       host=s.vm or "shepherd-host", end_reason=end_reason)
        self.w.store.put(m.path, m.to_json(), metadata=m.to_metadata())  # as pcp/agent does
        how = f" (exit {code})" if code is not None else f" ({signal})" if signal else ""
        self.w.trace(f"{a.node} writes {kind} for {a.run_id}/{a.attempt}{how}")
        self.w.publish_marker(m)

    def booted(self, s: Session) -> None:
        if s.alive and not s.hung:
            s.booted = True
            self.write(s, "booted")

    def done(self, s: Session) -> None:
        if not (s.alive and s.booted and not s.hung and not s.done):
            return
        s.done = True
        self.write(s, "done", code=1 if self.w.injector.roll(Fault.NODE_FAILS) else 0)
        if s.vm is None:
            self.finished.add(s.key)
        elif self.w.plan.deadman and not s.assignment.keep_vm_alive:
            self.w.at(self.w.now + timedelta(seconds=30), self.deadman, s,
                      "this node is done and the run does not keep VMs alive")

    def sigterm(self, s: Session) -> None:
        """The VM is stopping (or the daemon was told to stop): forward, maybe write done."""
        s.alive = False
        if s.booted and not s.done and not s.hung and self.w.rng.random() < SIGTERM_DONE:
            s.done = True
            self.write(s, "done", signal="SIGTERM")

    def notice(self, reason: str) -> None:
        """A maintenance (reason `maintenance`) or Spot preemption (`preempted`) notice on one
        running worker VM: its agent stops the binary and writes done with the reason (unless
        it is hung, or dies first); Compute Engine stops the VM after the notice time."""
        running = sorted(n for n, vm in self.w.fleet.vms.items() if vm.status == "RUNNING")
        if not running:
            return
        name = self.w.rng.choice(running)
        vm = self.w.fleet.vms[name]
        self.w.injector.note(Fault.MAINTENANCE_NOTICE if reason == "maintenance"
                             else Fault.PREEMPTION_NOTICE)
        self.w.trace(f"{name}: {reason} notice")
        s = self.workers.get(name)
        if (s is not None and s.alive and s.booted and not s.done and not s.hung
                and self.w.rng.random() < 0.9):
            s.done = True
            self.write(s, "done", code=143, signal="SIGTERM", end_reason=reason)
            if self.w.plan.deadman and not s.assignment.keep_vm_alive:
                self.w.at(self.w.now + timedelta(seconds=20), self.deadman, s,
                          f"this node ended on a {reason} notice")
        wait = (timedelta(seconds=30) if reason == "preempted"
                else timedelta(minutes=self.w.rng.uniform(1.0, 60.0)))
        self.w.at(self.w.now + wait, self.host_stop, name, vm.starts, reason)

    def host_stop(self, name: str, boot: int, reason: str) -> None:
        vm = self.w.fleet.vms[name]
        if vm.starts == boot and vm.status == "RUNNING":
            vm.status = "TERMINATED"
            vm.stops += 1
            self.w.trace(f"{name} stopped by Compute Engine after its {reason} notice")

    def deadman(self, s: Session, why: str) -> None:
        vm = self.w.fleet.vms[s.vm or ""]
        if s.alive and vm.starts == s.boot and vm.status == "RUNNING":
            vm.status = "TERMINATED"
            vm.stops += 1
            self.w.report.heals["node dead-man's switch power-offs"] += 1
            self.w.trace(f"{vm.name} powers itself off: {why}")

    def hard_cap(self, name: str, boot: int) -> None:
        vm = self.w.fleet.vms[name]
        if vm.starts == boot and vm.status == "RUNNING":
            vm.status = "TERMINATED"
            vm.stops += 1
            self.w.report.heals["GCE maxRunDuration stops"] += 1
            self.w.trace(f"{name} stopped by its maxRunDuration (deadline + "
                         f"{self.w.policy.hard_cap_margin_seconds:g} s)")

    # ------------------------------------------------------------ the shepherd

    def poll_shepherd(self) -> None:
        messages = self.w.bus.messages
        while self.bus_seen < len(messages):
            topic, data, _ = messages[self.bus_seen]
            self.bus_seen += 1
            if topic == "shepherd":
                self.inbox.append(ShepherdCommand.from_json(data))
        if self.w.now < self.shepherd_down_until:
            return  # unacknowledged messages wait on the subscription
        inbox, self.inbox = self.inbox, []
        for command in inbox:
            self.shepherd_command(command)

    def shepherd_command(self, c: ShepherdCommand) -> None:
        current = self.shepherd
        running = current if current is not None and current.alive else None
        key = (c.run_id, c.attempt)
        if c.action == "stop":
            if running is not None and running.key == key:
                self.sigterm(running)
            return
        if key in self.finished or (running is not None and running.key == key):
            return
        assert c.assignment is not None
        if self.w.now >= c.assignment.deadline or self.already_done(c.assignment):
            return  # pcp/agent/shepherd.py refuses these too
        if running is not None:
            self.sigterm(running)
        self.shepherd_boots += 1
        self.shepherd = Session(c.assignment, None, self.shepherd_boots)
        self.begin(self.shepherd)

    def shepherd_dies(self, minutes: float) -> None:
        """The host goes down: its run dies silently (no done); commands wait until it is back."""
        if self.shepherd is not None:
            self.shepherd.alive = False
        self.shepherd_down_until = self.w.now + timedelta(minutes=minutes)
        self.w.at(self.shepherd_down_until, self.shepherd_back)

    def shepherd_back(self) -> None:
        self.w.trace("the shepherd daemon is back; it reads the commands it missed")
