"""In-memory twins of the ports: used by the tests, the fault campaign and `--dry-run`.

They keep the same contracts as the cloud adapters (pcp/core/ports.py) and record every call,
so tests assert on state rather than on mocks.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from pcp.core.errors import CapacityError, Conflict
from pcp.core.events import VmView, holds_attempt, late_stop_spares
from pcp.core.messages import Assignment
from pcp.core.names import (
    ASSIGNMENT_KEY,
    LABEL_ATTEMPT,
    LABEL_DEADLINE,
    LABEL_KEEP_ALIVE,
    LABEL_RUN,
    LABEL_STACK,
)
from pcp.core.ports import Blob, Listed


class MemoryStore:
    def __init__(self) -> None:
        self._objects: dict[str, Blob] = {}
        self._metadata: dict[str, dict[str, str]] = {}
        self._lock = threading.Lock()
        self._gen = itertools.count(1)
        self.writes = 0

    def get(self, name: str) -> Blob | None:
        with self._lock:
            return self._objects.get(name)

    def put(self, name: str, data: bytes, *, if_generation_match: int | None = None,
            content_type: str = "application/json",
            metadata: Mapping[str, str] | None = None) -> int:
        with self._lock:
            current = self._objects.get(name)
            if if_generation_match is not None:
                have = 0 if current is None else current.generation
                if have != if_generation_match:
                    raise Conflict(f"{name}: generation {have}, expected {if_generation_match}")
            generation = next(self._gen)
            self._objects[name] = Blob(bytes(data), generation)
            self._metadata[name] = dict(metadata or {})
            self.writes += 1
            return generation

    def list(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(n for n in self._objects if n.startswith(prefix))

    def scan(self, prefix: str) -> list[Listed]:
        with self._lock:
            return [Listed(n, self._objects[n].generation, dict(self._metadata.get(n, {})))
                    for n in sorted(self._objects) if n.startswith(prefix)]

    def delete(self, name: str) -> None:
        """Test helper (not part of the port): lose an object, as an operator might."""
        with self._lock:
            self._objects.pop(name, None)


@dataclass
class MemoryVm:
    name: str
    status: str = "TERMINATED"
    labels: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    max_run_seconds: int | None = None
    capped_stop: int | None = None  # set by a test: GCE's hard cap stopped it at this epoch
    starts: int = 0
    stops: int = 0


class MemoryFleet:
    """VMs as records. Starting makes them RUNNING at once; nothing boots by itself."""

    def __init__(self, stack: str, names: Sequence[str]) -> None:
        self.stack = stack
        self.vms = {n: MemoryVm(n, labels={LABEL_STACK: stack}) for n in names}
        self.calls: list[tuple[str, str]] = []
        self.exhausted = False
        self._lock = threading.Lock()

    def list(self) -> list[VmView]:
        with self._lock:
            self.calls.append(("list", ""))
            return [VmView(v.name, v.status, dict(v.labels), capped_stop=v.capped_stop)
                    for v in self.vms.values()]

    def start(self, assignments: Sequence[Assignment], deadline: datetime) -> None:
        with self._lock:
            if self.exhausted:
                raise CapacityError("ZONE_RESOURCE_POOL_EXHAUSTED: no GPUs left in the zone")
            for a in assignments:
                vm = self.vms[a.vm]
                self.calls.append(("start", vm.name))
                same = holds_attempt(vm.labels, a.run_id, a.attempt)
                if vm.status == "RUNNING" and same:
                    continue
                if vm.status == "RUNNING":
                    vm.stops += 1
                vm.metadata[ASSIGNMENT_KEY] = a.to_json().decode()
                vm.labels.update({LABEL_RUN: a.run_id, LABEL_ATTEMPT: str(a.attempt),
                                  LABEL_DEADLINE: str(int(deadline.timestamp()))})
                vm.labels.pop(LABEL_KEEP_ALIVE, None)
                vm.max_run_seconds = 1  # armed; the exact value is the adapter's business
                vm.status = "RUNNING"
                vm.starts += 1

    def stop(self, vms: Sequence[str],
             spare: Callable[[], tuple[str, int] | None] | None = None,
             owner: str | None = None) -> None:
        for name in vms:
            with self._lock:
                vm = self.vms.get(name)
                labels = dict(vm.labels) if vm is not None else {}
            spared = vm is not None and late_stop_spares(labels, owner, spare)
            with self._lock:
                self.calls.append(("stop", name))
                vm = self.vms.get(name)
                if spared:
                    continue  # a late stop: the VM now belongs to the current run
                if vm is not None and vm.status != "TERMINATED":
                    vm.status = "TERMINATED"
                    vm.stops += 1

    def set_labels(self, vms: Sequence[str], labels: Mapping[str, str]) -> None:
        with self._lock:
            for name in vms:
                self.calls.append(("set_labels", name))
                vm = self.vms.get(name)
                if vm is not None:
                    vm.labels.update(labels)

    def preempt(self, name: str) -> None:
        """Test helper: the VM stops under us, as a Spot preemption would."""
        with self._lock:
            self.vms[name].status = "TERMINATED"

    def running(self) -> set[str]:
        with self._lock:
            return {v.name for v in self.vms.values() if v.status == "RUNNING"}


class MemoryBus:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, dict[str, str]]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        with self._lock:
            self.messages.append((topic, bytes(data), dict(attributes or {})))
            return str(next(self._ids))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [d for t, d, _ in self.messages if t == topic]
