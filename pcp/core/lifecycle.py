"""decide(state, event, now, policy) -> Transition: the whole run lifecycle as a pure function.

Each handler is a flat chain of early returns, each with its reason. Time arrives as an
argument; nothing here reads a clock or touches a port. The service saves the new state with a
generation precondition and only then executes the commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from pcp.core.commands import (
    ArchiveRun,
    Command,
    CommandShepherd,
    LabelNodes,
    StartNodes,
    StopNodes,
)
from pcp.core.errors import PermanentError
from pcp.core.events import (
    Event,
    Reconcile,
    Rejected,
    StartFailed,
    VmView,
    holds_attempt,
)
from pcp.core.images import parse_image, program_of
from pcp.core.messages import (
    Assignment,
    BudgetNotification,
    BudgetResume,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    StopRequest,
    run_layout,
)
from pcp.core.names import LABEL_KEEP_ALIVE, LABEL_RUN
from pcp.core.policy import Policy
from pcp.core.ports import Listed
from pcp.core.state import (
    RESTARTABLE,
    BudgetHold,
    Lease,
    NodePhase,
    NodeState,
    Phase,
    Reason,
    RecentRun,
    Run,
    StackState,
)
from pcp.core.timefmt import iso

LIVE = (Phase.STARTING, Phase.RUNNING)
#: How a start refused by the budget hold is recorded (its detail starts so).
HOLD_REFUSAL = "refused: the stack is on budget hold"
#: A budget notification whose period began longer ago than a month is of a period that has
#: ended (budgets here are monthly): late, it says nothing about this month's spend.
STALE_PERIOD = timedelta(days=31)
UNARCHIVED_LIMIT = 20


class NoteKind(StrEnum):
    """What a decision did, as a stable kind: counted by the fault campaign and the tests, and
    logged as a field, so rewording a note's text changes nothing that reads it."""

    QUEUED = "queued"
    DUPLICATE_START = "duplicate_start"
    START_REDELIVERED = "start_redelivered"  # a start for a starting run re-issued its nodes
    REJECTED = "rejected"
    REJECTION_REPEATED = "rejection_repeated"
    DEQUEUED = "dequeued"
    LEASE_ENDED_EARLY = "lease_ended_early"
    STOP_NOOP = "stop_noop"
    STOP_UNKNOWN = "stop_unknown"
    MARKER_IGNORED = "marker_ignored"  # the run is not live, or the node is not one of it
    MARKER_STALE = "marker_stale"
    MARKER_DUPLICATE = "marker_duplicate"
    NODE_BOOTED = "node_booted"
    NODE_EXITED = "node_exited"
    RUN_RUNNING = "run_running"
    START_REISSUED = "start_reissued"  # the sweeper started again VMs that are not up
    SHEPHERD_RESENT = "shepherd_resent"
    ORPHANS_STOPPED = "orphans_stopped"
    FIRST_BOOT_SPARED = "first_boot_spared"  # a VM still in its first boot is not an orphan
    LEASE_EXPIRED = "lease_expired"
    LEASE_TAKEN_OVER = "lease_taken_over"
    RUN_STARTING = "run_starting"
    RUN_ENDED = "run_ended"  # `ended` says why
    RUN_RESTARTING = "run_restarting"
    RECORD_REWRITTEN = "record_rewritten"
    START_FAILURE_STALE = "start_failure_stale"
    BUDGET_HOLD = "budget_hold"  # the budget switch tripped: every VM stopped, starts refused
    BUDGET_UNDER = "budget_under"  # a notification under the threshold
    BUDGET_HELD = "budget_held"  # over the threshold again while held: no-op
    BUDGET_STALE = "budget_stale"  # a notification of an older budget period: no-op
    BUDGET_LIFTED_PERIOD = "budget_lifted_period"  # over, in a period a person lifted: no-op
    BUDGET_RESUMED = "budget_resumed"
    BUDGET_RESUME_NOOP = "budget_resume_noop"
    LATE_DONE_RECORDED = "late_done_recorded"  # an ended run's record took a late exit code


@dataclass(frozen=True)
class Note:
    """One thing a decision did: its kind, the run it concerns, and the text for people."""

    kind: NoteKind
    run_id: str | None
    text: str
    ended: Reason | None = None  # for RUN_ENDED: the run's end reason


@dataclass(frozen=True)
class Transition:
    state: StackState
    commands: tuple[Command, ...]
    notes: tuple[Note, ...] = ()

    @property
    def reason(self) -> str:
        """The notes' texts joined with "; " (derived; what log lines and tests read)."""
        return "; ".join(n.text for n in self.notes) or "no change"

    def kinds(self) -> tuple[NoteKind, ...]:
        return tuple(n.kind for n in self.notes)


class _Tx:
    """Accumulates one decision: the evolving state, the commands and the notes."""

    def __init__(self, state: StackState) -> None:
        self.state = state
        self.commands: list[Command] = []
        self.notes: list[Note] = []

    def note(self, kind: NoteKind, run_id: str | None, text: str,
             ended: Reason | None = None) -> None:
        self.notes.append(Note(kind, run_id, text, ended))

    def emit(self, *commands: Command) -> None:
        self.commands.extend(commands)


def decide(state: StackState, event: Event, now: datetime, policy: Policy) -> Transition:
    tx = _Tx(state)
    if isinstance(event, StartRequest):
        _on_start(tx, event, now, policy)
    elif isinstance(event, StopRequest):
        _on_stop(tx, event, now, policy)
    elif isinstance(event, NodeMarker):
        _on_marker(tx, event)
    elif isinstance(event, Reconcile):
        _on_reconcile(tx, event, now, policy)
    elif isinstance(event, StartFailed):
        _on_start_failed(tx, event, now, policy)
    elif isinstance(event, Rejected):
        _reject(tx, event.run_id, event.detail, now, policy)
    elif isinstance(event, BudgetNotification):
        _on_budget(tx, event, now, policy)
    elif isinstance(event, BudgetResume):
        _on_budget_resume(tx, event, now)
    else:  # pragma: no cover - the Event union is closed
        raise TypeError(f"unknown event {type(event).__name__}")
    _progress(tx, now, policy)
    _expire(tx, now, policy)
    _advance(tx, now, policy)
    return Transition(tx.state, tuple(tx.commands), tuple(tx.notes))


def fold_markers(state: StackState, markers: tuple[NodeMarker, ...]) -> StackState:
    """The stack state with its active run's node phases derived from `markers` (those in the
    bucket): the one definition of a node's phase. Node progress lives in the markers, never
    in the stack document (`compact`), so every reader (the functions, the sweeper, the CLI)
    derives it this way. Pure: no run-level transition happens here (decide() does those)."""
    tx = _Tx(state)
    _apply_news(tx, markers)
    return tx.state


def late_markers(run: Run, markers: Iterable[NodeMarker]) -> Run | None:
    """An ended run with what its nodes' late markers say, or None when they add nothing.

    A node that was still running when the run ended (the others were stopped after the
    first failure, or the shepherd was still lingering) writes `done` afterwards. Its exit
    code, signal and duration belong in the record and the summary; the run's outcome
    (reason, detail, status, history) stays what decide() made it. Only markers of the
    attempt that ended count, and a node's recorded `done` is never replaced."""
    if run.phase is not Phase.ENDED:
        return None
    updated = run
    for m in sorted(markers, key=lambda m: (m.kind != "booted", m.at)):
        node = updated.node(m.node)
        if m.run_id != run.run_id or m.attempt != run.attempt or node is None \
                or node.phase is NodePhase.DONE:
            continue
        if m.kind == "booted":
            if node.phase is NodePhase.PENDING:
                updated = updated.with_node(replace(node, phase=NodePhase.BOOTED,
                                                    booted_at=m.at))
            continue
        updated = updated.with_node(replace(
            node, phase=NodePhase.DONE, booted_at=node.booted_at or m.at, done_at=m.at,
            exit_code=m.exit_code, signal=m.signal, duration_s=m.duration_s))
    return None if updated == run else updated


def markers_in(listing: Iterable[Listed]) -> tuple[tuple[NodeMarker, ...], tuple[str, ...]]:
    """The markers a listing of markers/<run>/ describes in its objects' metadata, and the
    names of the marker objects that do not describe themselves (the caller may read them).
    Objects that are no markers (a malformed name or body) are left out, as their events were."""
    found: list[NodeMarker] = []
    unread: list[str] = []
    for item in listing:
        try:
            NodeMarker.parse_path(item.name)
            marker = NodeMarker.from_metadata(dict(item.metadata), item.name)
        except PermanentError:
            continue
        if marker is None:
            unread.append(item.name)
        else:
            found.append(marker)
    return tuple(found), tuple(unread)


def markers_could_move_run(marker: NodeMarker, markers: tuple[NodeMarker, ...],
                           nodes: tuple[str, ...]) -> bool:
    """Whether the run's markers (those listed, `marker` among them) could make a run-level
    transition of `marker`'s attempt, whatever the stack state: a failure (fail fast), every
    node done, or every node booted where `marker` may be what completes the boot. When not,
    the event only records a node's progress, which lives in the markers: the service then
    neither reads nor writes the stack document."""
    mine = [m for m in (*markers, marker) if m.attempt == marker.attempt]
    done = {m.node for m in mine if m.kind == "done"}
    if any(m.kind == "done" and (m.exit_code != 0 or m.signal is not None
                                 or m.end_reason is not None) for m in mine):
        return True
    if set(nodes) <= done:
        return True
    if not set(nodes) <= {m.node for m in mine}:
        return False
    # Every node booted (or done). A booted marker may be the last boot; a done marker only
    # when its node's boot was never seen (a done before its booted counts as the boot).
    return marker.kind == "booted" or not any(
        m.node == marker.node and m.kind == "booted" for m in mine)


def compact(state: StackState) -> StackState:
    """What the stack document holds: the state without the active run's node progress,
    which lives in the markers. The document then changes only when the run does (queued,
    starting, running, ended, restarted) or the queue or lease does."""
    run = state.active
    if run is None or run.phase not in LIVE or all(
            n == NodeState(n.name) for n in run.nodes):
        return state
    return replace(state, active=replace(run, nodes=tuple(NodeState(n.name) for n in run.nodes)))


# ---------------------------------------------------------------- requests


def _on_start(tx: _Tx, req: StartRequest, now: datetime, policy: Policy) -> None:
    known = tx.state.find(req.run_id)
    active = tx.state.active
    if (active is not None and active.run_id == req.run_id and active.phase is Phase.STARTING
            and active.deadline is not None and now >= active.deadline):
        # Past its deadline (a short cap, a late redelivery): it ends now, nothing restarts.
        tx.note(NoteKind.DUPLICATE_START, req.run_id, f"duplicate start request for run "
                f"{req.run_id} (starting, past its deadline): no re-issue")
        return
    if active is not None and active.run_id == req.run_id and active.phase is Phase.STARTING:
        # A redelivery after a transient failure: re-issue what has not booted (idempotent).
        pending = [n.name for n in active.nodes if n.phase is NodePhase.PENDING]
        _reissue(tx, active, pending, policy)
        tx.note(NoteKind.START_REDELIVERED, req.run_id,
                f"duplicate start request for run {req.run_id} (starting): re-issued the start "
                f"of {', '.join(pending) or 'no node'}")
        return
    if (isinstance(known, RecentRun) and known.reason is Reason.REJECTED
            and not known.detail.startswith(HOLD_REFUSAL)):
        # (Refused by the budget hold it stays refused: a late duplicate of that request
        # must not start the run after the hold is lifted; a new request has a new id.)
        # A corrected request may reuse the id of one that was rejected and never ran.
        tx.state = replace(tx.state, recent=tuple(r for r in tx.state.recent
                                                  if r.run_id != req.run_id))
        known = None
    if known is not None:
        tx.note(NoteKind.DUPLICATE_START, req.run_id,
                f"duplicate start request for run {req.run_id} ({known.status.value}): no-op")
        return
    if req.stack is not None and req.stack != policy.stack:
        _reject(tx, req.run_id, f"start request is for stack {req.stack!r}, "
                f"but this is stack {policy.stack!r}", now, policy)
        return
    program = program_of(req.binary, req.image, policy.default_binary, policy.default_image)
    if program.binary is None and program.image is None:
        _reject(tx, req.run_id, "no binary: pass one (or an image) in the request or set "
                "pcp:binary or pcp:image on the stack", now, policy)
        return
    hold = tx.state.budget.hold
    if hold is not None:
        _reject(tx, req.run_id, f"{HOLD_REFUSAL} since {iso(hold.since)} ({hold.text}): no "
                f"run starts, queued runs wait; a person lifts it with `pcp budget resume "
                f"--stack {policy.stack}`, then request the run again under a new run id",
                now, policy)
        return
    pinned = ""
    if program.image is not None:
        ref = parse_image(program.image)
        pinned = ref.by_digest if ref.pinned else req.pinned_image
        if not pinned or parse_image(pinned).name != ref.name:
            _reject(tx, req.run_id, f"image {program.image} was not resolved to a digest "
                    "(name it by digest, REGISTRY/REPO@sha256:...)", now, policy)
            return
    if len(tx.state.queue) >= policy.max_queue:
        _reject(tx, req.run_id, f"the queue of stack {policy.stack} is full "
                f"({policy.max_queue} runs waiting)", now, policy)
        return
    cap = policy.run_cap(req.max_cost_usd)
    if cap is not None and policy.hourly_usd <= 0:
        _reject(tx, req.run_id, f"max_cost_usd {cap:g} cannot become a deadline: stack "
                f"{policy.stack} has no hourly prices (set pcp:worker_hourly_usd)", now, policy)
        return
    run = Run(request=req, phase=Phase.QUEUED, accepted_at=now, secret=req.secret,
              max_cost_usd=cap, image=pinned)
    why = "accepted"
    if req.max_hours is not None and req.max_hours > policy.max_run_hours:
        why += f"; max_hours {req.max_hours:g} capped to the stack limit {policy.max_run_hours:g}"
    if cap is not None:
        why += (f"; cost cap ${cap:g}" + ("" if req.max_cost_usd is not None else
                                          " (the stack's default)"))
    run = run.entered(now, why)
    tx.state = replace(tx.state, queue=(*tx.state.queue, run))
    tx.note(NoteKind.QUEUED, req.run_id,
            f"run {req.run_id} {why}, queue position {len(tx.state.queue)}")


def _reject(tx: _Tx, run_id: str, detail: str, now: datetime, policy: Policy) -> None:
    known = tx.state.find(run_id)
    if known is not None:
        tx.note(NoteKind.REJECTION_REPEATED, run_id,
                f"rejected request repeats run {run_id} ({known.status.value}): no-op")
        return
    run = Run(
        request=StartRequest(run_id=run_id),
        phase=Phase.ENDED,
        accepted_at=now,
        ended_at=now,
        reason=Reason.REJECTED,
        detail=detail,
    ).entered(now, detail)
    _remember(tx, run, policy)
    tx.emit(ArchiveRun(run))
    tx.note(NoteKind.REJECTED, run_id, f"rejected run {run_id}: {detail}")


def _on_stop(tx: _Tx, req: StopRequest, now: datetime, policy: Policy) -> None:
    state = tx.state
    why = req.reason + (f" (by {req.requested_by})" if req.requested_by else "")
    if state.active is not None and state.active.run_id == req.run_id:
        _end(tx, Reason.CANCELLED, why, now, policy)
        return
    position = state.queue_position(req.run_id)
    if position is not None:
        run = state.queue[position - 1]
        queue = tuple(r for r in state.queue if r.run_id != req.run_id)
        detail = f"removed from the queue: {why}"
        ended = run.moved(now, Phase.ENDED, detail, ended_at=now, reason=Reason.CANCELLED,
                          detail=detail)
        tx.state = replace(state, queue=queue)
        _remember(tx, ended, policy)
        tx.emit(ArchiveRun(ended))
        tx.note(NoteKind.DEQUEUED, req.run_id,
                f"run {req.run_id} removed from the queue at position {position}: {why}")
        return
    if state.lease is not None and state.lease.run_id == req.run_id:
        tx.emit(StopNodes(state.lease.vms, f"keep-alive of run {req.run_id} ended early: {why}",
                          req.run_id))
        tx.state = replace(state, lease=None)
        tx.note(NoteKind.LEASE_ENDED_EARLY, req.run_id,
                f"keep-alive lease of run {req.run_id} ended early: {why}")
        return
    known = state.find(req.run_id)
    if known is not None:
        tx.note(NoteKind.STOP_NOOP, req.run_id,
                f"stop for run {req.run_id}: already {known.status.value}, no-op")
        return
    tx.note(NoteKind.STOP_UNKNOWN, req.run_id,
            f"rejected stop: unknown run {req.run_id!r} (not active, queued or recent)")


# ---------------------------------------------------------------- node markers


def _on_marker(tx: _Tx, m: NodeMarker) -> None:
    run = tx.state.active
    if run is None or run.run_id != m.run_id or run.phase not in LIVE:
        known = tx.state.find(m.run_id)
        status = known.status.value if known is not None else "unknown"
        tx.note(NoteKind.MARKER_IGNORED, m.run_id,
                f"{m.kind} marker from {m.node} for run {m.run_id} ({status}): no-op")
        return
    if m.attempt != run.attempt:
        tx.note(NoteKind.MARKER_STALE, m.run_id, f"stale {m.kind} marker from {m.node}, attempt "
                f"{m.attempt} (run {run.run_id} is on attempt {run.attempt}): no-op")
        return
    node = run.node(m.node)
    if node is None:
        tx.note(NoteKind.MARKER_IGNORED, m.run_id,
                f"{m.kind} marker from {m.node}, which is not a node of run {run.run_id}: no-op")
        return
    if m.kind == "booted":
        if node.phase is not NodePhase.PENDING:
            tx.note(NoteKind.MARKER_DUPLICATE, m.run_id,
                    f"duplicate booted marker from {m.node}: no-op")
            return
        _set_node(tx, replace(node, phase=NodePhase.BOOTED, booted_at=m.at),
                  NoteKind.NODE_BOOTED, f"{m.node} booted")
        return
    if node.phase is NodePhase.DONE:
        tx.note(NoteKind.MARKER_DUPLICATE, m.run_id, f"duplicate done marker from {m.node}: no-op")
        return
    done = replace(node, phase=NodePhase.DONE, booted_at=node.booted_at or m.at, done_at=m.at,
                   exit_code=m.exit_code, signal=m.signal, duration_s=m.duration_s,
                   end_reason=m.end_reason)
    _set_node(tx, done, NoteKind.NODE_EXITED, f"{m.node} exited {_exit_text(done)}")


def _progress(tx: _Tx, now: datetime, policy: Policy) -> None:
    """What the nodes' phases mean for the run: running once every node booted, failed at the
    first non-zero exit (fail fast), succeeded once every node exited with code 0. Level-
    triggered: it holds whatever event brought the phases (a marker, a sweep's listing)."""
    run = tx.state.active
    if run is None or run.phase not in LIVE:
        return
    if run.phase is Phase.STARTING and all(n.phase is not NodePhase.PENDING for n in run.nodes):
        run = run.moved(now, Phase.RUNNING, "every node booted")
        tx.state = replace(tx.state, active=run)
        tx.note(NoteKind.RUN_RUNNING, run.run_id, "every node booted, run is running")
    failed = sorted((n for n in run.nodes if n.phase is NodePhase.DONE and n.failed),
                    key=lambda n: (n.done_at or now, n.name))
    end_reason = failed[0].end_reason if failed else None
    if failed and end_reason is not None:  # the node's agent ended it and said why
        first = failed[0]
        _end(tx, Reason(end_reason), f"{first.name}: {_END_TEXT[end_reason]} "
             f"(exited {_exit_text(first)})", now, policy)
    elif failed and run.deadline is not None and (failed[0].done_at or now) >= run.deadline:
        # Stopped by its deadline (the node's dead-man's switch ends the binary there): the
        # deadline is why, not the exit it caused.
        _end(tx, Reason.TIMED_OUT, f"{_deadline_text(run, policy)}; {failed[0].name} exited "
             f"{_exit_text(failed[0])}", now, policy)
    elif failed:
        _end(tx, Reason.FAILED, f"{failed[0].name} exited {_exit_text(failed[0])}", now, policy)
    elif run.nodes and all(n.phase is NodePhase.DONE for n in run.nodes):
        _end(tx, Reason.SUCCEEDED, f"all {len(run.nodes)} nodes exited with code 0", now, policy)


_END_TEXT = {
    Reason.GPU_IDLE.value: "every GPU stayed idle past the run's gpu_idle policy",
    Reason.MAINTENANCE.value: "host maintenance notice",
    Reason.PREEMPTED.value: "Spot VM preempted",
}


def _exit_text(node: NodeState) -> str:
    if node.signal is not None:
        return f"on signal {node.signal}"
    return f"with code {node.exit_code}"


def _set_node(tx: _Tx, node: NodeState, kind: NoteKind, text: str) -> None:
    run = tx.state.active
    assert run is not None
    tx.state = replace(tx.state, active=run.with_node(node))
    tx.note(kind, run.run_id, text)


# ---------------------------------------------------------------- reconcile


def _on_reconcile(tx: _Tx, ev: Reconcile, now: datetime, policy: Policy) -> None:
    _heal_archive(tx, ev.archived)
    _apply_news(tx, ev.markers)
    _progress(tx, now, policy)
    _expire(tx, now, policy)
    views = {v.name: v for v in ev.vms}
    run = tx.state.active
    if run is not None and run.phase in LIVE:
        _check_nodes(tx, run, views, now, policy)
    _stop_orphans(tx, ev, now, policy)


def _apply_news(tx: _Tx, markers: tuple[NodeMarker, ...]) -> None:
    """Apply the markers that change something, boots first, each in the order written."""
    for marker in sorted(markers, key=lambda m: (m.kind != "booted", m.at)):
        if _marker_is_news(tx.state, marker):
            _on_marker(tx, marker)


def _marker_is_news(state: StackState, m: NodeMarker) -> bool:
    return marker_would_change(state, m.run_id, m.node, m.kind, m.attempt)


def marker_would_change(state: StackState, run_id: str, node_name: str, kind: str,
                        attempt: int | None) -> bool:
    """Whether a marker would still change the active run: the one definition the lifecycle
    and the service's fold share. `attempt` None: not known yet (only the path was read)."""
    run = state.active
    if run is None or run.run_id != run_id or (attempt is not None and run.attempt != attempt):
        return False
    node = run.node(node_name)
    if node is None or node.phase is NodePhase.DONE:
        return False
    return kind == "done" or node.phase is NodePhase.PENDING


def vm_holds(run: Run, vm: VmView | None) -> bool:
    """Whether `vm` is up under `run`'s current attempt."""
    return vm is not None and vm.up and holds_attempt(vm.labels, run.run_id, run.attempt)


def looks_lost(run: Run, vms: Iterable[VmView], policy: Policy) -> bool:
    """Whether a booted, unfinished worker of `run` has no VM up under its attempt: what
    the sweep ends a run for (`node_lost`)."""
    views = {v.name: v for v in vms}
    return any(n.phase is NodePhase.BOOTED and (vm := policy.vm_of(n.name)) is not None
               and not vm_holds(run, views.get(vm)) for n in run.nodes)


def _check_nodes(tx: _Tx, run: Run, views: dict[str, VmView], now: datetime,
                 policy: Policy) -> None:
    """Fail fast on a lost node; re-issue what a crash between save and execute dropped."""
    restart: list[str] = []
    for node in run.nodes:
        vm_name = policy.vm_of(node.name)
        if vm_name is None or node.phase is NodePhase.DONE or vm_holds(run, views.get(vm_name)):
            continue
        vm = views.get(vm_name)
        if node.phase is NodePhase.BOOTED:
            status = "missing" if vm is None else vm.status
            _end(tx, Reason.NODE_LOST, f"{node.name} lost: VM {vm_name} is {status}", now,
                 policy)
            return
        # Not booted yet: its start never happened, failed, or the VM was preempted while
        # booting. Starting it again is idempotent, and the boot timeout bounds the retries.
        restart.append(node.name)
    if restart:
        tx.note(NoteKind.START_REISSUED, run.run_id,
                f"re-issued start for {', '.join(restart)} (VM not up under run {run.run_id})")
    shepherd = run.node("shepherd")
    if run.phase is Phase.STARTING and shepherd is not None and shepherd.phase is NodePhase.PENDING:
        restart.append("shepherd")
        tx.note(NoteKind.SHEPHERD_RESENT, run.run_id,
                "re-sent the start command to the shepherd (not booted yet)")
    _reissue(tx, run, restart, policy)


def _reissue(tx: _Tx, run: Run, nodes: list[str], policy: Policy) -> None:
    """Start again the named nodes of the active attempt; both commands are idempotent."""
    workers = tuple(a for a in _assignments(run, policy)
                    if a.node in nodes and a.role == "worker")
    if workers:
        tx.emit(StartNodes(run.run_id, run.attempt, workers, _deadline(run)))
    if "shepherd" in nodes:
        tx.emit(CommandShepherd(_shepherd_start(run, policy)))


def _stop_orphans(tx: _Tx, ev: Reconcile, now: datetime, policy: Policy) -> None:
    state = tx.state
    if state.budget.hold is not None:  # the budget switch: no VM of the stack may run
        up = tuple(sorted(v.name for v in ev.vms if v.up))
        if up:
            tx.emit(StopNodes(up, "budget hold: no VM of the stack may run"))
            tx.note(NoteKind.ORPHANS_STOPPED, None,
                    f"stopping {', '.join(up)}: the stack is on budget hold")
        return
    allowed: set[str] = set()
    if state.active is not None and state.active.phase in LIVE:
        allowed.update(vm for n in state.active.nodes if (vm := policy.vm_of(n.name)))
    if state.lease is not None and state.lease.until > now:
        allowed.update(state.lease.vms)
    if ev.state_lost:
        epoch = int(now.timestamp())
        allowed.update(v.name for v in ev.vms if (v.label_epoch(LABEL_KEEP_ALIVE) or 0) > epoch)
    stopping = {vm for c in tx.commands if isinstance(c, StopNodes) for vm in c.vms}
    young = now.timestamp() - policy.first_boot_grace_minutes * 60
    first_boot = tuple(sorted(v.name for v in ev.vms
                              if v.up and v.name not in allowed and v.name not in stopping
                              and LABEL_RUN not in v.labels and v.created is not None
                              and v.created > young))
    if first_boot:
        allowed.update(first_boot)
        tx.note(NoteKind.FIRST_BOOT_SPARED, None,
                f"left {', '.join(first_boot)} running: never given a run and created less "
                f"than {policy.first_boot_grace_minutes:g} min ago (first boot)")
    orphans = tuple(sorted(v.name for v in ev.vms
                           if v.up and v.name not in allowed and v.name not in stopping))
    if orphans:
        why = "stack state was lost" if ev.state_lost else "no run or lease holds it"
        tx.emit(StopNodes(orphans, f"orphan: {why}"))
        tx.note(NoteKind.ORPHANS_STOPPED, None, f"stopping orphan VMs {', '.join(orphans)}: {why}")


# ---------------------------------------------------------------- time


def _expire(tx: _Tx, now: datetime, policy: Policy) -> None:
    run = tx.state.active
    if run is not None and run.phase in LIVE:
        if run.deadline is not None and now >= run.deadline:
            _end(tx, Reason.TIMED_OUT, _deadline_text(run, policy), now, policy)
        elif (run.phase is Phase.STARTING and run.started_at is not None
              and now >= run.started_at + policy.boot_timeout):
            late = [n.name for n in run.nodes if n.phase is NodePhase.PENDING]
            _end(tx, Reason.BOOT_TIMEOUT, f"{', '.join(late)} did not boot within "
                 f"{policy.boot_timeout_minutes:g} min", now, policy)
    lease = tx.state.lease
    if lease is not None and now >= lease.until:
        tx.emit(StopNodes(lease.vms, f"keep-alive lease of run {lease.run_id} ended", lease.run_id))
        tx.state = replace(tx.state, lease=None)
        tx.note(NoteKind.LEASE_EXPIRED, lease.run_id,
                f"keep-alive lease of run {lease.run_id} ended at {iso(lease.until)}")


def _deadline_text(run: Run, policy: Policy) -> str:
    assert run.deadline is not None
    why = f"deadline {iso(run.deadline)} passed"
    if run.deadline_by == "max_cost_usd" and run.max_cost_usd is not None:
        why = (f"cost cap ${run.max_cost_usd:g} reached: {why} (the nodes at "
               f"${policy.hourly_usd:g}/h)")
    return why


# ---------------------------------------------------------------- start and end


def _advance(tx: _Tx, now: datetime, policy: Policy) -> None:
    if tx.state.active is not None or not tx.state.queue or tx.state.budget.hold is not None:
        return
    run, rest = tx.state.queue[0], tx.state.queue[1:]
    limit = policy.run_limit(now, run.request.max_hours, run.max_cost_usd, run.cost_usd or 0.0)
    by = ("max_hours" if limit.by == "max_hours" else
          f"cost cap ${run.max_cost_usd:g} at ${policy.hourly_usd:g}/h"
          + (f", ${run.cost_usd:g} spent before" if run.cost_usd else ""))
    run = run.moved(now, Phase.STARTING,
                    f"attempt {run.attempt}: starting {policy.worker_count} worker(s) and the "
                    f"shepherd, deadline in {limit.hours:.4g} h (set by {by})",
                    started_at=now, deadline=limit.deadline, deadline_by=limit.by,
                    nodes=tuple(NodeState(n) for n in policy.node_names))
    state = replace(tx.state, active=run, queue=rest)
    if state.lease is not None:
        tx.note(NoteKind.LEASE_TAKEN_OVER, state.lease.run_id, f"VMs kept alive for run "
                f"{state.lease.run_id} are taken over by run {run.run_id}")
        state = replace(state, lease=None)
    tx.state = state
    tx.emit(
        StartNodes(run.run_id, run.attempt, _assignments(run, policy)[1:], _deadline(run)),
        CommandShepherd(_shepherd_start(run, policy)),
        ArchiveRun(run),
    )
    tx.note(NoteKind.RUN_STARTING, run.run_id, f"run {run.run_id} attempt {run.attempt} starting")


def _deadline(run: Run) -> datetime:
    assert run.deadline is not None
    return run.deadline


def _assignments(run: Run, policy: Policy) -> tuple[Assignment, ...]:
    """Shepherd first (rank 0), then workers 1..n."""
    assert run.started_at is not None
    # The image every node pulls is the one pinned at acceptance, whatever a tag says now.
    program = program_of(run.request.binary, run.request.image, policy.default_binary,
                         run.image or None)
    if program.image is not None:
        program = replace(program, image=run.image or None)
    # A torchrun binary makes the run workers-only, whatever the request's layout says.
    layout = run_layout(run.request.layout, program.for_role("worker")[0], policy.default_layout)
    return tuple(
        Assignment(
            run_id=run.run_id,
            attempt=run.attempt,
            stack=policy.stack,
            node=name,
            role="shepherd" if name == "shepherd" else "worker",
            rank=rank,
            num_nodes=len(policy.node_names),
            head_host=policy.shepherd_host,
            port=policy.tcp_port,
            binary=program.for_role("shepherd" if name == "shepherd" else "worker")[0],
            image=program.for_role("shepherd" if name == "shepherd" else "worker")[1],
            args=run.request.training_args,
            deadline=_deadline(run),
            boot_deadline=run.started_at + policy.boot_timeout,
            keep_vm_alive=run.request.keep_vm_alive,
            secret=run.secret,
            layout=layout,
            gpu_idle=run.request.gpu_idle or policy.default_gpu_idle,
            wandb_project=run.request.wandb_project or policy.default_wandb_project,
            wandb_entity=run.request.wandb_entity or policy.default_wandb_entity,
        )
        for rank, name in enumerate(policy.node_names)
    )


def _shepherd_start(run: Run, policy: Policy) -> ShepherdCommand:
    return ShepherdCommand("start", run.run_id, run.attempt, _assignments(run, policy)[0])


def _end(tx: _Tx, reason: Reason, detail: str, now: datetime, policy: Policy) -> None:
    """End the active attempt: fail fast, stop every node unless kept alive, maybe restart."""
    run = tx.state.active
    assert run is not None
    cost = (run.cost_usd or 0.0) + policy.estimate_cost(run.started_at or now, now)
    ended = run.moved(now, Phase.ENDED, f"{reason.value}: {detail}", ended_at=now,
                      reason=reason, detail=detail, cost_usd=round(cost, 4))
    vms = policy.worker_vms
    restart = reason in RESTARTABLE and run.attempt <= run.request.max_restarts
    if restart and run.max_cost_usd is not None and cost >= run.max_cost_usd - 1e-4:
        # Restarts share the run's cap: an attempt with nothing left to spend never starts.
        restart = False
        detail += f"; no restart: the cost cap ${run.max_cost_usd:g} is spent"
        ended = replace(ended, detail=detail)
    until = min(now + timedelta(hours=policy.keep_alive_hours), _deadline(run))
    # Only an attempt whose every node booted is known to hold every VM: before that, a VM
    # may still run an earlier run's assignment (a refused or interrupted start), and a lease
    # would keep it past that run's deadline (found by the fault campaign).
    keep = (run.request.keep_vm_alive and not restart and until > now
            and run.phase is Phase.RUNNING
            and reason not in (Reason.CANCELLED, Reason.TIMED_OUT, Reason.BUDGET_EXCEEDED))
    state = replace(tx.state, active=None)
    shepherd = run.node("shepherd")
    if shepherd is None or shepherd.phase is not NodePhase.DONE:
        tx.emit(CommandShepherd(ShepherdCommand("stop", run.run_id, run.attempt,
                                                reason=f"{reason.value}: {detail}")))
    if keep:
        ended = replace(ended, keep_alive_until=until)
        state = replace(state, lease=Lease(run.run_id, vms, until))
        tx.emit(LabelNodes(vms, ((LABEL_KEEP_ALIVE, str(int(until.timestamp()))),)))
        tx.note(NoteKind.RUN_ENDED, run.run_id, f"run {run.run_id} {reason.value}: {detail}; "
                f"VMs kept alive until {iso(until)}", ended=reason)
    else:
        tx.emit(StopNodes(vms, f"run {run.run_id} {reason.value}", run.run_id))
        tx.note(NoteKind.RUN_ENDED, run.run_id,
                f"run {run.run_id} {reason.value}: {detail}; stopping every node", ended=reason)
    tx.state = state
    if restart:
        again = ended.moved(now, Phase.QUEUED, f"restart {run.attempt + 1} of "
                            f"{run.request.max_restarts + 1} after {reason.value}: {detail}",
                            attempt=run.attempt + 1, started_at=None, ended_at=None,
                            deadline=None, deadline_by=None, nodes=(), reason=None, detail="")
        tx.state = replace(tx.state, queue=(again, *tx.state.queue))
        tx.note(NoteKind.RUN_RESTARTING, run.run_id,
                f"run {run.run_id} will restart as attempt {run.attempt + 1}")
        return
    _remember(tx, ended, policy)
    tx.emit(ArchiveRun(ended))


def _remember(tx: _Tx, run: Run, policy: Policy) -> None:
    """Record an ended run; keep it whole until the sweeper sees its record written."""
    recent = (RecentRun.of(run), *tx.state.recent)[: policy.recent_limit]
    unarchived = (*tx.state.unarchived, run)[-UNARCHIVED_LIMIT:]
    tx.state = replace(tx.state, recent=recent, unarchived=unarchived)


def _heal_archive(tx: _Tx, archived: frozenset[str]) -> None:
    """Drop ended runs whose record is written; write again those whose write was lost."""
    pending = tx.state.unarchived
    if not pending:
        return
    missing = tuple(r for r in pending if r.run_id not in archived)
    tx.state = replace(tx.state, unarchived=missing)
    for run in missing:
        tx.emit(ArchiveRun(run))
    if missing:
        tx.note(NoteKind.RECORD_REWRITTEN, None, f"re-wrote the record of "
                f"{', '.join(r.run_id for r in missing)} (its first write was lost)")


def _on_start_failed(tx: _Tx, ev: StartFailed, now: datetime, policy: Policy) -> None:
    run = tx.state.active
    if run is None or run.run_id != ev.run_id or run.attempt != ev.attempt:
        tx.note(NoteKind.START_FAILURE_STALE, ev.run_id,
                f"start failure for run {ev.run_id} attempt {ev.attempt} is stale: no-op")
        return
    _end(tx, Reason.FAILED, f"could not start the VMs: {ev.detail}", now, policy)


# ---------------------------------------------------------------- the budget switch


def _on_budget(tx: _Tx, n: BudgetNotification, now: datetime, policy: Policy) -> None:
    """A Cloud Billing notification (already checked to be the stack's own budget). Spend
    past the threshold trips the hold: the active run ends, the lease ends, every VM stops,
    and no run starts until a person lifts it. Notifications never lift it; one of an older
    period is stale, and one of the period a person lifted the hold for trips nothing."""
    budget = tx.state.budget
    period = n.cost_interval_start
    if now - period > STALE_PERIOD:
        tx.note(NoteKind.BUDGET_STALE, None, f"budget notification of the period from "
                f"{iso(period)}, which ended before {iso(now)}: no-op")
        return
    if budget.period is not None and period < budget.period:
        tx.note(NoteKind.BUDGET_STALE, None, f"budget notification of the period from "
                f"{iso(period)} is older than the newest seen ({iso(budget.period)}): no-op")
        return
    if budget.period is None or period > budget.period:
        budget = replace(budget, period=period)
        tx.state = replace(tx.state, budget=budget)
    spend = (f"spend {n.cost_amount:.2f} {n.currency_code} of {n.budget_amount:.2f} "
             f"{n.currency_code}")
    if not n.over(policy.budget_stop_threshold):
        tx.note(NoteKind.BUDGET_UNDER, None, f"budget notification: {spend}, under the "
                f"threshold {policy.budget_stop_threshold:g}")
        return
    if budget.hold is not None:
        tx.note(NoteKind.BUDGET_HELD, None, f"budget notification: {spend}; already on hold")
        return
    if budget.lifted is not None and period <= budget.lifted:
        tx.note(NoteKind.BUDGET_LIFTED_PERIOD, None, f"budget notification: {spend}; a person "
                f"lifted the hold for the period from {iso(budget.lifted)}: no-op")
        return
    hold = BudgetHold(now, n.budget_id, n.cost_amount, n.budget_amount, n.currency_code, period)
    tx.state = replace(tx.state, budget=replace(budget, hold=hold))
    stopped = False
    if tx.state.active is not None:
        _end(tx, Reason.BUDGET_EXCEEDED, f"budget hold: {hold.text}", now, policy)
        stopped = True
    lease = tx.state.lease
    if lease is not None:
        tx.state = replace(tx.state, lease=None)
        tx.note(NoteKind.LEASE_ENDED_EARLY, lease.run_id,
                f"keep-alive lease of run {lease.run_id} ended: budget hold")
    if not stopped or lease is not None:
        tx.emit(StopNodes(policy.worker_vms, f"budget hold: {hold.text}"))
    tx.note(NoteKind.BUDGET_HOLD, None, f"budget hold: {hold.text} passed the threshold "
            f"{policy.budget_stop_threshold:g}; every VM stopped, no run starts until "
            f"`pcp budget resume --stack {policy.stack}`")


def _on_budget_resume(tx: _Tx, ev: BudgetResume, now: datetime) -> None:
    budget = tx.state.budget
    if budget.hold is None:
        tx.note(NoteKind.BUDGET_RESUME_NOOP, None, "budget resume: the stack is not on hold, "
                "no-op")
        return
    by = f" by {ev.requested_by}" if ev.requested_by else ""
    tx.state = replace(tx.state, budget=replace(
        budget, hold=None, lifted=budget.hold.period, lifted_at=now, lifted_by=ev.requested_by))
    tx.note(NoteKind.BUDGET_RESUMED, None, f"budget hold lifted{by}: runs may start again; "
            f"notifications of the period from {iso(budget.hold.period)} trip nothing more")
