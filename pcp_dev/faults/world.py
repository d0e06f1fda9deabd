"""A simulated world around the real service: trigger, clock, scheduler, world faults.

Only the world is simulated. `Service.handle`, `handle_marker`, `reject` and `sweep` are the
production code over the in-memory twins, wrapped by pcp/faults/wrappers.py. Around them:

- a trigger with Pub/Sub's and Eventarc's at-least-once contract: an event whose handler
  raised (a 5xx, a timeout, a dead instance) is redelivered with exponential backoff
  (10 s .. 600 s, the subscriptions' retry policy); deliveries may be duplicated, held back,
  reordered, and a marker's event may be lost while the marker itself is in the bucket;
- Cloud Scheduler's tick every `sweep_interval` (duplicated or jittered, never held back:
  the scheduler's latency is seconds);
- node agents and the shepherd daemon (pcp/faults/agents.py), and Compute Engine's
  `maxRunDuration` cap;
- world faults at planned times: a VM preempted, the shepherd host down, control/stack.json
  deleted, a maintenance or preemption notice (the agent ends its node with that reason, then
  Compute Engine stops the VM).

Time is simulated: an agenda of timed actions, processed in order. One seeded generator draws
every choice, so a schedule replays exactly from its seed.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.core.errors import PermanentError
from pcp.core.messages import (
    BudgetNotification,
    BudgetResume,
    NodeMarker,
    StartRequest,
    StopRequest,
)
from pcp.core.names import STACK_DOC
from pcp.core.policy import Policy
from pcp.core.state import StackState
from pcp.progress import observe
from pcp.service import Outcome
from pcp_dev.faults.agents import Agents
from pcp_dev.faults.checks import BUDGET_KINDS, Checks
from pcp_dev.faults.wrappers import (
    Crash,
    Fault,
    FaultBus,
    FaultFleet,
    FaultService,
    FaultStore,
    Injector,
)

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
MIN_BACKOFF, MAX_BACKOFF = 10.0, 600.0  # seconds: the subscriptions' retry policy
LATENCY = 0.5  # seconds from publish to delivery, when nothing goes wrong


@dataclass
class Plan:
    """What happens in one schedule, drawn up front (pcp/faults/campaign.py) or by a test."""

    policy: Policy
    rates: dict[Fault, float] = field(default_factory=dict)
    requests: list[tuple[float, StartRequest, int]] = field(default_factory=list)  # (min, req, n)
    invalid: list[tuple[float, str]] = field(default_factory=list)  # (minute, run id)
    stops: list[tuple[float, str]] = field(default_factory=list)  # (minute, run id)
    preemptions: list[float] = field(default_factory=list)
    notices: list[tuple[float, str]] = field(default_factory=list)  # (minute, end reason)
    shepherd_deaths: list[tuple[float, float]] = field(default_factory=list)  # (at, for) min
    doc_deletions: list[float] = field(default_factory=list)
    # Cloud Billing notifications (minute, notification, fault kind); once the faults stop,
    # a person lifts a hold they find (`pcp budget resume`) at a sweep tick.
    budget: list[tuple[float, BudgetNotification, Fault]] = field(default_factory=list)
    deadman: bool = True  # the node agents' dead-man's switch works
    hard_cap: bool = True  # Compute Engine enforces maxRunDuration
    window_minutes: float = 180.0  # faults and requests happen before this
    first_tick: float = 1.0
    boot_minutes: tuple[float, float] = (0.5, 6.0)
    slow_boot: float = 0.05  # chance that a node boots slower than the boot timeout
    work_minutes: tuple[float, float] = (3.0, 45.0)
    overrun: float = 0.08  # chance that an attempt's work outlasts its deadline
    settle_hours: float = 48.0


@dataclass
class Delivery:
    kind: str  # start, stop, reject, marker, sweep
    body: Any
    tries: int = 0

    def __str__(self) -> str:
        body = self.body
        if isinstance(body, (StartRequest, StopRequest)):
            body = body.run_id
        elif isinstance(body, BudgetNotification):
            body = (f"{body.budget_id} {body.cost_amount:g}/{body.budget_amount:g} from "
                    f"{body.cost_interval_start:%Y-%m-%d}")
        elif isinstance(body, BudgetResume):
            body = "resume"
        elif isinstance(body, tuple):
            body = body[0]  # a marker's object name
        return f"{self.kind} {body or ''}".rstrip()


@dataclass
class Report:
    seed: int
    violations: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    heals: Counter[str] = field(default_factory=Counter)
    trace: list[str] = field(default_factory=list)
    sim_minutes: float = 0.0


class World:
    def __init__(self, plan: Plan, seed: int, *,
                 service: Callable[..., FaultService] = FaultService) -> None:
        self.plan = plan
        self.policy = plan.policy
        self.rng = random.Random(seed)
        self.injector = Injector(self.rng, plan.rates)
        self.store = MemoryStore()
        self.fleet = MemoryFleet(self.policy.stack, self.policy.worker_vms)
        self.bus = MemoryBus()
        self.report = Report(seed)
        self.now = T0
        self.checks = Checks(self)
        self.agents = Agents(self)
        self.svc = service(FaultStore(self.store, self.injector, clock=self.clock),
                           FaultFleet(self.fleet, self.injector, self.checks.booted),
                           FaultBus(self.bus, self.injector), self.policy, self.injector)
        self.agenda: list[tuple[datetime, int, Callable[..., None], tuple[Any, ...]]] = []
        self.seq = itertools.count()
        self.in_flight = 0
        self.window_open = True
        self.quiet = False
        self.requested: list[str] = []

    # ------------------------------------------------------------ the loop

    def at(self, when: datetime, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self.agenda, (when, next(self.seq), action, args))

    def minute(self, m: float) -> datetime:
        return T0 + timedelta(minutes=m)

    def run(self) -> Report:
        p = self.plan
        for m, request, copies in p.requests:
            self.requested.append(request.run_id)
            for _ in range(copies):
                self.at(self.minute(m), self.publish, Delivery("start", request))
        for m, run_id in p.invalid:
            self.requested.append(run_id)
            self.at(self.minute(m), self.publish, Delivery("reject", run_id))
        for m, run_id in p.stops:
            self.at(self.minute(m), self.publish,
                    Delivery("stop", StopRequest(run_id, "cancelled by the campaign")))
        for m in p.preemptions:
            self.at(self.minute(m), self.preempt)
        for m, reason in p.notices:
            self.at(self.minute(m), self.agents.notice, reason)
        for m, down in p.shepherd_deaths:
            self.at(self.minute(m), self.shepherd_dies, down)
        for m in p.doc_deletions:
            self.at(self.minute(m), self.delete_doc)
        for m, notification, kind in p.budget:
            self.at(self.minute(m), self.budget_notice, notification, kind)
        self.at(self.minute(p.first_tick), self.tick)
        self.at(self.minute(p.window_minutes), self.close_window)
        if not p.deadman:
            self.injector.note(Fault.NO_DEADMAN)
        limit = self.minute(p.window_minutes + 60 * p.settle_hours)
        while self.agenda and not self.quiet:
            when, _, action, args = heapq.heappop(self.agenda)
            if when > limit:
                break
            self.now = max(self.now, when)
            action(*args)
            self.agents.observe()
        self.checks.final(self.quiet)
        self.report.faults.update({f.value: n for f, n in self.injector.counts.items()})
        self.report.sim_minutes = (self.now - T0).total_seconds() / 60
        return self.report

    def close_window(self) -> None:
        self.window_open = False
        self.injector.enabled = False
        self.trace("window closed: no new faults; settling")

    def trace(self, text: str) -> None:
        minutes = (self.now - T0).total_seconds() / 60
        self.report.trace.append(f"{minutes:8.2f} min  {text}")

    def clock(self) -> datetime:
        """The world's time, or later where a test handed the service a later `now`."""
        latest = getattr(getattr(self, "svc", None), "latest", None)
        return self.now if latest is None else max(self.now, latest)

    def state(self) -> StackState:
        """The stack state as every reader sees it: the document, node phases from markers."""
        blob = self.store.get(STACK_DOC)
        return StackState() if blob is None else observe(
            self.store, StackState.from_json(blob.data))[0]

    # ------------------------------------------------------------ the trigger

    def publish(self, d: Delivery) -> None:
        """Hand an event to the trigger, which may hold it back, reorder or duplicate it."""
        self.schedule(d, self.lag(d.kind != "sweep"))
        if self.injector.roll(Fault.DUPLICATE):
            self.schedule(Delivery(d.kind, d.body),
                          self.lag(d.kind != "sweep") + self.rng.uniform(1.0, 600.0))

    def publish_marker(self, m: NodeMarker) -> None:
        """A marker was written; its storage event (which carries the object's metadata, as
        notifications do) may be lost while the object stays."""
        if self.injector.roll(Fault.DROP_MARKER):
            self.trace(f"event lost: marker {m.path}")
            return
        self.publish(Delivery("marker", (m.path, m.to_metadata())))

    def lag(self, delayable: bool) -> float:
        if delayable and self.injector.roll(Fault.DELAY):
            return self.rng.uniform(120.0, 2400.0)
        if self.injector.roll(Fault.REORDER):
            return self.rng.uniform(1.0, 180.0)
        return LATENCY

    def schedule(self, d: Delivery, seconds: float) -> None:
        self.in_flight += 1
        self.at(self.now + timedelta(seconds=seconds), self.deliver, d)

    def deliver(self, d: Delivery) -> None:
        self.in_flight -= 1
        d.tries += 1
        what = f"{d} (delivery {d.tries})"
        try:
            outcome = self.call(d)
        except PermanentError as e:
            self.trace(f"{what}: acknowledged, permanent: {e}")
            return
        except (Crash, Exception) as e:  # noqa: BLE001 - any failure makes the trigger retry
            backoff = min(MAX_BACKOFF, MIN_BACKOFF * 2 ** (d.tries - 1))
            self.report.heals["trigger: redeliveries after an error"] += 1
            self.trace(f"{what}: {type(e).__name__}: {e}; redelivery in {backoff:.0f} s")
            self.schedule(d, backoff * self.rng.uniform(0.8, 1.2))
            return
        for note in outcome.transition.notes:
            counted = BUDGET_KINDS.get(note.kind)
            if counted is not None:
                self.report.outcomes[counted] += 1
        errors = "".join(f" [error: {e}]" for e in outcome.errors)
        self.trace(f"{what}: {outcome.reason}{errors}")
        if d.kind == "sweep":
            self.checks.after_sweep(outcome)

    def call(self, d: Delivery) -> Outcome:
        if d.kind in ("start", "stop"):
            return self.svc.handle(d.body, self.now)
        if d.kind == "budget":  # on_budget: the edge refuses another budget's notification
            d.body.check_budget(self.policy.budget_id, self.policy.billing_account)
            return self.svc.handle(d.body, self.now)
        if d.kind == "reject":
            return self.svc.reject(d.body, "start request is not valid JSON (campaign)", self.now)
        if d.kind == "marker":
            name, metadata = d.body
            return self.svc.handle_marker(name, self.now, metadata)
        return self.svc.sweep(self.now)

    # ------------------------------------------------------------ Cloud Scheduler

    def tick(self) -> None:
        self.checks.at_tick()
        if not self.window_open and self.state().budget.hold is not None:
            # A person sees the hold (pcp doctor, pcp status) and lifts it once the faults
            # have stopped; the runs that waited in the queue go on.
            self.report.heals["budget: resume requests by a person"] += 1
            self.publish(Delivery("stop", BudgetResume("campaign")))
        self.in_flight += 1
        self.deliver(Delivery("sweep", None))
        if self.injector.roll(Fault.DUPLICATE):
            self.schedule(Delivery("sweep", None), self.rng.uniform(1.0, 60.0))
        if not self.window_open and self.is_quiet():
            self.quiet = True
            return
        self.at(self.now + self.policy.sweep_interval, self.tick)

    def is_quiet(self) -> bool:
        state = self.state()
        return (self.in_flight == 0 and state.active is None and not state.queue
                and state.lease is None and not self.fleet.running())

    # ------------------------------------------------------------ world faults

    def preempt(self) -> None:
        running = sorted(self.fleet.running())
        if running:
            name = self.rng.choice(running)
            self.fleet.preempt(name)
            self.injector.note(Fault.PREEMPT)
            self.trace(f"{name} preempted")

    def shepherd_dies(self, minutes: float) -> None:
        self.agents.shepherd_dies(minutes)
        self.injector.note(Fault.SHEPHERD_DIES)
        self.trace(f"the shepherd host dies for {minutes:.0f} min")

    def budget_notice(self, notification: BudgetNotification, kind: Fault) -> None:
        self.injector.note(kind)
        self.trace(f"Cloud Billing publishes {kind.value}")
        self.publish(Delivery("budget", notification))

    def delete_doc(self) -> None:
        self.checks.document_deleted()
        self.store.delete(STACK_DOC)
        self.injector.note(Fault.DOC_DELETED)
        self.trace(f"control/stack.json deleted (runs it knew: {sorted(self.checks.victims)})")
