"""decide(state, event, now, policy) -> Transition: the whole run lifecycle as a pure function.

Each handler is a flat chain of early returns, each with its reason. Time arrives as an
argument; nothing here reads a clock or touches a port. The service saves the new state with a
generation precondition and only then executes the commands.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from pcp.core.commands import (
    ArchiveRun,
    Command,
    CommandShepherd,
    LabelNodes,
    StartNodes,
    StopNodes,
)
from pcp.core.events import Event, Markers, Reconcile, Rejected, StartFailed, VmView
from pcp.core.messages import (
    Assignment,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    StopRequest,
)
from pcp.core.names import LABEL_ATTEMPT, LABEL_KEEP_ALIVE, LABEL_RUN
from pcp.core.policy import Policy
from pcp.core.state import (
    RESTARTABLE,
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
UNARCHIVED_LIMIT = 20


@dataclass(frozen=True)
class Transition:
    state: StackState
    commands: tuple[Command, ...]
    reason: str


class _Tx:
    """Accumulates one decision: the evolving state, the commands and the reasons."""

    def __init__(self, state: StackState) -> None:
        self.state = state
        self.commands: list[Command] = []
        self.reasons: list[str] = []

    def note(self, reason: str) -> None:
        self.reasons.append(reason)

    def emit(self, *commands: Command) -> None:
        self.commands.extend(commands)


def decide(state: StackState, event: Event, now: datetime, policy: Policy) -> Transition:
    tx = _Tx(state)
    if isinstance(event, StartRequest):
        _on_start(tx, event, now, policy)
    elif isinstance(event, StopRequest):
        _on_stop(tx, event, now, policy)
    elif isinstance(event, NodeMarker):
        _on_marker(tx, event, now, policy)
    elif isinstance(event, Markers):
        _on_marker(tx, event.marker, now, policy)
        _apply_news(tx, event.others, now, policy)
    elif isinstance(event, Reconcile):
        _on_reconcile(tx, event, now, policy)
    elif isinstance(event, StartFailed):
        _on_start_failed(tx, event, now, policy)
    elif isinstance(event, Rejected):
        _reject(tx, event.run_id, event.detail, now, policy)
    else:  # pragma: no cover - the Event union is closed
        raise TypeError(f"unknown event {type(event).__name__}")
    _expire(tx, now, policy)
    _advance(tx, now, policy)
    return Transition(tx.state, tuple(tx.commands), "; ".join(tx.reasons) or "no change")


# ---------------------------------------------------------------- requests


def _on_start(tx: _Tx, req: StartRequest, now: datetime, policy: Policy) -> None:
    known = tx.state.find(req.run_id)
    active = tx.state.active
    if active is not None and active.run_id == req.run_id and active.phase is Phase.STARTING:
        # A redelivery after a transient failure: re-issue what has not booted (idempotent).
        pending = [n.name for n in active.nodes if n.phase is NodePhase.PENDING]
        _reissue(tx, active, pending, policy)
        tx.note(f"duplicate start request for run {req.run_id} (starting): re-issued the start "
                f"of {', '.join(pending) or 'no node'}")
        return
    if isinstance(known, RecentRun) and known.reason is Reason.REJECTED:
        # A corrected request may reuse the id of one that was rejected and never ran.
        tx.state = replace(tx.state, recent=tuple(r for r in tx.state.recent
                                                  if r.run_id != req.run_id))
        known = None
    if known is not None:
        tx.note(f"duplicate start request for run {req.run_id} ({known.status.value}): no-op")
        return
    if req.stack is not None and req.stack != policy.stack:
        _reject(tx, req.run_id, f"start request is for stack {req.stack!r}, "
                f"but this is stack {policy.stack!r}", now, policy)
        return
    if req.binary is None and not policy.default_binary:
        _reject(tx, req.run_id, "no binary: pass one in the request or set pcp:binary "
                "on the stack", now, policy)
        return
    if len(tx.state.queue) >= policy.max_queue:
        _reject(tx, req.run_id, f"the queue of stack {policy.stack} is full "
                f"({policy.max_queue} runs waiting)", now, policy)
        return
    run = Run(request=req, phase=Phase.QUEUED, accepted_at=now)
    why = "accepted"
    if req.max_hours is not None and req.max_hours > policy.max_run_hours:
        why += f"; max_hours {req.max_hours:g} capped to the stack limit {policy.max_run_hours:g}"
    run = run.log(now, "-> queued", why)
    tx.state = replace(tx.state, queue=(*tx.state.queue, run))
    tx.note(f"run {req.run_id} {why}, queue position {len(tx.state.queue)}")


def _reject(tx: _Tx, run_id: str, detail: str, now: datetime, policy: Policy) -> None:
    known = tx.state.find(run_id)
    if known is not None:
        tx.note(f"rejected request repeats run {run_id} ({known.status.value}): no-op")
        return
    run = Run(
        request=StartRequest(run_id=run_id),
        phase=Phase.ENDED,
        accepted_at=now,
        ended_at=now,
        reason=Reason.REJECTED,
        detail=detail,
    ).log(now, "-> rejected", detail)
    _remember(tx, run, policy)
    tx.emit(ArchiveRun(run))
    tx.note(f"rejected run {run_id}: {detail}")


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
        ended = replace(run, phase=Phase.ENDED, ended_at=now, reason=Reason.CANCELLED,
                        detail=f"removed from the queue: {why}")
        ended = ended.log(now, "queued -> ended", ended.detail)
        tx.state = replace(state, queue=queue)
        _remember(tx, ended, policy)
        tx.emit(ArchiveRun(ended))
        tx.note(f"run {req.run_id} removed from the queue at position {position}: {why}")
        return
    if state.lease is not None and state.lease.run_id == req.run_id:
        tx.emit(StopNodes(state.lease.vms, f"keep-alive of run {req.run_id} ended early: {why}",
                          req.run_id))
        tx.state = replace(state, lease=None)
        tx.note(f"keep-alive lease of run {req.run_id} ended early: {why}")
        return
    known = state.find(req.run_id)
    if known is not None:
        tx.note(f"stop for run {req.run_id}: already {known.status.value}, no-op")
        return
    tx.note(f"rejected stop: unknown run {req.run_id!r} (not active, queued or recent)")


# ---------------------------------------------------------------- node markers


def _on_marker(tx: _Tx, m: NodeMarker, now: datetime, policy: Policy) -> None:
    run = tx.state.active
    if run is None or run.run_id != m.run_id or run.phase not in LIVE:
        known = tx.state.find(m.run_id)
        status = known.status.value if known is not None else "unknown"
        tx.note(f"{m.kind} marker from {m.node} for run {m.run_id} ({status}): no-op")
        return
    if m.attempt != run.attempt:
        tx.note(f"stale {m.kind} marker from {m.node}, attempt {m.attempt} "
                f"(run {run.run_id} is on attempt {run.attempt}): no-op")
        return
    node = run.node(m.node)
    if node is None:
        tx.note(f"{m.kind} marker from {m.node}, which is not a node of run {run.run_id}: no-op")
        return
    if m.kind == "booted":
        if node.phase is not NodePhase.PENDING:
            tx.note(f"duplicate booted marker from {m.node}: no-op")
            return
        _set_node(tx, replace(node, phase=NodePhase.BOOTED, booted_at=m.at), now,
                  f"{m.node} booted")
        return
    if node.phase is NodePhase.DONE:
        tx.note(f"duplicate done marker from {m.node}: no-op")
        return
    done = replace(node, phase=NodePhase.DONE, booted_at=node.booted_at or m.at, done_at=m.at,
                   exit_code=m.exit_code, signal=m.signal, duration_s=m.duration_s)
    _set_node(tx, done, now, f"{m.node} exited {_exit_text(done)}")
    run = tx.state.active
    assert run is not None
    if done.failed:
        _end(tx, Reason.FAILED, f"{m.node} exited {_exit_text(done)}", now, policy)
        return
    if all(n.phase is NodePhase.DONE for n in run.nodes):
        _end(tx, Reason.SUCCEEDED, f"all {len(run.nodes)} nodes exited with code 0", now, policy)


def _exit_text(node: NodeState) -> str:
    if node.signal is not None:
        return f"on signal {node.signal}"
    return f"with code {node.exit_code}"


def _set_node(tx: _Tx, node: NodeState, now: datetime, reason: str) -> None:
    run = tx.state.active
    assert run is not None
    run = run.with_node(node)
    if run.phase is Phase.STARTING and all(n.phase is not NodePhase.PENDING for n in run.nodes):
        run = replace(run, phase=Phase.RUNNING).log(now, "starting -> running",
                                                     "every node booted")
        reason += "; every node booted, run is running"
    tx.state = replace(tx.state, active=run)
    tx.note(reason)


# ---------------------------------------------------------------- reconcile


def _on_reconcile(tx: _Tx, ev: Reconcile, now: datetime, policy: Policy) -> None:
    _heal_archive(tx, ev.archived)
    _apply_news(tx, ev.markers, now, policy)
    _expire(tx, now, policy)
    views = {v.name: v for v in ev.vms}
    run = tx.state.active
    if run is not None and run.phase in LIVE:
        _check_nodes(tx, run, views, now, policy)
    _stop_orphans(tx, ev, now, policy)


def _apply_news(tx: _Tx, markers: tuple[NodeMarker, ...], now: datetime,
                policy: Policy) -> None:
    """Apply the markers that change something, boots first, each in the order written."""
    for marker in sorted(markers, key=lambda m: (m.kind != "booted", m.at)):
        if _marker_is_news(tx.state, marker):
            _on_marker(tx, marker, now, policy)


def _marker_is_news(state: StackState, m: NodeMarker) -> bool:
    run = state.active
    if run is None or run.run_id != m.run_id or run.attempt != m.attempt:
        return False
    node = run.node(m.node)
    if node is None:
        return False
    if m.kind == "booted":
        return node.phase is NodePhase.PENDING
    return node.phase is not NodePhase.DONE


def _check_nodes(tx: _Tx, run: Run, views: dict[str, VmView], now: datetime,
                 policy: Policy) -> None:
    """Fail fast on a lost node; re-issue what a crash between save and execute dropped."""
    restart: list[str] = []
    for node in run.nodes:
        vm_name = policy.vm_of(node.name)
        if vm_name is None or node.phase is NodePhase.DONE:
            continue
        vm = views.get(vm_name)
        ours = vm is not None and vm.labels.get(LABEL_RUN) == run.run_id and \
            vm.labels.get(LABEL_ATTEMPT) == str(run.attempt)
        if vm is not None and vm.up and ours:
            continue
        if node.phase is NodePhase.BOOTED:
            status = "missing" if vm is None else vm.status
            _end(tx, Reason.NODE_LOST, f"{node.name} lost: VM {vm_name} is {status}", now,
                 policy)
            return
        # Not booted yet: its start never happened, failed, or the VM was preempted while
        # booting. Starting it again is idempotent, and the boot timeout bounds the retries.
        restart.append(node.name)
    if restart:
        tx.note(f"re-issued start for {', '.join(restart)} (VM not up under run {run.run_id})")
    shepherd = run.node("shepherd")
    if run.phase is Phase.STARTING and shepherd is not None and shepherd.phase is NodePhase.PENDING:
        restart.append("shepherd")
        tx.note("re-sent the start command to the shepherd (not booted yet)")
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
        tx.note(f"left {', '.join(first_boot)} running: never given a run and created less "
                f"than {policy.first_boot_grace_minutes:g} min ago (first boot)")
    orphans = tuple(sorted(v.name for v in ev.vms
                           if v.up and v.name not in allowed and v.name not in stopping))
    if orphans:
        why = "stack state was lost" if ev.state_lost else "no run or lease holds it"
        tx.emit(StopNodes(orphans, f"orphan: {why}"))
        tx.note(f"stopping orphan VMs {', '.join(orphans)}: {why}")


# ---------------------------------------------------------------- time


def _expire(tx: _Tx, now: datetime, policy: Policy) -> None:
    run = tx.state.active
    if run is not None and run.phase in LIVE:
        if run.deadline is not None and now >= run.deadline:
            _end(tx, Reason.TIMED_OUT, f"deadline {iso(run.deadline)} passed", now, policy)
        elif (run.phase is Phase.STARTING and run.started_at is not None
              and now >= run.started_at + policy.boot_timeout):
            late = [n.name for n in run.nodes if n.phase is NodePhase.PENDING]
            _end(tx, Reason.BOOT_TIMEOUT, f"{', '.join(late)} did not boot within "
                 f"{policy.boot_timeout_minutes:g} min", now, policy)
    lease = tx.state.lease
    if lease is not None and now >= lease.until:
        tx.emit(StopNodes(lease.vms, f"keep-alive lease of run {lease.run_id} ended", lease.run_id))
        tx.state = replace(tx.state, lease=None)
        tx.note(f"keep-alive lease of run {lease.run_id} ended at {iso(lease.until)}")


# ---------------------------------------------------------------- start and end


def _advance(tx: _Tx, now: datetime, policy: Policy) -> None:
    if tx.state.active is not None or not tx.state.queue:
        return
    run, rest = tx.state.queue[0], tx.state.queue[1:]
    hours = policy.run_hours(run.request.max_hours)
    run = replace(
        run,
        phase=Phase.STARTING,
        started_at=now,
        deadline=now + timedelta(hours=hours),
        nodes=tuple(NodeState(n) for n in policy.node_names),
    )
    run = run.log(now, "queued -> starting",
                  f"attempt {run.attempt}: starting {policy.worker_count} worker(s) and the "
                  f"shepherd, deadline in {hours:g} h")
    state = replace(tx.state, active=run, queue=rest)
    if state.lease is not None:
        tx.note(f"VMs kept alive for run {state.lease.run_id} are taken over by run {run.run_id}")
        state = replace(state, lease=None)
    tx.state = state
    tx.emit(
        StartNodes(run.run_id, run.attempt, _assignments(run, policy)[1:], _deadline(run)),
        CommandShepherd(_shepherd_start(run, policy)),
        ArchiveRun(run),
    )
    tx.note(f"run {run.run_id} attempt {run.attempt} starting")


def _deadline(run: Run) -> datetime:
    assert run.deadline is not None
    return run.deadline


def _assignments(run: Run, policy: Policy) -> tuple[Assignment, ...]:
    """Shepherd first (rank 0), then workers 1..n."""
    assert run.started_at is not None
    binary = run.request.binary if run.request.binary is not None else policy.default_binary
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
            binary=binary,
            args=run.request.training_args,
            deadline=_deadline(run),
            boot_deadline=run.started_at + policy.boot_timeout,
            keep_vm_alive=run.request.keep_vm_alive,
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
    ended = replace(run, phase=Phase.ENDED, ended_at=now, reason=reason, detail=detail,
                    cost_usd=round(cost, 4))
    ended = ended.log(now, f"{run.phase.value} -> ended", f"{reason.value}: {detail}")
    vms = policy.worker_vms
    restart = reason in RESTARTABLE and run.attempt <= run.request.max_restarts
    until = min(now + timedelta(hours=policy.keep_alive_hours), _deadline(run))
    # Only an attempt whose every node booted is known to hold every VM: before that, a VM
    # may still run an earlier run's assignment (a refused or interrupted start), and a lease
    # would keep it past that run's deadline (found by the fault campaign).
    keep = (run.request.keep_vm_alive and not restart and until > now
            and run.phase is Phase.RUNNING
            and reason not in (Reason.CANCELLED, Reason.TIMED_OUT))
    state = replace(tx.state, active=None)
    shepherd = run.node("shepherd")
    if shepherd is None or shepherd.phase is not NodePhase.DONE:
        tx.emit(CommandShepherd(ShepherdCommand("stop", run.run_id, run.attempt,
                                                reason=f"{reason.value}: {detail}")))
    if keep:
        ended = replace(ended, keep_alive_until=until)
        state = replace(state, lease=Lease(run.run_id, vms, until))
        tx.emit(LabelNodes(vms, ((LABEL_KEEP_ALIVE, str(int(until.timestamp()))),)))
        tx.note(f"run {run.run_id} {reason.value}: {detail}; VMs kept alive until {iso(until)}")
    else:
        tx.emit(StopNodes(vms, f"run {run.run_id} {reason.value}", run.run_id))
        tx.note(f"run {run.run_id} {reason.value}: {detail}; stopping every node")
    tx.state = state
    if restart:
        again = replace(ended, phase=Phase.QUEUED, attempt=run.attempt + 1, started_at=None,
                        ended_at=None, deadline=None, nodes=(), reason=None, detail="")
        again = again.log(now, "ended -> queued", f"restart {run.attempt + 1} of "
                          f"{run.request.max_restarts + 1} after {reason.value}: {detail}")
        tx.state = replace(tx.state, queue=(again, *tx.state.queue))
        tx.note(f"run {run.run_id} will restart as attempt {run.attempt + 1}")
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
        tx.note(f"re-wrote the record of {', '.join(r.run_id for r in missing)} "
                "(its first write was lost)")


def _on_start_failed(tx: _Tx, ev: StartFailed, now: datetime, policy: Policy) -> None:
    run = tx.state.active
    if run is None or run.run_id != ev.run_id or run.attempt != ev.attempt:
        tx.note(f"start failure for run {ev.run_id} attempt {ev.attempt} is stale: no-op")
        return
    _end(tx, Reason.FAILED, f"could not start the VMs: {ev.detail}", now, policy)
