"""Load -> decide -> conditional save -> execute commands.

The clock is read once by the caller and passed in. A lost compare-and-swap re-reads and
decides again; commands run only after the winning save, and each is idempotent, so a crash
between save and execute is healed by the next event or sweep (level-triggered).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pcp.core.commands import (
    ArchiveRun,
    Command,
    CommandShepherd,
    LabelNodes,
    StartNodes,
    StopNodes,
)
from pcp.core.errors import CapacityError, Conflict, CorruptState, PermanentError
from pcp.core.events import (
    Event,
    Reconcile,
    Rejected,
    StartFailed,
    VmView,
    hard_cap_stops,
)
from pcp.core.heals import heal_of, heals
from pcp.core.lifecycle import (
    LIVE,
    Note,
    NoteKind,
    Transition,
    compact,
    decide,
    late_markers,
    looks_lost,
    markers_could_move_run,
    markers_in,
)
from pcp.core.messages import NodeMarker, decode_json, dump, metrics_node_of, run_layout
from pcp.core.names import (
    AUDIT_KINDS,
    LABEL_RUN,
    STACK_DOC,
    corrupt_stack_doc,
    markers_prefix,
    run_doc,
    run_prefix,
    summary_doc,
    sweep_doc,
    wandb_group_url,
)
from pcp.core.policy import Policy
from pcp.core.ports import BlobStore, Bus, Fleet, Listed
from pcp.core.state import Phase, Run, StackState
from pcp.core.timefmt import iso
from pcp.progress import observe

LATE_ATTEMPTS = 5  # lost races on a run record before a late marker's update gives up
#: How long after its end a run's record is still checked for late markers by the sweeper:
#: the nodes still running at the end are stopped then, and exit within a VM's soft-off.
LATE_WINDOW = timedelta(hours=1)


class ConflictExhausted(Exception):
    """Too many lost races in a row; the event is retried by its trigger."""


@dataclass
class Outcome:
    """What one handled event did, for the entry point's log line and for tests."""

    transition: Transition
    saved: bool
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)
    #: A sweep's: the VMs GCE's hard cap (maxRunDuration) stopped within the last interval.
    hard_cap_stops: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        return self.transition.reason

    @property
    def commands(self) -> tuple[Command, ...]:
        return self.transition.commands


@dataclass
class Loaded:
    state: StackState  # the stack document, with the active run's node phases from its markers
    generation: int
    lost: bool  # the document was missing or unreadable
    markers: tuple[NodeMarker, ...] = ()  # the active run's markers found in the bucket


class Service:
    def __init__(self, store: BlobStore, fleet: Fleet, bus: Bus, policy: Policy, *,
                 max_attempts: int = 100, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.fleet = fleet
        self.bus = bus
        self.policy = policy
        self.max_attempts = max_attempts
        self.sleep = sleep
        # Read again before each retry after a lost race: a decision is stamped with the time
        # it is made, not the time the invocation began (a write may wait out Cloud Storage's
        # per-object limit first). None: every attempt uses the `now` it was given (tests).
        self.clock = clock

    # ------------------------------------------------------------ state

    def load(self) -> Loaded:
        blob = self.store.get(STACK_DOC)
        if blob is None:
            return Loaded(StackState(), 0, lost=True)
        try:
            return Loaded(StackState.from_json(blob.data), blob.generation, lost=False)
        except CorruptState:
            # Keep the unreadable document for a person to inspect; start afresh over it.
            self.store.put(corrupt_stack_doc(blob.generation), blob.data)
            return Loaded(StackState(), blob.generation, lost=True)

    # ------------------------------------------------------------ events

    def handle(self, event: Event | Callable[[Loaded], Event], now: datetime, *,
               unless_marker: str | None = None, listing: list[Listed] | None = None) -> Outcome:
        """Decide and save under a generation precondition, then execute the commands.

        The active run's node phases come from its markers (one listing, `fold_markers`); the
        stack document is written only when what it holds changes (`compact`): a marker that
        only records a node's progress costs no write, so N nodes booting at once do not
        contend on one object (Cloud Storage takes about one update per second per object).
        `unless_marker` leaves the event's own marker out of the fold, so decide() sees it as
        news. `event` may be a function of the loaded state (the sweep
        builds its observation from it); it is called again after every lost race.
        """
        conflicts = 0
        for attempt in range(self.max_attempts):
            if attempt and self.clock is not None:
                now = max(now, self.clock())
            loaded = self._with_progress(self.load(), unless_marker,
                                         listing if attempt == 0 else None)
            ev = event(loaded) if callable(event) else event
            transition = decide(loaded.state, ev, now, self.policy)
            stored = compact(transition.state)
            if stored == compact(loaded.state) and not loaded.lost:
                return Outcome(transition, saved=False, conflicts=conflicts,
                               errors=self.execute(transition.commands, now))
            try:
                self.store.put(STACK_DOC, stored.to_json(),
                               if_generation_match=loaded.generation)
            except Conflict:
                conflicts += 1
                self.sleep(min(0.5, 0.005 * 2 ** min(attempt, 7)) * random.uniform(0.5, 1.5))
                continue
            return Outcome(transition, saved=True, conflicts=conflicts,
                           errors=self.execute(transition.commands, now))
        raise ConflictExhausted(f"{STACK_DOC}: lost {conflicts} races in a row; retry later")

    def handle_marker(self, object_name: str, now: datetime,
                      metadata: Mapping[str, str] | None = None) -> Outcome:
        """A marker object was written: feed it to the lifecycle.

        The marker is read from the event's object metadata when the writer put it there,
        else from the object. The run's other markers come from one listing (`handle`), so
        the last of N markers to arrive sees them all and makes the run's transition; the
        others write nothing.
        """
        NodeMarker.parse_path(object_name)
        marker = NodeMarker.from_metadata(dict(metadata or {}), object_name)
        if marker is None:
            blob = self.store.get(object_name)
            if blob is None:
                raise PermanentError(f"marker {object_name} does not exist (deleted?)")
            marker = NodeMarker.from_json(blob.data, object_name)
        listing = self.store.scan(markers_prefix(marker.run_id))
        described, unread = markers_in([i for i in listing if i.name != object_name])
        if not unread and not markers_could_move_run(marker, described, self.policy.node_names):
            # Progress only: it lives in the marker itself, so nothing is read or written.
            kind = NoteKind.NODE_BOOTED if marker.kind == "booted" else NoteKind.NODE_EXITED
            text = (f"{marker.node} booted" if marker.kind == "booted" else
                    f"{marker.node} exited with code {marker.exit_code}")
            note = Note(kind, marker.run_id, text)
            outcome = Outcome(Transition(StackState(), (), (note,)), saved=False)
            # A success that cannot move a live run: should the run have ended already (a
            # stop that raced a node's own exit), the sweeper records it (_sweep_late).
            may_be_late = False
        else:
            outcome = self.handle(marker, now, unless_marker=object_name, listing=listing)
            may_be_late = self._ended_before(marker, outcome)
        if marker.kind == "done" and may_be_late and \
                self.record_late(marker.run_id, (*described, marker)):
            note = Note(NoteKind.LATE_DONE_RECORDED, marker.run_id,
                        f"{marker.node} exited after run {marker.run_id} ended: its exit "
                        "code is recorded, the run's outcome stays")
            outcome.transition = replace(outcome.transition,
                                         notes=(*outcome.transition.notes, note))
        return outcome

    @staticmethod
    def _ended_before(marker: NodeMarker, outcome: Outcome) -> bool:
        """Whether `marker`'s run may have ended before this handler decided, so its record
        is worth a read for a late exit code. Not when the decided state still has the run
        active (the marker was folded in), nor when this very decision ended it: its
        archive lists the markers after writing the ended record (`archive`)."""
        active = outcome.transition.state.active
        if active is not None and active.run_id == marker.run_id:
            return False
        return not any(isinstance(c, ArchiveRun) and c.run.run_id == marker.run_id
                       and c.run.phase is Phase.ENDED for c in outcome.commands)

    def record_late(self, run_id: str, markers: tuple[NodeMarker, ...]) -> bool:
        """Put what late `done` markers say into an ended run's record and summary.

        One read of the record; a write only when a node it shows unfinished has exited
        since (`late_markers`), under a generation precondition so that concurrent late
        markers do not undo each other. The run's outcome is never changed. True when this
        call changed the record."""
        return self._settle(run_id, markers, summarised=None)

    def _settle(self, run_id: str, markers: tuple[NodeMarker, ...] | None,
                summarised: int | None) -> bool:
        """Bring an ended run's record up to its markers, then its summary up to its record.

        `markers` None: list them afresh after reading the record. `summarised`: the
        generation of the record the summary in the bucket was last built from by this
        caller (None: no summary written yet by this caller, and none is written unless the
        record changes here). Each pass reads the record, folds in late markers under a
        generation precondition, writes the summary from what it wrote or read, and reads
        the record again: a writer that changed it meanwhile may have had its summary
        overwritten by this one, so the pass repeats until the record stands still.

        Why nothing is lost (docs/reliability.md, "Failure modes"): the only
        unconditional writes of the record are `archive`'s, and each is followed by a
        listing here. A marker written before that listing is folded in by it; one written
        after it is read by its own event's handler from a record that is already ended."""
        changed = False
        for attempt in range(LATE_ATTEMPTS):
            blob = self.store.get(run_doc(run_id))
            if blob is None:
                return changed
            try:
                run = Run.from_json(blob.data)
            except CorruptState:
                return changed  # the sweeper rewrites it from the stack document
            # Listed afresh when none were given, and after a lost race (markers written
            # meanwhile count too).
            listed = self._markers_of(run_id) if markers is None or attempt else ()
            late = late_markers(run, (*(markers or ()), *listed))
            generation = blob.generation
            if late is not None:
                try:
                    generation = self.store.put(run_doc(run_id), self._record(late),
                                                if_generation_match=blob.generation)
                except Conflict:
                    self.sleep(0.2 * random.uniform(0.5, 1.5))
                    continue
                changed, run = True, late
            elif summarised is None and not changed:
                return False  # nothing new, and the summary was not touched by this caller
            if generation != summarised:
                self.store.put(summary_doc(run_id), dump(self.summary(run)))
                summarised = generation
            again = self.store.get(run_doc(run_id))
            if again is None or again.generation == generation:
                return changed
        return changed

    def reject(self, run_id: str, detail: str, now: datetime) -> Outcome:
        return self.handle(Rejected(run_id, detail), now)

    def sweep(self, now: datetime) -> Outcome:
        """Level-triggered reconciliation against real VMs and markers; writes an audit record."""
        seen: dict[str, Any] = {}

        def observation(loaded: Loaded) -> Reconcile:
            # The node phases are already folded in from the markers (handle): what a sweep
            # adds is the run transitions lost marker events would have made. The VMs are
            # listed after the markers were read, so a node seen booted whose VM is down was
            # really lost (listed before, a VM stopped between two runs and started again for
            # the next one would look lost under that run's fresh booted marker).
            vms = tuple(self.fleet.list())
            seen.update(state_lost=loaded.lost, markers=len(loaded.markers), vms=vms)
            return Reconcile(vms=vms, markers=self._done_since(loaded, vms),
                             state_lost=loaded.lost, archived=self._archived(loaded.state))

        outcome = self.handle(observation, now)
        late = self._sweep_late(outcome.transition.state, now)
        if late:
            notes = tuple(Note(NoteKind.LATE_DONE_RECORDED, run_id,
                               f"run {run_id} ended before some of its nodes exited: their exit "
                               "codes, whose marker events were lost, are recorded now")
                          for run_id in late)
            outcome = replace(outcome, transition=replace(
                outcome.transition, notes=(*outcome.transition.notes, *notes)))
        vms = seen.pop("vms", ())
        capped = hard_cap_stops(vms, now, self.policy.sweep_interval.total_seconds())
        outcome = replace(outcome, hard_cap_stops=tuple(v.name for v in capped))
        record = {
            "at": iso(now),
            "stack": self.policy.stack,
            "vms": [{"name": v.name, "status": v.status, "labels": v.labels} for v in vms],
            **seen,
            "reason": outcome.reason,
            "kinds": [k.value for k in outcome.transition.kinds()],
            "heals": heals(outcome.transition.notes),
            "hard_cap_stops": [{"vm": v.name, "run_id": v.labels.get(LABEL_RUN),
                                "stopped_at": iso(datetime.fromtimestamp(v.capped_stop or 0,
                                                                         UTC))}
                               for v in capped],
            "notes": [note_record(n) for n in outcome.transition.notes],
            "actions": [describe(c) for c in outcome.commands],
            "errors": outcome.errors,
        }
        self.store.put(sweep_doc(iso(now)), dump(record), metadata=audit_metadata(record))
        return outcome

    def _done_since(self, loaded: Loaded, vms: tuple[VmView, ...]) -> tuple[NodeMarker, ...]:
        """`done` markers written between the sweep's marker listing and its VM listing.

        A node writes `done`, then powers its VM off (the dead-man's switch). Both can fall
        between the two listings: the sweep would then see a booted node on a VM that is
        down, and end the run as `node_lost`. So when a node looks lost, the markers are
        listed again after the VMs, and only `done` counts from that listing: a `booted`
        written meanwhile, on a VM that was still starting when listed, would make a
        node look lost that is not."""
        run = loaded.state.active
        if run is None or run.phase not in LIVE or not looks_lost(run, vms, self.policy):
            return ()
        return tuple(m for m in self._markers_of(run.run_id)
                     if m.kind == "done" and m not in loaded.markers)

    def _sweep_late(self, state: StackState, now: datetime) -> list[str]:
        """Late `done` markers whose events were lost: the runs that ended in the last
        `LATE_WINDOW` get their records brought up to their markers (one read and one listing
        each; a write only where a marker adds an exit code)."""
        return [r.run_id for r in state.recent
                if now - r.ended_at <= LATE_WINDOW and self._settle(r.run_id, None, None)]

    def _archived(self, state: StackState) -> frozenset[str]:
        """Which of the ended runs kept in the state have their ended record written."""
        written = set()
        for run in state.unarchived:
            blob = self.store.get(run_doc(run.run_id))
            try:
                if blob is not None and Run.from_json(blob.data).phase is Phase.ENDED:
                    written.add(run.run_id)
            except CorruptState:
                continue  # rewritten below, like a missing one
        return frozenset(written)

    def _with_progress(self, loaded: Loaded, unless: str | None = None,
                       listing: list[Listed] | None = None) -> Loaded:
        """`loaded` with the active run's node phases derived from its markers."""
        state, markers = observe(self.store, loaded.state, unless, listing)
        return Loaded(state, loaded.generation, loaded.lost, markers)

    # ------------------------------------------------------------ commands

    def execute(self, commands: tuple[Command, ...], now: datetime) -> list[str]:
        """Run every command; one failure does not skip the others. Returns error texts.

        A transient error is re-raised after the rest have run, so the trigger retries.
        """
        errors: list[str] = []
        first: Exception | None = None
        for command in commands:
            try:
                self._run(command, now)
            except CapacityError as e:
                assert isinstance(command, StartNodes)
                errors.append(f"start of run {command.run_id}: {e}")
                self.handle(StartFailed(command.run_id, command.attempt, str(e)), now)
            except Exception as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(f"{describe(command)['command']}: {e}")
                first = first or e
        if first is not None:
            raise first
        return errors

    def _run(self, command: Command, now: datetime) -> None:
        if isinstance(command, StartNodes):
            if command.assignments:
                self.fleet.start(command.assignments, command.deadline)
        elif isinstance(command, StopNodes):
            self.fleet.stop(command.vms, spare=self._current_attempt, owner=command.run_id)
        elif isinstance(command, CommandShepherd):
            self.bus.publish("shepherd", command.command.to_json(),
                             command.command.attributes())
        elif isinstance(command, LabelNodes):
            self.fleet.set_labels(command.vms, dict(command.labels))
        elif isinstance(command, ArchiveRun):
            self.archive(command.run)
        else:  # pragma: no cover - the Command union is closed
            raise TypeError(f"unknown command {type(command).__name__}")

    def _current_attempt(self) -> tuple[str, int] | None:
        """The run attempt holding the stack's VMs right now, read afresh just before a stop:
        a stop decided earlier must not hit it if it started since (see Fleet.stop)."""
        run = self.load().state.active
        return None if run is None else (run.run_id, run.attempt)

    def wandb(self, run: Run) -> dict[str, Any] | None:
        """Where the run's nodes log to wandb (its request, else the stack's defaults)."""
        project = run.request.wandb_project or self.policy.default_wandb_project
        if not project:
            return None
        entity = run.request.wandb_entity or self.policy.default_wandb_entity
        return {"project": project, "entity": entity, "group": run.run_id,
                "url": wandb_group_url(entity, project, run.run_id)}

    def _markers_of(self, run_id: str) -> tuple[NodeMarker, ...]:
        """Every readable marker of a run: one listing, and a read of any that does not
        describe itself in its metadata."""
        found, unread = markers_in(self.store.scan(markers_prefix(run_id)))
        for name in unread:
            blob = self.store.get(name)
            try:
                found = (*found, NodeMarker.from_json(blob.data, name)) if blob else found
            except PermanentError:
                continue
        return found

    def archive(self, run: Run) -> None:
        """Write a run's record; an ended run's also gets its summary and late markers."""
        generation = self.store.put(run_doc(run.run_id), self._record(run))
        if run.phase is Phase.ENDED:
            self.store.put(summary_doc(run.run_id), dump(self.summary(run)))
            # A marker may have landed since the decision's listing, and its handler may
            # have read the record before this write: list the markers after it. When that
            # listing adds nothing to what was written, nothing is read: a writer that
            # changes the record after this write holds a marker this listing did not see,
            # so its record and summary writes come after this one's (_settle says why).
            if late_markers(run, self._markers_of(run.run_id)) is not None:
                self._settle(run.run_id, None, summarised=generation)

    def _record(self, run: Run) -> bytes:
        """The run record: the run, and where its wandb runs are (readers of Run ignore
        the extra key)."""
        wandb = self.wandb(run)
        return run.to_json() if wandb is None else dump({**run.to_dict(), "wandb": wandb})

    def summary(self, run: Run) -> dict[str, Any]:
        prefix = run_prefix(run.run_id)
        files = [n for n in self.store.list(prefix)
                 if n not in (run_doc(run.run_id), summary_doc(run.run_id))]
        metrics = {}
        binary = run.request.binary if run.request.binary is not None \
            else self.policy.default_binary
        node = metrics_node_of(run_layout(run.request.layout, binary, self.policy.default_layout),
                               run.request.metrics_node)
        blob = self.store.get(f"{prefix}{node}/metrics.json")
        if blob is not None:
            try:
                raw = decode_json(blob.data, "metrics.json", limit=None)
                metrics = {k: v for k, v in raw.items() if isinstance(v, (int, float, str))}
            except (PermanentError, AttributeError):
                metrics = {}
        duration = None
        if run.started_at is not None and run.ended_at is not None:
            duration = (run.ended_at - run.started_at).total_seconds()
        return {
            "run_id": run.run_id,
            "stack": self.policy.stack,
            "status": run.status.value,
            "reason": None if run.reason is None else run.reason.value,
            "detail": run.detail,
            "attempt": run.attempt,
            "started_at": None if run.started_at is None else iso(run.started_at),
            "ended_at": None if run.ended_at is None else iso(run.ended_at),
            "duration_s": duration,
            "estimated_cost_usd": run.cost_usd,
            "keep_alive_until": None if run.keep_alive_until is None else iso(run.keep_alive_until),
            "nodes": [n.to_dict() for n in run.nodes],
            "metrics": metrics,
            "metrics_node": node,
            "files": files,
            **({"wandb": wandb} if (wandb := self.wandb(run)) is not None else {}),
        }


def describe(command: Command) -> dict[str, Any]:
    """A command as a small JSON object, for logs and the sweep audit."""
    if isinstance(command, StartNodes):
        return {"command": "start_nodes", "run_id": command.run_id, "attempt": command.attempt,
                "vms": list(command.vms)}
    if isinstance(command, StopNodes):
        return {"command": "stop_nodes", "vms": list(command.vms), "reason": command.reason}
    if isinstance(command, CommandShepherd):
        return {"command": f"shepherd_{command.command.action}",
                "run_id": command.command.run_id}
    if isinstance(command, LabelNodes):
        return {"command": "label_nodes", "vms": list(command.vms),
                "labels": dict(command.labels)}
    return {"command": "archive_run", "run_id": command.run.run_id,
            "status": command.run.status.value}


def audit_metadata(record: Mapping[str, Any]) -> dict[str, str]:
    """The kinds and heals of a sweep audit's notes (and `hard_cap_stop`), space-separated,
    as its object metadata: a listing then tells `pcp events` which audits have anything to
    say, so a month of quiet sweeps is never read."""
    kinds = {str(n.get(k)) for n in record.get("notes", []) for k in ("kind", "heal")
             if n.get(k)}
    if record.get("hard_cap_stops"):
        kinds.add("hard_cap_stop")
    return {AUDIT_KINDS: " ".join(sorted(kinds)) or "-"}  # "-": nothing (never empty)


def note_record(note: Note) -> dict[str, Any]:
    """A sweep's note for its audit record: stable kind, run, end reason, heal, and text."""
    heal = heal_of(note)
    return {"kind": note.kind.value, "run_id": note.run_id,
            "ended": None if note.ended is None else note.ended.value,
            "heal": None if heal is None else heal.value, "text": note.text}
