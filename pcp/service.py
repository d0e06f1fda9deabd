"""Load -> decide -> conditional save -> execute commands.

The clock is read once by the caller and passed in. A lost compare-and-swap re-reads and
decides again; commands run only after the winning save, and each is idempotent, so a crash
between save and execute is healed by the next event or sweep (level-triggered).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
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
from pcp.core.events import Event, Markers, Reconcile, Rejected, StartFailed
from pcp.core.lifecycle import Transition, decide, marker_would_change
from pcp.core.messages import NodeMarker, decode_json, dump
from pcp.core.names import (
    STACK_DOC,
    corrupt_stack_doc,
    markers_prefix,
    run_doc,
    run_prefix,
    summary_doc,
    sweep_doc,
)
from pcp.core.policy import Policy
from pcp.core.ports import BlobStore, Bus, Fleet
from pcp.core.state import Phase, Run, StackState
from pcp.core.timefmt import iso


class ConflictExhausted(Exception):
    """Too many lost races in a row; the event is retried by its trigger."""


@dataclass
class Outcome:
    """What one handled event did, for the entry point's log line and for tests."""

    transition: Transition
    saved: bool
    conflicts: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return self.transition.reason

    @property
    def commands(self) -> tuple[Command, ...]:
        return self.transition.commands


@dataclass
class Loaded:
    state: StackState
    generation: int
    lost: bool  # the document was missing or unreadable


class Service:
    def __init__(self, store: BlobStore, fleet: Fleet, bus: Bus, policy: Policy, *,
                 max_attempts: int = 100, sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.fleet = fleet
        self.bus = bus
        self.policy = policy
        self.max_attempts = max_attempts
        self.sleep = sleep

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

    def handle(self, event: Event | Callable[[Loaded], Event], now: datetime) -> Outcome:
        """Decide and save under a generation precondition, then execute the commands.

        `event` may be a function of the loaded state (the sweep builds its observation from
        it); it is called again after every lost race.
        """
        conflicts = 0
        for attempt in range(self.max_attempts):
            loaded = self.load()
            ev = event(loaded) if callable(event) else event
            transition = decide(loaded.state, ev, now, self.policy)
            if transition.state == loaded.state and not loaded.lost:
                return Outcome(transition, saved=False, conflicts=conflicts,
                               errors=self.execute(transition.commands, now))
            try:
                self.store.put(STACK_DOC, transition.state.to_json(),
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
        else from the object. After a lost race, every other marker of the run already in the
        bucket is folded into the same write (one listing, no reads), so N nodes finishing at
        once cost a few writes of the stack document rather than N contended ones.
        """
        NodeMarker.parse_path(object_name)
        marker = NodeMarker.from_metadata(dict(metadata or {}), object_name)
        if marker is None:
            blob = self.store.get(object_name)
            if blob is None:
                raise PermanentError(f"marker {object_name} does not exist (deleted?)")
            marker = NodeMarker.from_json(blob.data, object_name)
        tries = 0

        def event(loaded: Loaded) -> Event:
            nonlocal tries
            tries += 1
            if tries == 1 or not marker_would_change(loaded.state, marker.run_id, marker.node,
                                                     marker.kind, marker.attempt):
                return marker  # first try, or a winner already folded this one in
            return Markers(marker, self._markers(loaded.state, unapplied_only=True))

        return self.handle(event, now)

    def reject(self, run_id: str, detail: str, now: datetime) -> Outcome:
        return self.handle(Rejected(run_id, detail), now)

    def sweep(self, now: datetime) -> Outcome:
        """Level-triggered reconciliation against real VMs and markers; writes an audit record."""
        vms = tuple(self.fleet.list())
        seen: dict[str, Any] = {}

        def observe(loaded: Loaded) -> Reconcile:
            markers = self._markers(loaded.state)
            seen.update(state_lost=loaded.lost, markers=len(markers))
            return Reconcile(vms=vms, markers=markers, state_lost=loaded.lost,
                             archived=self._archived(loaded.state))

        outcome = self.handle(observe, now)
        record = {
            "at": iso(now),
            "stack": self.policy.stack,
            "vms": [{"name": v.name, "status": v.status, "labels": v.labels} for v in vms],
            **seen,
            "reason": outcome.reason,
            "actions": [describe(c) for c in outcome.commands],
            "errors": outcome.errors,
        }
        self.store.put(sweep_doc(iso(now)), dump(record))
        return outcome

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

    def _markers(self, state: StackState, unapplied_only: bool = False
                 ) -> tuple[NodeMarker, ...]:
        """The active run's markers in the bucket: one listing, plus a read for each marker
        whose writer did not describe it in its metadata (skipped when `unapplied_only`,
        where reads would cost more than the fold saves)."""
        run = state.active
        if run is None:
            return ()
        found: list[NodeMarker] = []
        for item in self.store.scan(markers_prefix(run.run_id)):
            try:
                _, node_name, kind = NodeMarker.parse_path(item.name)
                if unapplied_only and not marker_would_change(state, run.run_id, node_name,
                                                              kind, None):
                    continue
                marker = NodeMarker.from_metadata(dict(item.metadata), item.name)
                if marker is None and not unapplied_only:
                    blob = self.store.get(item.name)
                    marker = None if blob is None else NodeMarker.from_json(blob.data, item.name)
            except PermanentError:
                continue  # a malformed marker is ignored here as it was by its own event
            if marker is not None:
                found.append(marker)
        return tuple(found)

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

    def archive(self, run: Run) -> None:
        self.store.put(run_doc(run.run_id), run.to_json())
        if run.phase is Phase.ENDED:
            self.store.put(summary_doc(run.run_id), dump(self.summary(run)))

    def summary(self, run: Run) -> dict[str, Any]:
        prefix = run_prefix(run.run_id)
        files = [n for n in self.store.list(prefix)
                 if n not in (run_doc(run.run_id), summary_doc(run.run_id))]
        metrics = {}
        blob = self.store.get(f"{prefix}shepherd/metrics.json")
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
            "files": files,
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
