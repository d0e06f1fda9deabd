"""The Fleet port on Compute Engine (google-cloud-compute, REST transport).

Every VM is handled in its own thread: a start of 15 workers takes as long as the slowest VM,
not the sum. Operations are issued with the `*_unary` calls and awaited through our own
`ZoneOperationsClient.wait`, because `ExtendedOperation.result()` polls through a client that
ignores `api_endpoint` (it would poll real GCP from the local replica).

Errors: an operation or HTTP error naming an exhausted zone or GPU quota becomes
`CapacityError` in plain words (retrying cannot help; the run ends with that reason). 5xx,
429 (API rate limits, even when they say "quota") and timeouts are retried with exponential
backoff within the operation deadline; anything else propagates so the trigger redelivers.

A start arms the hard cap (setScheduling), which Compute Engine takes only on a TERMINATED
VM: a VM found in any other status is brought down first (`_bring_down`).

`google.cloud.compute_v1` takes ~1.5 s to import, so it is imported on first use, never when
this module is imported (the functions import it on cold start).
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from google.api_core import exceptions as gexc

from pcp.core.errors import CapacityError
from pcp.core.events import RUNNING_STATES, VmView, holds_attempt, late_stop_spares
from pcp.core.messages import Assignment
from pcp.core.names import (
    ASSIGNMENT_KEY,
    LABEL_ATTEMPT,
    LABEL_DEADLINE,
    LABEL_KEEP_ALIVE,
    LABEL_RUN,
    LABEL_STACK,
    STACK_RE,
)
from pcp.logs import log

if TYPE_CHECKING:
    from google.cloud import compute_v1

T = TypeVar("T")
CAPACITY_CODES = ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", "ZONE_RESOURCE_POOL_EXHAUSTED",
                  "QUOTA_EXCEEDED")
TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
RATE_LIMIT_REASONS = ("rateLimitExceeded", "userRateLimitExceeded", "RATE_LIMIT_EXCEEDED")
MIN_RUN_SECONDS, MAX_RUN_SECONDS = 30, 120 * 24 * 3600  # GCE accepts 30 s .. 120 days
FINGERPRINT_TRIES = 5
# Statuses a stop is accepted in; STOPPING and SUSPENDING must be waited out.
STOPPABLE = frozenset({*RUNNING_STATES, "SUSPENDED", "REPAIRING"})


def _epoch(raw: str) -> int | None:
    try:
        return int(datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def created_epoch(instance: Any) -> int | None:
    """The instance's `creationTimestamp` (RFC 3339, e.g. 2026-12-01T10:00:00.123-08:00) as
    epoch seconds; None when it is missing or unreadable (the sweeper then grants no grace)."""
    return _epoch(getattr(instance, "creation_timestamp", "") or "")


def capped_stop_epoch(instance: Any) -> int | None:
    """When GCE's hard cap stopped this VM (epoch seconds of `lastStopTimestamp`), else None.

    A TERMINATED VM whose last stop came at least its armed `scheduling.maxRunDuration` after
    its last start (`lastStartTimestamp`) was stopped by the cap: the control plane stops a
    VM at its run's deadline, `hard_cap_margin_seconds` before the cap, and the dead-man
    switch earlier still. Compute Engine clears `scheduling.terminationTime` when the VM
    stops, but keeps `maxRunDuration` and both timestamps, so the stop can be told afterwards.
    """
    if getattr(instance, "status", "") != "TERMINATED":
        return None
    start = _epoch(getattr(instance, "last_start_timestamp", "") or "")
    stop = _epoch(getattr(instance, "last_stop_timestamp", "") or "")
    scheduling = getattr(instance, "scheduling", None)
    duration = getattr(scheduling, "max_run_duration", None)
    seconds = int(getattr(duration, "seconds", 0) or 0)
    if start is None or stop is None or seconds <= 0 or stop < start:
        return None
    return stop if stop - start >= seconds else None


class _TransientOp(Exception):
    """An operation finished with a retryable error (5xx, 429)."""


@dataclass
class _Clients:
    instances: compute_v1.InstancesClient
    operations: compute_v1.ZoneOperationsClient


@dataclass
class _Vm:
    """One VM being worked on: its clients, its deadline, and what a capacity message names."""

    name: str
    clients: _Clients
    until: float  # time.monotonic() deadline for everything done to this VM
    gpu: str = "this machine type"


def _last_segment(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _capacity_code(codes: Sequence[str], text: str) -> str | None:
    """The capacity code an error names: in its codes or text, or a quota in its codes.

    "quota" is looked for in the codes and reasons only: a message may name a VM or stack
    that happens to contain the word.
    """
    upper = " ".join([*codes, text]).upper()
    for code in CAPACITY_CODES:
        if code in upper:
            return code
    return "QUOTA_EXCEEDED" if any("quota" in c.lower() for c in codes) else None


def _not_ready(exc: gexc.GoogleAPICallError) -> bool:
    return any(isinstance(e, dict) and e.get("reason") == "resourceNotReady" for e in exc.errors)


def _rate_limited(exc: gexc.GoogleAPICallError) -> bool:
    reasons = " ".join(str(e.get("reason", "")) for e in exc.errors if isinstance(e, dict))
    return exc.code == 429 or any(r in reasons or r in str(exc) for r in RATE_LIMIT_REASONS)


class ComputeFleet:
    """The stack's worker VMs, labelled `pcp-stack=<stack>`, in one project and zone."""

    def __init__(self, project: str, zone: str, stack: str, endpoint: str | None = None, *,
                 op_timeout: float = 300.0, max_workers: int = 32,
                 margin_seconds: float = 150.0, min_run_seconds: int = 30,
                 attempts: int = 5, backoff_seconds: float = 1.0,
                 credentials: Any = None, clock: Callable[[], float] = time.time) -> None:
        if not STACK_RE.match(stack):
            raise ValueError(f"stack {stack!r} is not a valid stack name")
        if not MIN_RUN_SECONDS <= min_run_seconds <= MAX_RUN_SECONDS:
            raise ValueError(f"min_run_seconds {min_run_seconds} is outside what GCE accepts "
                             f"for maxRunDuration ({MIN_RUN_SECONDS}..{MAX_RUN_SECONDS} s)")
        self.project, self.zone, self.stack = project, zone, stack
        self.endpoint = endpoint
        self.op_timeout = op_timeout
        self.max_workers = max_workers
        self.margin_seconds = margin_seconds
        self.min_run_seconds = min_run_seconds
        self.attempts = attempts
        self.backoff_seconds = backoff_seconds
        self.calls: Counter[str] = Counter()  # API requests issued, by kind, retries included
        self._credentials = credentials
        self._clock = clock
        self._pool: queue.SimpleQueue[_Clients] = queue.SimpleQueue()
        self._invocation = threading.local()  # the calling thread's invocation deadline
        self._lock = threading.Lock()

    # ------------------------------------------------------------ the port

    def list(self) -> list[VmView]:
        return [VmView(i.name, i.status, dict(i.labels), created=created_epoch(i),
                       capped_stop=capped_stop_epoch(i))
                for i in self._instances()]

    def _instances(self) -> list[compute_v1.Instance]:
        """Every VM of the stack, whole (status, labels, fingerprints): one paged list call."""
        req = self._cv1().ListInstancesRequest(
            project=self.project, zone=self.zone, filter=f'labels.{LABEL_STACK} = "{self.stack}"')
        with self._client() as c:
            vm = _Vm("", c, self._until())
            return self._retry(vm, "list", lambda: list(self._api(
                "list", c.instances.list, request=req, timeout=self._timeout(vm))))

    def _listed(self, names: Sequence[str]) -> dict[str, compute_v1.Instance]:
        """The named VMs from one list call instead of one get each (several VMs only)."""
        if len(names) < 2:
            return {}
        return {i.name: i for i in self._instances() if i.name in set(names)}

    def start(self, assignments: Sequence[Assignment], deadline: datetime) -> None:
        until = self._until()
        by_vm = {a.vm: a for a in assignments}
        known = self._listed(list(by_vm))
        self._each(list(by_vm), lambda vm: self._start_one(
            vm, by_vm[vm.name], deadline, known.get(vm.name)), until)

    def stop(self, vms: Sequence[str],
             spare: Callable[[], tuple[str, int] | None] | None = None,
             owner: str | None = None) -> None:
        known = self._listed(list(vms)) if spare is not None else {}
        self._each(list(vms), lambda vm: self._stop_one(vm, spare, owner, known.get(vm.name)),
                   self._until())

    def set_labels(self, vms: Sequence[str], labels: Mapping[str, str]) -> None:
        def one(vm: _Vm) -> None:
            try:
                self._merge_labels(vm, dict(labels), ())
            except gexc.NotFound:
                log("INFO", "fleet.set_labels", stack=self.stack,
                    reason=f"{vm.name} does not exist; skipped")
        self._each(list(vms), one, self._until())

    # ------------------------------------------------------------ one VM

    def _start_one(self, vm: _Vm, a: Assignment, deadline: datetime,
                   listed: compute_v1.Instance | None = None) -> None:
        try:
            inst = listed if listed is not None else self._get(vm)
        except gexc.NotFound:
            # Retrying cannot create a VM: end the run with the reason instead.
            raise CapacityError(f"VM {vm.name} does not exist in {self.zone}: deploy the "
                                f"stack (pulumi up) or check pcp:worker_count") from None
        if inst.guest_accelerators:
            vm.gpu = _last_segment(inst.guest_accelerators[0].accelerator_type)
        else:
            vm.gpu = _last_segment(inst.machine_type) or vm.gpu
        labels = dict(inst.labels)
        same = holds_attempt(labels, a.run_id, a.attempt)
        if inst.status in RUNNING_STATES and same:
            log("INFO", "fleet.start", stack=self.stack, run_id=a.run_id,
                reason=f"{vm.name} already {inst.status} for attempt {a.attempt}; left alone")
            return
        if inst.status != "TERMINATED":
            log("INFO", "fleet.start", stack=self.stack, run_id=a.run_id,
                reason=f"{vm.name} is {inst.status} under run {labels.get(LABEL_RUN)!r} "
                       f"attempt {labels.get(LABEL_ATTEMPT)!r}; stopping it first")
            inst = self._bring_down(vm, inst)
        self._merge_metadata(vm, {ASSIGNMENT_KEY: a.to_json().decode()}, inst)
        self._merge_labels(vm, {LABEL_RUN: a.run_id, LABEL_ATTEMPT: str(a.attempt),
                                LABEL_DEADLINE: str(int(deadline.timestamp()))},
                           (LABEL_KEEP_ALIVE,), inst)
        seconds = self._run_seconds(deadline)
        self._arm(vm, inst, seconds)
        self._mutate(vm, "start", vm.clients.instances.start_unary)
        log("INFO", "fleet.start", stack=self.stack, run_id=a.run_id,
            reason=f"{vm.name} started for attempt {a.attempt}; maxRunDuration {seconds}s")

    def _stop_one(self, vm: _Vm, spare: Callable[[], tuple[str, int] | None] | None,
                  owner: str | None, listed: compute_v1.Instance | None = None) -> None:
        try:
            if spare is not None:
                inst = listed if listed is not None else self._get(vm)
                if inst.status == "TERMINATED":
                    return
                labels = dict(inst.labels)
                if late_stop_spares(labels, owner, spare):
                    log("INFO", "fleet.stop", stack=self.stack, run_id=labels.get(LABEL_RUN),
                        reason=f"{vm.name} now runs {labels.get(LABEL_RUN)} attempt "
                               f"{labels.get(LABEL_ATTEMPT)}; a late stop leaves it alone")
                    return
            try:
                self._mutate(vm, "stop", vm.clients.instances.stop_unary)
            except gexc.BadRequest as e:
                if not _not_ready(e):
                    raise
                self._bring_down(vm)  # SUSPENDING: a stop is taken once it is SUSPENDED
        except gexc.NotFound:
            log("INFO", "fleet.stop", stack=self.stack, reason=f"{vm.name} does not exist")

    def _run_seconds(self, deadline: datetime) -> int:
        """maxRunDuration for a VM started now: until the deadline, plus the margin."""
        wanted = math.ceil(deadline.timestamp() - self._clock() + self.margin_seconds)
        return max(self.min_run_seconds, min(MAX_RUN_SECONDS, wanted))

    def _arm(self, vm: _Vm, inst: compute_v1.Instance, seconds: int) -> None:
        """Set the hard cap, keeping every other scheduling field, and read it back."""
        cv1 = self._cv1()
        scheduling = cv1.Scheduling(inst.scheduling)
        scheduling.max_run_duration = cv1.Duration(seconds=seconds)
        scheduling.instance_termination_action = "STOP"
        self._mutate(vm, "setScheduling", vm.clients.instances.set_scheduling_unary,
                     scheduling_resource=scheduling)
        got = self._get(vm).scheduling
        if got.max_run_duration.seconds != seconds or got.instance_termination_action != "STOP":
            raise RuntimeError(
                f"{vm.name}: maxRunDuration did not take: wanted {seconds}s with STOP, read back "
                f"{got.max_run_duration.seconds}s with {got.instance_termination_action!r}; "
                "not starting a VM without its hard cap")

    def _merge_metadata(self, vm: _Vm, updates: Mapping[str, str],
                        inst: compute_v1.Instance) -> None:
        """setMetadata replaces the whole set: merge into what is there, fenced by fingerprint."""
        cv1 = self._cv1()
        for _ in range(FINGERPRINT_TRIES):
            items = {i.key: i.value for i in inst.metadata.items}
            if all(items.get(k) == v for k, v in updates.items()):
                return
            items.update(updates)
            body = cv1.Metadata(fingerprint=inst.metadata.fingerprint,
                                items=[cv1.Items(key=k, value=v) for k, v in items.items()])
            try:
                self._mutate(vm, "setMetadata", vm.clients.instances.set_metadata_unary,
                             metadata_resource=body)
                return
            except gexc.PreconditionFailed:
                inst = self._get(vm)  # someone else wrote: merge into the fresh set
        raise RuntimeError(f"{vm.name}: metadata fingerprint kept changing "
                           f"({FINGERPRINT_TRIES} tries)")

    def _merge_labels(self, vm: _Vm, updates: Mapping[str, str], remove: Sequence[str],
                      inst: compute_v1.Instance | None = None) -> None:
        """setLabels replaces the whole set too: merge, fenced by the label fingerprint."""
        cv1 = self._cv1()
        for _ in range(FINGERPRINT_TRIES):
            inst = inst or self._get(vm)
            labels = dict(inst.labels)
            merged = {k: v for k, v in {**labels, **updates}.items() if k not in remove}
            if merged == labels:
                return
            body = cv1.InstancesSetLabelsRequest(label_fingerprint=inst.label_fingerprint,
                                                 labels=merged)
            try:
                self._mutate(vm, "setLabels", vm.clients.instances.set_labels_unary,
                             instances_set_labels_request_resource=body)
                return
            except gexc.PreconditionFailed:
                inst = None  # someone else wrote: merge into the fresh set
        raise RuntimeError(f"{vm.name}: label fingerprint kept changing "
                           f"({FINGERPRINT_TRIES} tries)")

    def _bring_down(self, vm: _Vm,
                    inst: compute_v1.Instance | None = None) -> compute_v1.Instance:
        """Stop a VM in any status and wait until it is TERMINATED, then return it.

        setScheduling is refused on anything but a TERMINATED VM, so a VM that is up,
        SUSPENDED or REPAIRING is stopped first. A SUSPENDED VM is stopped, not resumed:
        resuming would bring back the memory of its previous assignment only for it to be
        stopped again before the hard cap can be set, and a stop discards the suspended state.
        A VM that is STOPPING (or SUSPENDING) cannot take a stop (400 resourceNotReady): it is
        polled until it settles.
        """
        delay = 0.2
        while True:
            current, inst = inst or self._get(vm), None  # after the first pass, read it back
            if current.status == "TERMINATED":
                return current
            status = current.status
            if status in STOPPABLE:
                try:
                    self._mutate(vm, "stop", vm.clients.instances.stop_unary)
                    continue
                except gexc.BadRequest as e:
                    if not _not_ready(e):
                        raise
            if time.monotonic() + delay > vm.until:
                raise TimeoutError(f"{vm.name} still {status} after {self.op_timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)

    # ------------------------------------------------------------ calls, operations, retries

    def _get(self, vm: _Vm) -> compute_v1.Instance:
        instances = vm.clients.instances
        return self._retry(vm, "get", lambda: self._api(
            "get", instances.get, project=self.project, zone=self.zone, instance=vm.name,
            timeout=self._timeout(vm)))

    def _mutate(self, vm: _Vm, kind: str, call: Callable[..., compute_v1.Operation],
                **body: Any) -> None:
        """Issue a mutation and await its operation; retry the pair on transient errors."""
        def once() -> None:
            op = self._api(kind, call, project=self.project, zone=self.zone, instance=vm.name,
                           timeout=self._timeout(vm), **body)
            self._check(vm, kind, self._wait(vm, op))
        self._retry(vm, kind, once)

    def _wait(self, vm: _Vm, op: compute_v1.Operation) -> compute_v1.Operation:
        done = self._cv1().Operation.Status.DONE
        operations = vm.clients.operations
        while op.status != done:
            if time.monotonic() >= vm.until:
                raise TimeoutError(f"{vm.name}: operation {op.name} not done after "
                                   f"{self.op_timeout}s")
            op = self._retry(vm, "operations.wait", partial(
                self._api, "operations.wait", operations.wait, project=self.project,
                zone=self.zone, operation=op.name, timeout=self._timeout(vm)))
        return op

    def _check(self, vm: _Vm, kind: str, op: compute_v1.Operation) -> None:
        errors = list(op.error.errors)
        if not errors and not op.http_error_status_code:
            return
        detail = "; ".join(f"{e.code}: {e.message}" for e in errors) or op.http_error_message
        self._raise_capacity(vm, [e.code for e in errors], detail)
        if op.http_error_status_code in TRANSIENT_HTTP:
            raise _TransientOp(f"{kind} of {vm.name}: {detail}")
        raise gexc.from_http_status(  # type: ignore[no-untyped-call]
            op.http_error_status_code or 500, f"{kind} of {vm.name} failed: {detail}")

    def _raise_capacity(self, vm: _Vm, codes: Sequence[str], detail: str) -> None:
        code = _capacity_code(codes, detail)
        if code is None:
            return
        what = "quota" if code == "QUOTA_EXCEEDED" else "capacity"
        raise CapacityError(f"no {what} for {vm.gpu} in {self.zone} ({code}): {detail}")

    def _api(self, kind: str, call: Callable[..., T], **kwargs: Any) -> T:
        """One request, counted; the library's own retries are off (ours are bounded)."""
        with self._lock:
            self.calls[kind] += 1
        return call(retry=None, **kwargs)

    @contextmanager
    def invocation(self, seconds: float) -> Iterator[None]:
        """Inside the block, everything this thread asks of Compute Engine ends within
        `seconds` of entering it, however many calls the invocation makes (a sweep may list,
        stop and start). Each call still gets at most `op_timeout`."""
        previous = getattr(self._invocation, "until", None)
        self._invocation.until = time.monotonic() + seconds
        try:
            yield
        finally:
            self._invocation.until = previous

    def _until(self) -> float:
        """The deadline of a call made now: op_timeout, within the invocation's deadline."""
        until = time.monotonic() + self.op_timeout
        cap = getattr(self._invocation, "until", None)
        return until if cap is None else min(until, cap)

    def _timeout(self, vm: _Vm) -> float:
        return max(1.0, min(130.0, vm.until - time.monotonic()))  # GCE holds a wait <= 2 min

    def _retry(self, vm: _Vm, what: str, fn: Callable[[], T]) -> T:
        delay = self.backoff_seconds
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as e:
                if isinstance(e, gexc.GoogleAPICallError) and not _rate_limited(e):
                    reasons = [str(x.get("reason", "")) for x in e.errors if isinstance(x, dict)]
                    self._raise_capacity(vm, reasons, e.message)
                pause = delay * (0.5 + random.random() / 2)
                if (not self._transient(e) or attempt == self.attempts
                        or time.monotonic() + pause >= vm.until):
                    raise
                log("WARNING", "fleet.retry", stack=self.stack,
                    reason=f"{what} {vm.name}: {e!r}; attempt {attempt + 1} of {self.attempts} "
                           f"in {pause:.2f}s")
                time.sleep(pause)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _transient(e: Exception) -> bool:
        import requests

        # Our own operation deadline (TimeoutError) is final: the budget is spent.
        if isinstance(e, _TransientOp | gexc.RetryError | requests.ConnectionError
                      | requests.Timeout):
            return True
        return isinstance(e, gexc.GoogleAPICallError) and (
            e.code in TRANSIENT_HTTP or _rate_limited(e))  # GCE may say 403 rateLimitExceeded

    # ------------------------------------------------------------ threads and clients

    def _each(self, names: Sequence[str], fn: Callable[[_Vm], None], until: float) -> None:
        """Run `fn` for every VM concurrently; raise CapacityError first, else the first error."""
        names = list(dict.fromkeys(names))
        if not names:
            return
        errors: list[Exception] = []

        def run(name: str) -> None:
            with self._client() as c:
                try:
                    fn(_Vm(name, c, until))
                except Exception as e:  # noqa: BLE001 - collected, re-raised below
                    errors.append(e)

        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(names)),
                                thread_name_prefix="fleet") as pool:
            list(pool.map(run, names))
        capacity = [e for e in errors if isinstance(e, CapacityError)]
        if capacity:
            more = f" (and {len(capacity) - 1} more VMs)" if len(capacity) > 1 else ""
            raise CapacityError(f"{capacity[0]}{more}") from capacity[0]
        if errors:
            raise errors[0]

    @contextmanager
    def _client(self) -> Iterator[_Clients]:
        """A pair of clients for one thread: a requests session is not shared across threads."""
        try:
            clients = self._pool.get_nowait()
        except queue.Empty:
            clients = self._new_clients()
        try:
            yield clients
        finally:
            self._pool.put(clients)

    def _new_clients(self) -> _Clients:
        cv1 = self._cv1()
        options: dict[str, Any] = {}
        with self._lock:
            if self.endpoint:
                from google.auth.credentials import AnonymousCredentials

                options = {"client_options": {"api_endpoint": self.endpoint}}
                self._credentials = (self._credentials
                                     or AnonymousCredentials())  # type: ignore[no-untyped-call]
            elif self._credentials is None:
                import google.auth  # resolved once, shared by every thread's clients

                self._credentials, _ = google.auth.default(
                    scopes=["https://www.googleapis.com/auth/cloud-platform"])
            creds = self._credentials
        return _Clients(
            cv1.InstancesClient(transport="rest", credentials=creds, **options),
            cv1.ZoneOperationsClient(transport="rest", credentials=creds, **options))

    @staticmethod
    def _cv1() -> Any:
        from google.cloud import compute_v1

        return compute_v1

