"""The three ports the service drives. Each has a Google Cloud adapter and an in-memory twin.

Contracts are stated here and checked by one suite (tests/adapters) over every implementation.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from pcp.core.events import VmView
from pcp.core.messages import Assignment


@dataclass(frozen=True)
class Blob:
    data: bytes
    generation: int


@dataclass(frozen=True)
class Listed:
    """An object as a listing reports it: name, generation and custom metadata, no data."""

    name: str
    generation: int
    metadata: Mapping[str, str] = field(default_factory=dict)


class BlobStore(Protocol):
    """Objects in the stack bucket.

    - `get` returns None for a missing object (never raises for "missing").
    - `put` with `if_generation_match=0` creates only; with a generation it is a
      compare-and-swap; a failed precondition raises `Conflict`. Returns the new generation.
    - `put` may attach custom metadata (string pairs); listings and notifications carry it.
    - `list` returns object names under a prefix, sorted; `scan` the same objects with their
      generation and custom metadata, in one request per page (no data is read).
    - There is deliberately no conditional delete: the GCS emulator does not honour it.
    Blocking; transient errors propagate so the trigger retries.
    """

    def get(self, name: str) -> Blob | None: ...

    def put(self, name: str, data: bytes, *, if_generation_match: int | None = None,
            content_type: str = "application/json",
            metadata: Mapping[str, str] | None = None) -> int: ...

    def list(self, prefix: str) -> list[str]: ...

    def scan(self, prefix: str) -> builtins.list[Listed]: ...


class Fleet(Protocol):
    """The stack's worker VMs on Compute Engine.

    - `list` returns every VM labelled `pcp-stack=<stack>`, with status and labels.
    - `start` boots the VMs for the given assignments concurrently: each VM still running
      under another assignment is stopped first; then the assignment is written to metadata
      (`pcp-assignment`), labels `pcp-run`, `pcp-attempt`, `pcp-deadline` are set, and
      `scheduling.maxRunDuration` (termination action STOP) is armed for the deadline plus a
      margin and read back; then the VM is started. Blocks until every start operation is done
      or `timeout` passes. Idempotent: a VM already running under the same assignment is left
      alone. Raises `CapacityError` for exhausted zones or quota; other errors propagate.
    - `stop` stops the VMs concurrently. Stopping a stopped or missing VM succeeds. A running
      VM labelled for `owner` (the run being stopped) is stopped at once; for any other,
      `spare()` is asked right before the stop, and a VM labelled for the (run id, attempt)
      it returns is left alone: a stop decided earlier may execute late (a slow or
      redelivered event, a cold start), after the stack's current run started that VM.
    - `set_labels` merges labels into each VM's labels. A missing VM is skipped.
    """

    def list(self) -> list[VmView]: ...

    def start(self, assignments: Sequence[Assignment], deadline: datetime) -> None: ...

    def stop(self, vms: Sequence[str],
             spare: Callable[[], tuple[str, int] | None] | None = None,
             owner: str | None = None) -> None: ...

    def set_labels(self, vms: Sequence[str], labels: Mapping[str, str]) -> None: ...


class Bus(Protocol):
    """Publishing to the stack's topics (`start`, `stop`, `sweep`, `shepherd`).

    `publish` blocks until the message is accepted and returns its message id. Attribute
    values are strings. Errors propagate.
    """

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        ...
