"""Fault-injecting wrappers around the ports and the service.

Each wrapper keeps its port's contract (pcp/core/ports.py) and adds the failures the cloud
really produces: transient 5xx and timeouts, either before a call took effect or after it did
(the ambiguous case a client cannot tell apart), a start that completes for some VMs only,
ZONE_RESOURCE_POOL_EXHAUSTED, and the function instance dying between the save and the
commands. Every injection is drawn from one seeded `random.Random`, so a schedule replays
exactly, and is counted by kind for the campaign's table. Tests can also force the next
injection of a kind, which makes a targeted fault test deterministic.
"""

from __future__ import annotations

import builtins
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from google.api_core import exceptions as gexc

from pcp.adapters.memory import MemoryFleet
from pcp.core.commands import Command
from pcp.core.errors import CapacityError
from pcp.core.events import VmView
from pcp.core.messages import Assignment
from pcp.core.names import LABEL_ATTEMPT, LABEL_RUN
from pcp.core.policy import Policy
from pcp.core.ports import Blob, BlobStore, Bus, Listed
from pcp.service import Service, describe


class Fault(StrEnum):
    """Every kind of fault the campaign injects; the table reports them in this order."""

    DUPLICATE = "duplicate_delivery"
    DELAY = "delayed_delivery"
    REORDER = "reordered_delivery"
    DROP_MARKER = "dropped_marker_event"
    CRASH = "crash_after_save"
    CRASH_MID = "crash_mid_commands"
    STORE_5XX = "store_5xx"
    STORE_TIMEOUT = "store_timeout_after_write"
    FLEET_5XX = "fleet_5xx"
    FLEET_TIMEOUT = "fleet_timeout_after_effect"
    FLEET_PARTIAL = "fleet_partial_start"
    BUS_5XX = "bus_5xx"
    BUS_TIMEOUT = "bus_timeout_after_publish"
    CAPACITY = "zone_resource_pool_exhausted"
    PREEMPT = "vm_preempted"
    MAINTENANCE_NOTICE = "maintenance_notice"  # the agent ends its node, then the host stops
    PREEMPTION_NOTICE = "preemption_notice"
    SHEPHERD_DIES = "shepherd_died"
    AGENT_HUNG = "agent_hung"
    NODE_FAILS = "node_exit_nonzero"
    DOC_DELETED = "stack_doc_deleted"
    STORE_RATE_LIMIT = "store_429_per_object_limit"  # not drawn: the world's clock decides
    NO_DEADMAN = "deadman_switch_broken"
    # Cloud Billing budget notifications (each also duplicated, delayed and reordered by the
    # trigger like every event): over the threshold, under it, of an older period, and of
    # another budget (refused at the edge).
    BUDGET_OVER = "budget_notification_over"
    BUDGET_UNDER = "budget_notification_under"
    BUDGET_STALE = "budget_notification_stale"
    BUDGET_FOREIGN = "budget_notification_foreign"


class Crash(BaseException):
    """The function instance died: nothing after this point ran.

    A `BaseException`, so the service's per-command error collection cannot catch it, just as
    it could not catch a killed process. The harness's trigger treats it as a failed delivery.
    """


class Injector:
    """Decides, from one seeded generator, whether a fault happens now; counts what it did."""

    def __init__(self, rng: random.Random, rates: Mapping[Fault, float] | None = None) -> None:
        self.rng = rng
        self.rates: dict[Fault, float] = dict(rates or {})
        self.enabled = True
        self.counts: Counter[Fault] = Counter()
        self._forced: Counter[Fault] = Counter()

    def force(self, fault: Fault, times: int = 1) -> None:
        """Make the next `times` rolls of `fault` succeed (targeted tests)."""
        self._forced[fault] += times

    def roll(self, fault: Fault) -> bool:
        if self._forced[fault] > 0:
            self._forced[fault] -= 1
            self.counts[fault] += 1
            return True
        if not self.enabled:
            return False
        rate = self.rates.get(fault, 0.0)
        if rate <= 0.0 or self.rng.random() >= rate:
            return False
        self.counts[fault] += 1
        return True

    def note(self, fault: Fault) -> None:
        """Count a fault the world injected by itself (a preemption, a deleted document)."""
        self.counts[fault] += 1


# The retryable errors a Google client surfaces once its own retries are spent.
_TRANSIENT: tuple[Callable[[str], Exception], ...] = (
    gexc.ServiceUnavailable, gexc.InternalServerError, gexc.TooManyRequests, gexc.DeadlineExceeded,
)


def transient(injector: Injector, where: str) -> Exception:
    """A 5xx, 429 or timeout, as the client library raises it."""
    return injector.rng.choice(_TRANSIENT)(f"{where}: injected transient error")


def timeout(where: str) -> Exception:
    """The call took effect, but the answer never came back."""
    error: Exception = gexc.DeadlineExceeded(  # type: ignore[no-untyped-call]
        f"{where}: injected timeout after the call took effect")
    return error


class FaultStore:
    """A `BlobStore` whose calls may fail before they act, and whose writes may time out after.

    With a `clock` it also holds Cloud Storage's per-object mutation limit on that clock: a
    write of an object less than `mutation_interval` seconds after its last one fails with
    429 `rateLimitExceeded` (the storage library's own backoff cannot help in a world whose
    clock stands still during a call, so the function fails and the trigger retries).
    """

    def __init__(self, inner: BlobStore, injector: Injector,
                 clock: Callable[[], datetime] | None = None,
                 mutation_interval: float = 1.0) -> None:
        self.inner = inner
        self.injector = injector
        self.clock = clock
        self.mutation_interval = mutation_interval
        self._written: dict[str, datetime] = {}

    def _before(self, op: str, name: str) -> None:
        if self.injector.roll(Fault.STORE_5XX):
            raise transient(self.injector, f"storage {op} {name}")

    def get(self, name: str) -> Blob | None:
        self._before("get", name)
        return self.inner.get(name)

    def put(self, name: str, data: bytes, *, if_generation_match: int | None = None,
            content_type: str = "application/json",
            metadata: Mapping[str, str] | None = None) -> int:
        self._before("put", name)
        if self.clock is not None:
            now, last = self.clock(), self._written.get(name)
            if last is not None and (now - last).total_seconds() < self.mutation_interval:
                self.injector.note(Fault.STORE_RATE_LIMIT)
                raise gexc.TooManyRequests(  # type: ignore[no-untyped-call]
                    f"storage put {name}: the object exceeded the rate limit for object "
                    "mutation operations (rateLimitExceeded)")
        generation = self.inner.put(name, data, if_generation_match=if_generation_match,
                                    content_type=content_type, metadata=metadata)
        if self.clock is not None:
            self._written[name] = self.clock()
        if self.injector.roll(Fault.STORE_TIMEOUT):
            raise timeout(f"storage put {name}")
        return generation

    def list(self, prefix: str) -> list[str]:
        self._before("list", prefix)
        return self.inner.list(prefix)

    def scan(self, prefix: str) -> builtins.list[Listed]:
        self._before("scan", prefix)
        return self.inner.scan(prefix)


StartHook = Callable[[str, str, int], None]


class FaultFleet:
    """A `Fleet` over the in-memory VMs, with failures around every call.

    `on_start(vm, run_id, attempt)` is called for every VM that really booted, whatever the
    call raised afterwards: the campaign counts boots per run attempt from it.
    """

    def __init__(self, inner: MemoryFleet, injector: Injector,
                 on_start: StartHook | None = None) -> None:
        self.inner = inner
        self.injector = injector
        self.on_start = on_start

    def _before(self, op: str) -> None:
        if self.injector.roll(Fault.FLEET_5XX):
            raise transient(self.injector, f"compute {op}")

    def _after(self, op: str) -> None:
        if self.injector.roll(Fault.FLEET_TIMEOUT):
            raise timeout(f"compute {op}")

    def list(self) -> list[VmView]:
        self._before("list")
        return self.inner.list()

    def start(self, assignments: Sequence[Assignment], deadline: datetime) -> None:
        self._before("start")
        if self.injector.roll(Fault.CAPACITY):
            raise CapacityError("ZONE_RESOURCE_POOL_EXHAUSTED: the zone has no capacity for "
                                "the requested accelerators (injected)")
        if len(assignments) > 1 and self.injector.roll(Fault.FLEET_PARTIAL):
            done = self.injector.rng.randrange(1, len(assignments))
            self._start(assignments[:done], deadline)
            raise timeout(f"compute start ({done} of {len(assignments)} VMs started)")
        self._start(assignments, deadline)
        self._after("start")

    def _start(self, assignments: Sequence[Assignment], deadline: datetime) -> None:
        before = {name: vm.starts for name, vm in self.inner.vms.items()}
        try:
            self.inner.start(assignments, deadline)
        finally:
            for name, vm in self.inner.vms.items():
                if vm.starts != before[name] and self.on_start is not None:
                    self.on_start(name, vm.labels[LABEL_RUN], int(vm.labels[LABEL_ATTEMPT]))

    def stop(self, vms: Sequence[str],
             spare: Callable[[], tuple[str, int] | None] | None = None,
             owner: str | None = None) -> None:
        self._before("stop")
        self.inner.stop(vms, spare, owner)
        self._after("stop")

    def set_labels(self, vms: Sequence[str], labels: Mapping[str, str]) -> None:
        self._before("set_labels")
        self.inner.set_labels(vms, labels)
        self._after("set_labels")


class FaultBus:
    """A `Bus` whose publish may fail before, or time out after the message was accepted."""

    def __init__(self, inner: Bus, injector: Injector) -> None:
        self.inner = inner
        self.injector = injector

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        if self.injector.roll(Fault.BUS_5XX):
            raise transient(self.injector, f"pubsub publish {topic}")
        message_id = self.inner.publish(topic, data, attributes)
        if self.injector.roll(Fault.BUS_TIMEOUT):
            raise timeout(f"pubsub publish {topic}")
        return message_id


class FaultService(Service):
    """The real service, except that its instance may die after the save.

    `crash_after_save` kills it before the first command of an event, `crash_mid_commands`
    after some of them: the state is saved, the rest of the commands never run, and only the
    trigger's redelivery or the sweeper can make up for them. Nothing else is overridden.
    """

    def __init__(self, store: BlobStore, fleet: FaultFleet, bus: Bus, policy: Policy,
                 injector: Injector) -> None:
        super().__init__(store, fleet, bus, policy, sleep=lambda _: None)
        self.injector = injector
        self._planned: int | None = None
        self._crash_at: int | None = None
        self._ran = 0
        self.latest: datetime | None = None  # the newest `now` an event was handled at

    def handle(self, event: Any, now: datetime, **kw: Any) -> Any:
        self.latest = now if self.latest is None else max(self.latest, now)
        return super().handle(event, now, **kw)

    def crash_next(self, index: int) -> None:
        """Die before command `index` of the next event with more commands than that (tests)."""
        self._planned = index

    def execute(self, commands: tuple[Command, ...], now: datetime) -> list[str]:
        outer = (self._crash_at, self._ran)
        self._crash_at, self._ran = self._crash_point(commands), 0
        try:
            return super().execute(commands, now)
        finally:
            self._crash_at, self._ran = outer

    def _crash_point(self, commands: tuple[Command, ...]) -> int | None:
        if not commands:
            return None
        if self._planned is not None and len(commands) > self._planned:
            index, self._planned = self._planned, None
            self.injector.note(Fault.CRASH if index == 0 else Fault.CRASH_MID)
            return index
        if self.injector.roll(Fault.CRASH):
            return 0
        if len(commands) > 1 and self.injector.roll(Fault.CRASH_MID):
            return self.injector.rng.randrange(1, len(commands))
        return None

    def _run(self, command: Command, now: datetime) -> None:
        if self._crash_at is not None and self._ran >= self._crash_at:
            raise Crash(f"function instance died before {describe(command)['command']}")
        self._ran += 1
        super()._run(command, now)
