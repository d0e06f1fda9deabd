"""The invariants the campaign checks, during a schedule and after it settled.

- double_start: no VM boots twice for one run attempt (counted from the fleet's real boots),
  with one exception the lifecycle makes on purpose: a VM that went down before its node
  booted is started again for the same attempt (bounded by the boot timeout). Such a re-boot
  is counted as an outcome, "VM re-booted after it was lost while booting"; a second boot of
  a node the control plane saw boot (or finish) is always a violation;
- past_deadline: at every sweep tick, no VM runs past its run's deadline plus one interval;
- stray_vm: after every sweep that succeeded, each running VM belongs to the live attempt or
  to an unexpired keep-alive lease (or, when the sweep found the stack document lost, carries
  an unexpired keep-alive label: the only record of a lease left);
- terminal_changed / terminal_mismatch: a terminal reason never changes, and the run record
  agrees with the stack document;
- vm_left_running, not_quiet: once the faults stop, the stack comes to rest with nothing up;
- run_not_terminal: every request ever published ends terminal with a reason;
- held_run_active: after every sweep, a stack on budget hold has no active run;
- held_vm_running: at every tick, no VM runs more than three sweep intervals into a hold;
- budget_tripped_wrongly: a hold is only ever tripped by this stack's budget, over its
  threshold, in the current period (never by another budget or a stale notification);
- cap_exceeded: after every sweep, a capped run's cost at its deadline (its earlier attempts
  included) is within its cap.

Deleting control/stack.json loses the queue and the active run by design (there is nothing
left to read them from); runs it knew of are counted apart, as "lost to stack document
deletion", and a run that was started again after its record was lost is counted as a
re-run. Boots are counted per document epoch for the same reason. Every other check is the
same with or without a deletion.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pcp.core.events import VmView
from pcp.core.lifecycle import NoteKind
from pcp.core.names import (
    LABEL_ATTEMPT,
    LABEL_DEADLINE,
    LABEL_KEEP_ALIVE,
    LABEL_RUN,
    SWEEPS,
    run_doc,
)
from pcp.core.state import STATUS_OF_REASON, NodePhase, Phase, Reason, Run, StackState
from pcp.core.timefmt import iso
from pcp.service import Outcome

if TYPE_CHECKING:
    from pcp_dev.faults.world import World

TERMINAL = ("succeeded", "failed", "cancelled", "rejected")

# Note kinds of a sweep that mean the sweeper, not an event, did something (lifecycle.py).
# Every load folds the markers in (pcp.progress), so a sweep that makes a run running or ends
# it from its markers is one whose marker events were lost or are still late.
HEALS = {
    NoteKind.START_REISSUED: "sweeper: VM starts re-issued",
    NoteKind.SHEPHERD_RESENT: "sweeper: shepherd start re-sent",
    NoteKind.ORPHANS_STOPPED: "sweeper: orphan VMs stopped",
    NoteKind.RUN_RUNNING: "sweeper: runs found running (booted markers)",
    NoteKind.LEASE_EXPIRED: "sweeper: keep-alive leases ended",
}
# A run the sweeper ended, by its end reason.
HEALED_ENDS = {
    Reason.SUCCEEDED: "sweeper: runs found ended (done markers)",
    Reason.FAILED: "sweeper: runs found ended (done markers)",
    Reason.TIMED_OUT: "sweeper: deadlines enforced",
    Reason.BOOT_TIMEOUT: "sweeper: boot timeouts",
    Reason.NODE_LOST: "sweeper: lost nodes detected",
}
# Kinds of any decision the table counts (not heals: what the budget switch did).
BUDGET_KINDS = {
    NoteKind.BUDGET_HOLD: "budget: holds tripped",
    NoteKind.BUDGET_HELD: "budget: over again while held (no-op)",
    NoteKind.BUDGET_STALE: "budget: stale notifications ignored",
    NoteKind.BUDGET_LIFTED_PERIOD: "budget: over in a lifted period (no-op)",
    NoteKind.BUDGET_RESUMED: "budget: holds lifted",
}


def label_int(vm: VmView | dict[str, str], key: str) -> int | None:
    labels = vm.labels if isinstance(vm, VmView) else vm
    value = labels.get(key, "")
    return int(value) if value.isdigit() else None


class Checks:
    def __init__(self, world: World) -> None:
        self.w = world
        self.epoch = 0  # bumped by every deletion of the stack document
        self.boots: Counter[tuple[str, str, int, int]] = Counter()
        self.epochs_of: dict[tuple[str, int], set[int]] = defaultdict(set)
        self.victims: set[str] = set()
        self.first_reason: dict[tuple[str, int], str] = {}

    def violate(self, kind: str, detail: str) -> None:
        self.w.report.violations.append(f"{kind}: {detail}")
        self.w.trace(f"VIOLATION {kind}: {detail}")

    def booted(self, vm: str, run_id: str, attempt: int) -> None:
        """The fleet really booted `vm` for this attempt (called after the state was saved)."""
        key = (vm, run_id, attempt, self.epoch)
        self.boots[key] += 1
        self.epochs_of[(run_id, attempt)].add(self.epoch)
        if self.boots[key] == 1:
            return
        run = self.w.state().active
        node = None if run is None else run.node(self.w.policy.node_of_vm(vm) or "")
        if run is not None and run.run_id == run_id and run.attempt == attempt and \
                node is not None and node.phase is NodePhase.PENDING:
            self.w.report.outcomes["VM re-booted after it was lost while booting"] += 1
            self.w.trace(f"{vm} boots again for {run_id}/{attempt}: lost before it booted")
            return
        phase = "not in the active attempt" if node is None else node.phase.value
        self.violate("double_start", f"{vm} booted {self.boots[key]} times for run {run_id} "
                     f"attempt {attempt} (node {phase})")

    def document_deleted(self) -> None:
        state = self.w.state()
        self.victims.update(r.run_id for r in state.queue)
        self.victims.update(r.run_id for r in state.recent)
        if state.active is not None:
            self.victims.add(state.active.run_id)
        self.epoch += 1

    def at_tick(self) -> None:
        """Before the tick's sweep: nothing runs past its deadline plus one interval, nor
        three intervals into a budget hold."""
        hold = self.w.state().budget.hold
        if hold is not None and self.w.now - hold.since > 3 * self.w.policy.sweep_interval:
            running = sorted(self.w.fleet.running())
            if running:
                self.violate("held_vm_running", f"{running} run {self.w.now - hold.since} "
                             "into a budget hold")
        limit = (self.w.now - self.w.policy.sweep_interval).timestamp()
        for vm in self.w.fleet.vms.values():
            deadline = label_int(vm.labels, LABEL_DEADLINE)
            # Labels hold whole seconds, truncated: the true deadline is up to 1 s later.
            if vm.status == "RUNNING" and deadline is not None and deadline + 1 <= limit:
                self.violate("past_deadline", f"{vm.name} runs past its deadline "
                             f"{iso(datetime.fromtimestamp(deadline, UTC))} + one interval")

    def after_sweep(self, outcome: Outcome) -> None:
        for note in outcome.transition.notes:
            heal = HEALS.get(note.kind)
            if note.kind is NoteKind.RUN_ENDED and note.ended is not None:
                heal = HEALED_ENDS.get(note.ended)
            if heal is not None:
                self.w.report.heals[heal] += 1
        now = self.w.now
        audit = self.w.store.get(f"{SWEEPS}{iso(now)}.json")
        lost = audit is not None and b'"state_lost":true' in audit.data
        state = self.w.state()
        for line in state.recent:
            first = self.first_reason.setdefault((line.run_id, self.epoch), line.reason.value)
            if first != line.reason.value:
                self.violate("terminal_changed", f"{line.run_id}: {first} -> {line.reason}")
        self.budget_and_cap(state)
        run, lease = state.active, state.lease
        for vm in self.w.fleet.vms.values():
            if vm.status != "RUNNING":
                continue
            owner = vm.labels.get(LABEL_RUN)
            if run is not None and run.phase in (Phase.STARTING, Phase.RUNNING) and \
                    owner == run.run_id and label_int(vm.labels, LABEL_ATTEMPT) == run.attempt:
                continue
            if lease is not None and lease.until > now and vm.name in lease.vms and \
                    owner == lease.run_id:
                continue
            if lost and (label_int(vm.labels, LABEL_KEEP_ALIVE) or 0) > now.timestamp():
                continue
            self.violate("stray_vm", f"{vm.name} runs for {owner!r} after a sweep, held by no "
                         "live run or lease")

    def budget_and_cap(self, state: StackState) -> None:
        from pcp_dev.faults.campaign import BUDGET_ID, PERIOD

        p, hold, run = self.w.policy, state.budget.hold, state.active
        if hold is not None:
            if run is not None:
                self.violate("held_run_active", f"run {run.run_id} is {run.phase.value} on "
                             "budget hold")
            if hold.budget_id != BUDGET_ID or hold.period != PERIOD or \
                    hold.cost_amount < p.budget_stop_threshold * hold.budget_amount:
                self.violate("budget_tripped_wrongly", f"hold {hold.to_dict()}")
        if run is not None and run.max_cost_usd is not None and run.started_at is not None \
                and run.deadline is not None:
            cost = (run.cost_usd or 0.0) + p.estimate_cost(run.started_at, run.deadline)
            if cost > run.max_cost_usd + 1e-4:
                self.violate("cap_exceeded", f"run {run.run_id} attempt {run.attempt} costs "
                             f"{cost:.4f} at its deadline, cap {run.max_cost_usd:g}")

    def final(self, quiet: bool) -> None:
        w, outcomes = self.w, self.w.report.outcomes
        if not quiet:
            self.violate("not_quiet", f"still busy {w.plan.settle_hours:g} h after the faults")
        if w.fleet.running():
            self.violate("vm_left_running", f"{sorted(w.fleet.running())} still running")
        for (_, attempt), epochs in self.epochs_of.items():
            if len(epochs) > 1:
                outcomes["re-run after stack document deletion"] += 1
            if attempt > 1:
                outcomes["restart attempts started"] += 1
        state = w.state()
        recent = {line.run_id: line.reason for line in state.recent}
        for run_id in dict.fromkeys(w.requested):
            reason = self.reason_of(run_id, recent)
            if reason is not None:
                status = STATUS_OF_REASON[reason].value
                outcomes[status if status == reason.value else f"{status}: {reason.value}"] += 1
            elif run_id in self.victims:
                outcomes["lost to stack document deletion"] += 1
            else:
                self.violate("run_not_terminal", f"run {run_id} has no terminal reason")

    def reason_of(self, run_id: str, recent: dict[str, Reason]) -> Reason | None:
        """The terminal reason: the stack document's, checked against the run record."""
        blob = self.w.store.get(run_doc(run_id))
        record = None if blob is None else Run.from_json(blob.data)
        stale = record is None or record.reason is None
        if run_id in recent:
            if stale:
                self.w.report.outcomes["ended with run.json missing or stale"] += 1
            elif record is not None and record.reason != recent[run_id] and \
                    run_id not in self.victims:
                self.violate("terminal_mismatch", f"run {run_id}: stack.json says "
                             f"{recent[run_id]}, run.json says {record.reason}")
            return recent[run_id]
        return None if record is None else record.reason
