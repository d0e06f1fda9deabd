"""A local Compute Engine endpoint: the Compute v1 REST calls ComputeFleet makes, no more.

The production `google-cloud-compute` client talks to it unchanged (REST transport,
`api_endpoint="http://127.0.0.1:PORT"`, anonymous credentials), so the tests and the local
replica exercise the real request and response shapes, the real exception mapping and the
fleet's own operation waiting. Served: instances get, list (label filter), start, stop,
setMetadata, setLabels, setScheduling, and zoneOperations get and wait.

Strict by construction, so that what passes here does not fail on Compute Engine:
- every request (path and query parameters, body) and every response is checked against the
  compute v1 discovery document shipped with google-api-python-client (`compute_schema`);
- the documented rules a schema cannot say are encoded in `check_labels`, `check_metadata` and
  `check_scheduling`, and each method is allowed only in the statuses `ALLOWED` lists (a
  start during STOPPING is `resourceNotReady`, setScheduling needs TERMINATED);
- fingerprints are checked (a stale one gets 412 `conditionNotMet`);
- VMs pass through GCE's statuses in time: TERMINATED -> PROVISIONING -> STAGING -> RUNNING ->
  STOPPING -> TERMINATED, the start and stop operations finishing when the VM is RUNNING or
  TERMINATED; the durations are the real ones (`BOOT_SECONDS`, the guest shutdown capped at the
  120 s / 30 s soft-off window) times `time_scale`, which tests and the replica set small;
- `scheduling.maxRunDuration` is enforced by a background thread (termination action STOP or
  DELETE), its clock scaled by `run_clock_scale` (1 by default: a one-hour cap is an hour).
`faults` makes calls slow, operations long-running, or calls fail on demand. The local replica
turns a VM into a process through `on_start` / `on_stop`, and calls `power_off` when that process
shuts its "VM" down itself.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pcp.logs import log
from pcp_dev.local.compute_schema import ComputeSchema, RequestInvalid, ResponseInvalid, compute_v1
from pcp_dev.local.loopback import QuietHTTPServer

UP = frozenset({"PROVISIONING", "STAGING", "RUNNING"})
MUTATIONS = ("start", "stop", "setMetadata", "setLabels", "setScheduling")
# Which statuses each mutation may be called in; any other status is 400 resourceNotReady
# (setScheduling: 400 invalid, quoting the discovery document). "noop" answers DONE and changes
# nothing, as GCE does for a start of a running VM or a stop of a stopped one; "join" is a stop
# of a VM already stopping: its operation ends when the VM is TERMINATED.
ALLOWED: dict[str, dict[str, str]] = {
    "start": {"TERMINATED": "run", "PROVISIONING": "noop", "STAGING": "noop",
              "RUNNING": "noop"},
    "stop": {"PROVISIONING": "run", "STAGING": "run", "RUNNING": "run", "SUSPENDED": "run",
             "REPAIRING": "run", "STOPPING": "join", "TERMINATED": "noop"},
    "setScheduling": {"TERMINATED": "run"},
    "setMetadata": {s: "run" for s in ("PROVISIONING", "STAGING", "RUNNING", "STOPPING",
                                       "SUSPENDING", "SUSPENDED", "REPAIRING", "TERMINATED")},
}
ALLOWED["setLabels"] = ALLOWED["setMetadata"]
STATUSES = frozenset(ALLOWED["setMetadata"])
# Real durations, in seconds, before `time_scale`. A boot's PROVISIONING and STAGING take tens
# of seconds on GCE (typical, not a documented bound); a guest's soft-off is capped at 120 s for
# standard VMs and 30 s for Spot (discovery document, Scheduling.skipGuestOsShutdown).
BOOT_SECONDS = {"PROVISIONING": 10.0, "STAGING": 20.0}
GUEST_SHUTDOWN_SECONDS = 10.0
SOFT_OFF_SECONDS = {"STANDARD": 120.0, "SPOT": 30.0}
MAX_RUN_RANGE = (30, 120 * 24 * 3600)  # cloud.google.com/compute/docs/instances/limit-vm-runtime
METADATA_TOTAL_BYTES = 512 * 1024
METADATA_VALUE_BYTES = 256 * 1024
MAX_LABELS = 64
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
_LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
_METADATA_KEY = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
# The discovery methods behind each kind of call, with the schema of their body.
METHODS = {"get": ("instances", "get"), "list": ("instances", "list"),
           "operations.get": ("zoneOperations", "get"),
           "operations.wait": ("zoneOperations", "wait"),
           **{m: ("instances", m) for m in MUTATIONS}}
STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE"}
# Operation errors as GCE reports them: the HTTP status it puts on the finished operation.
OP_ERROR_STATUS = {"ZONE_RESOURCE_POOL_EXHAUSTED": (503, "SERVICE UNAVAILABLE"),
                   "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS": (503, "SERVICE UNAVAILABLE"),
                   "QUOTA_EXCEEDED": (403, "FORBIDDEN")}
HTTP_REASON = {400: "badRequest", 403: "forbidden", 404: "notFound", 412: "conditionNotMet",
               429: "rateLimitExceeded", 500: "backendError", 503: "backendError"}
DROPPED = "(dropped)"  # a fault: the mutation answers DONE and changes nothing
_PATH = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/zones/(?P<zone>[^/]+)/"
                   r"(?P<coll>instances|operations)(?:/(?P<name>[^/]+)(?:/(?P<verb>[A-Za-z]+))?)?$")
# disks.list (zonal) and addresses.list (regional): what `pcp cost` reads of the stack.
_LIST_PATH = re.compile(r"^/compute/v1/projects/(?P<project>[^/]+)/(?P<scope>zones|regions)/"
                        r"(?P<where>[^/]+)/(?P<coll>disks|addresses)$")
LISTS = {"disks": ("zones", "disks", "list"), "addresses": ("regions", "addresses", "list")}
_CLAUSE = re.compile(r'\s*(?:AND\s+)?labels\.(?P<key>[a-z0-9_-]+)\s*(?P<op>!=|=)\s*'
                     r'(?:"(?P<quoted>[^"]*)"|(?P<bare>[^\s"()]+))\s*')

Hook = Callable[["VmRecord"], None]


def _now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fingerprint() -> str:
    # GCE fingerprints are opaque base64 tokens; a fresh random one per write is all a client
    # may rely on (it must echo back the one it read).
    return base64.b64encode(os.urandom(8)).decode()


@dataclass
class VmRecord:
    """One VM as the endpoint holds it. Fields use GCE's JSON names where they are JSON."""

    name: str
    id: int
    status: str = "TERMINATED"
    labels: dict[str, str] = field(default_factory=dict)
    label_fingerprint: str = field(default_factory=_fingerprint)
    metadata: dict[str, str] = field(default_factory=dict)
    metadata_fingerprint: str = field(default_factory=_fingerprint)
    scheduling: dict[str, Any] = field(default_factory=dict)
    machine_type: str = "n1-standard-4"
    accelerator: tuple[str, int] | None = ("nvidia-tesla-t4", 1)
    started_at: float | None = None  # time.monotonic() when it last became RUNNING
    last_start: str | None = None
    last_stop: str | None = None
    starts: int = 0
    stops: int = 0
    boot_disk_gb: int = 100  # the boot disk, named as the VM (as the Pulumi program makes it)
    boot_disk_type: str = "pd-balanced"

    def max_run_seconds(self) -> float | None:
        duration = self.scheduling.get("maxRunDuration")
        if not isinstance(duration, dict) or "seconds" not in duration:
            return None
        return int(duration["seconds"]) + int(duration.get("nanos", 0)) / 1e9


class _HttpError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message = code, message
        self.reason = reason or HTTP_REASON.get(code, "error")

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message, "errors": [
            {"message": self.message, "domain": "global", "reason": self.reason}]}
        if self.code in STATUS_NAMES:
            error["status"] = STATUS_NAMES[self.code]
        return {"error": error}


def _invalid(message: str) -> _HttpError:
    return _HttpError(400, message, "invalid")


def _not_ready(what: str) -> _HttpError:
    return _HttpError(400, f"The resource '{what}' is not ready", "resourceNotReady")


def _label_text(kind: str, text: str) -> str:
    if kind == "key":
        return (f"Label key '{text}' violates format constraints. The key must start with a "
                "lowercase character, can only contain lowercase letters, numeric characters, "
                "underscores and dashes. The key can be at most 63 characters long. "
                "International characters are allowed.")
    return (f"Label value '{text}' violates format constraints. The value can only contain "
            "lowercase letters, numeric characters, underscores and dashes. The value can be "
            "at most 63 characters long. International characters are allowed.")


def _label_ok(pattern: re.Pattern[str], text: str) -> bool:
    # International lowercase letters are allowed too: fold them to 'a' before matching.
    folded = "".join("a" if ord(c) > 127 and c.islower() else c for c in text)
    return pattern.fullmatch(folded) is not None


def check_labels(labels: Mapping[str, str], field_name: str = "labels") -> None:
    """GCE's label rules (cloud.google.com/compute/docs/labeling-resources)."""
    if len(labels) > MAX_LABELS:
        raise _invalid(f"Invalid value for field '{field_name}': ''. Resource cannot have "
                       f"more than {MAX_LABELS} labels.")
    for key, value in labels.items():
        if not _label_ok(_LABEL_KEY, key):
            raise _invalid(f"Invalid value for field '{field_name}': ''. "
                           f"{_label_text('key', key)}")
        if not _label_ok(_LABEL_VALUE, value):
            raise _invalid(f"Invalid value for field '{field_name}': ''. "
                           f"{_label_text('value', value)}")


def check_metadata(items: Mapping[str, str]) -> None:
    """GCE's metadata limits (discovery document, Metadata.items; metadata docs page)."""
    total = 0
    for key, value in items.items():
        if not _METADATA_KEY.fullmatch(key):
            raise _invalid(f"Invalid value for field 'metadata.items.key': '{key[:80]}'. Must "
                           "be a match of regex '[a-zA-Z0-9-_]{1,128}'")
        size = len(value.encode())
        if size > METADATA_VALUE_BYTES:
            raise _invalid(f"Invalid value for field 'metadata.items.value': the value of "
                           f"'{key}' is {size} bytes; at most {METADATA_VALUE_BYTES} are allowed.")
        total += size + len(key.encode())
    if total > METADATA_TOTAL_BYTES:
        raise _invalid(f"Invalid value for field 'metadata': the metadata is {total} bytes; "
                       f"at most {METADATA_TOTAL_BYTES} are allowed in all.")


def check_scheduling(scheduling: Mapping[str, Any]) -> None:
    """The rules between Scheduling fields (limit-vm-runtime docs page)."""
    action = scheduling.get("instanceTerminationAction")
    duration = scheduling.get("maxRunDuration")
    termination = scheduling.get("terminationTime")
    if action not in (None, "INSTANCE_TERMINATION_ACTION_UNSPECIFIED") and not (
            duration or termination):
        raise _invalid("Invalid value for field 'scheduling.instanceTerminationAction': "
                       f"'{action}'. instanceTerminationAction can only be set together with "
                       "maxRunDuration or terminationTime.")
    if duration:
        seconds = int(duration.get("seconds", 0))
        if not MAX_RUN_RANGE[0] <= seconds <= MAX_RUN_RANGE[1]:
            raise _invalid("Invalid value for field 'scheduling.maxRunDuration.seconds': "
                           f"'{seconds}'. Must be between {MAX_RUN_RANGE[0]} and "
                           f"{MAX_RUN_RANGE[1]} seconds.")
    if termination is not None and not _RFC3339.fullmatch(termination):
        raise _invalid("Invalid value for field 'scheduling.terminationTime': "
                       f"'{termination}'. Must be an RFC3339 timestamp.")
    if duration and termination:
        raise _invalid("Invalid value for field 'scheduling': maxRunDuration and "
                       "terminationTime cannot both be set.")


class Faults:
    """Slow calls, long-running operations and failures, switched on by tests and the bench.

    - `delay_seconds[kind]` (or `["*"]` for every call): latency added before a call answers.
    - `slow_seconds[kind]` for a mutation: the call answers with a RUNNING operation that
      finishes (and changes the VM) that many seconds later.
    - `fail_next(kind, vm, error)`: the next matching call fails. `error` is an operation error
      code (ZONE_RESOURCE_POOL_EXHAUSTED, QUOTA_EXCEEDED, ...: the call answers with an
      operation that finishes with that error, as GCE does), or an HTTP status for the call
      itself (503, 429, 500...). 412 on setMetadata/setLabels means another writer changed the
      VM just before, so the fingerprint the client holds has gone stale.
    - `drop_next(kind, vm)`: the next matching mutation succeeds but changes nothing, as when
      GCE silently ignores a field: what a read-back check exists to catch.
    Kinds: get, list, start, stop, setMetadata, setLabels, setScheduling, operations.get,
    operations.wait.
    """

    def __init__(self) -> None:
        self.delay_seconds: dict[str, float] = {}
        self.slow_seconds: dict[str, float] = {}
        self._pending: list[tuple[str, str | None, str | int]] = []
        self._lock = threading.Lock()

    def fail_next(self, kind: str, vm: str | None = None,
                  error: str | int = "ZONE_RESOURCE_POOL_EXHAUSTED") -> None:
        if isinstance(error, str) and kind not in MUTATIONS:
            raise ValueError(f"operation error {error!r} needs a mutation, not {kind!r}")
        with self._lock:
            self._pending.append((kind, vm, error))

    def drop_next(self, kind: str, vm: str | None = None) -> None:
        if kind not in MUTATIONS:
            raise ValueError(f"only a mutation can be dropped, not {kind!r}")
        with self._lock:
            self._pending.append((kind, vm, DROPPED))

    def delay(self, kind: str) -> float:
        return self.delay_seconds.get(kind, self.delay_seconds.get("*", 0.0))

    def take(self, kind: str, vm: str | None) -> str | int | None:
        with self._lock:
            for i, (k, v, error) in enumerate(self._pending):
                if k == kind and (v is None or v == vm):
                    del self._pending[i]
                    return error
        return None


class LocalCompute:
    """One project and zone of Compute Engine on 127.0.0.1, with hooks for the local replica.

    `on_start(vm)` runs when a VM becomes RUNNING, `on_stop(vm)` when it is being stopped
    (by a stop call or by maxRunDuration); both run outside the endpoint's lock, and the VM
    stays STOPPING until `on_stop` returns, like a guest's ACPI shutdown. Without an `on_stop`
    the guest takes `guest_shutdown_seconds`, never more than its soft-off window.

    `time_scale` multiplies every timed transition (1.0: as long as on GCE; 0: at once, the
    statuses still passed through); `run_clock_scale` multiplies the maxRunDuration clock.
    """

    def __init__(self, project: str, zone: str, on_start: Hook | None = None,
                 on_stop: Hook | None = None, *, enforce_interval: float = 0.05,
                 wait_cap_seconds: float = 10.0, time_scale: float = 0.01,
                 run_clock_scale: float = 1.0) -> None:
        self.project, self.zone = project, zone
        self.on_start, self.on_stop = on_start, on_stop
        self.faults = Faults()
        self.calls: list[tuple[str, str]] = []
        self.call_counts: Counter[tuple[str, str | None]] = Counter()
        # Operation waits are capped like GCE's (2 minutes there), shorter so shutdown is quick.
        self.wait_cap_seconds = wait_cap_seconds
        self.time_scale = time_scale
        self.run_clock_scale = run_clock_scale
        self.guest_shutdown_seconds = GUEST_SHUTDOWN_SECONDS
        self.schema: ComputeSchema = compute_v1()
        self.invalid_responses: list[str] = []  # responses the schema refused: endpoint bugs
        self._enforce_interval = enforce_interval
        self._vms: dict[str, VmRecord] = {}
        self._disks: dict[str, dict[str, Any]] = {}  # standalone disks (no VM's boot disk)
        self._addresses: dict[str, dict[str, Any]] = {}
        self._ops: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1000)
        self._lock = threading.Condition()
        self._timers: list[threading.Thread] = []
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # ------------------------------------------------------------ lifecycle

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalCompute is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> LocalCompute:
        handler = type("Handler", (_Handler,), {"compute": self})
        self._server = QuietHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._stopping.clear()
        # A short poll interval: shutdown() waits for the loop to notice, 0.5 s by default.
        self._threads = [threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                          daemon=True, name="local-compute"),
                         threading.Thread(target=self._enforce, daemon=True,
                                          name="local-compute-maxrun")]
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for t in [*self._threads, *self._timers]:
            t.join(timeout=5)
        self._server = None

    def __enter__(self) -> LocalCompute:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------ the stack's VMs

    def add_instance(self, name: str, labels: Mapping[str, str] | None = None,
                     metadata: Mapping[str, str] | None = None, *, status: str = "TERMINATED",
                     scheduling: Mapping[str, Any] | None = None,
                     machine_type: str = "n1-standard-4",
                     accelerator: tuple[str, int] | None = ("nvidia-tesla-t4", 1)) -> VmRecord:
        """Create a VM as the Pulumi program would (no hooks run, even if RUNNING).

        The same rules as the API's apply: a VM the real insert would refuse is a ValueError.
        """
        sched = dict(scheduling or {"onHostMaintenance": "TERMINATE", "automaticRestart": False})
        try:
            if status not in STATUSES:
                raise _invalid(f"status {status!r} is not one of {sorted(STATUSES)}")
            if not re.fullmatch(self.schema.method("instances", "get")["parameters"]
                                ["instance"]["pattern"], name):
                raise _invalid(f"Invalid value for field 'resource.name': '{name}'")
            check_labels(dict(labels or {}), "resource.labels")
            check_metadata(dict(metadata or {}))
            sched = self.schema.check_request("Scheduling", sched)
            check_scheduling(sched)
        except (_HttpError, RequestInvalid) as e:
            raise ValueError(f"{name}: {e}") from None
        with self._lock:
            vm = VmRecord(name, next(self._ids), status, dict(labels or {}),
                          metadata=dict(metadata or {}), scheduling=sched,
                          machine_type=machine_type, accelerator=accelerator)
            if status == "RUNNING":
                vm.started_at = time.monotonic()
            self._vms[name] = vm
            return vm

    @property
    def region(self) -> str:
        return self.zone.rsplit("-", 1)[0]

    def add_disk(self, name: str, size_gb: int, disk_type: str = "pd-balanced",
                 labels: Mapping[str, str] | None = None) -> None:
        """A persistent disk attached to no VM (it bills all the same)."""
        check_labels(dict(labels or {}), "resource.labels")
        with self._lock:
            self._disks[name] = {"name": name, "sizeGb": int(size_gb), "type": disk_type,
                                 "labels": dict(labels or {}), "id": next(self._ids)}

    def add_address(self, name: str, address: str, *, users: tuple[str, ...] = (),
                    labels: Mapping[str, str] | None = None) -> None:
        """A reserved external address; `users` (resource URLs) make it IN_USE, as a NAT
        gateway's router or a VM's access config does on GCE."""
        check_labels(dict(labels or {}), "resource.labels")
        with self._lock:
            self._addresses[name] = {"name": name, "address": address, "users": list(users),
                                     "labels": dict(labels or {}), "id": next(self._ids)}

    def vm(self, name: str) -> VmRecord:
        with self._lock:
            return self._vms[name]

    def set_status(self, name: str, status: str) -> None:
        """What Compute Engine does on its own: a host error (REPAIRING), a suspend, a reset."""
        if status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {sorted(STATUSES)}")
        with self._lock:
            vm = self._vms[name]
            vm.status = status
            vm.started_at = time.monotonic() if status == "RUNNING" else None
            self._lock.notify_all()

    def metadata_of(self, name: str) -> dict[str, str]:
        """A copy of a VM's live metadata: what the metadata server serves."""
        with self._lock:
            vm = self._vms.get(name)
            if vm is None:
                raise KeyError(name)
            return dict(vm.metadata)

    def power_off(self, name: str) -> None:
        """The guest shut itself down (`shutdown -h now`): TERMINATED, no on_stop hook."""
        with self._lock:
            vm = self._vms.get(name)
            if vm is not None:
                self._terminated(vm)

    def host_stop(self, name: str, boot: int, why: str) -> bool:
        """Compute Engine stops the VM on its own (host maintenance, a Spot preemption), as
        a stop call would, unless it was booted again since boot `boot` (`VmRecord.starts`).
        Returns whether a stop began."""
        with self._lock:
            vm = self._vms.get(name)
            if vm is None or vm.starts != boot or vm.status not in UP:
                return False
        log("NOTICE", "local_compute.host_stop", stack="", reason=f"{name}: {why}")
        try:
            finish = self._begin_stop(vm)
        except _HttpError:
            return False
        if finish is not None:
            self._in_background(finish, f"local-compute-host-stop-{name}")
        return finish is not None

    def count(self, kind: str, vm: str | None = None) -> int:
        """API calls of one kind seen so far, for one VM or in total."""
        with self._lock:
            if vm is not None:
                return self.call_counts[(kind, vm)]
            return sum(n for (k, _), n in self.call_counts.items() if k == kind)

    # ------------------------------------------------------------ state machine

    def _sleep(self, seconds: float) -> bool:
        """Wait a scaled real duration; False if the endpoint is being stopped."""
        return not self._stopping.wait(seconds * self.time_scale) if seconds > 0 else True

    def _terminated(self, vm: VmRecord) -> None:
        """Under the lock: the VM is down now."""
        if vm.status != "TERMINATED":
            vm.status, vm.started_at, vm.last_stop = "TERMINATED", None, _now_rfc3339()
            vm.stops += 1
            self._lock.notify_all()

    def _hook(self, hook: Hook | None, vm: VmRecord, what: str) -> None:
        if hook is None:
            return
        try:
            hook(vm)
        except Exception as e:  # noqa: BLE001 - a guest failing to boot or stop is not ours
            log("ERROR", f"local_compute.{what}_hook", stack="", reason=f"{vm.name}: {e!r}")

    def _refuse(self, kind: str, vm: VmRecord) -> str:
        """Under the lock: what `kind` does in the VM's status, or the error GCE answers."""
        action = ALLOWED[kind].get(vm.status)
        if action is not None:
            return action
        if kind == "setScheduling":
            raise _invalid(f"Invalid resource usage: setScheduling can only be called on a "
                           f"stopped instance (TERMINATED); '{vm.name}' is {vm.status}.")
        raise _not_ready(f"projects/{self.project}/zones/{self.zone}/instances/{vm.name}")

    def _begin_start(self, vm: VmRecord) -> Callable[[], None] | None:
        with self._lock:
            if self._refuse("start", vm) == "noop":
                return None
            vm.status, boot = "PROVISIONING", vm.stops

        def finish() -> None:
            for status, then in (("PROVISIONING", "STAGING"), ("STAGING", "RUNNING")):
                if not self._sleep(BOOT_SECONDS[status]):
                    return
                with self._lock:
                    if vm.status != status or vm.stops != boot:
                        return  # stopped or powered off while booting
                    vm.status = then
                    self._lock.notify_all()
            with self._lock:
                vm.started_at, vm.last_start = time.monotonic(), _now_rfc3339()
                vm.starts += 1
            self._hook(self.on_start, vm, "start")
        return finish

    def _begin_stop(self, vm: VmRecord, delete: bool = False) -> Callable[[], None] | None:
        with self._lock:
            action = self._refuse("stop", vm)
            if action == "noop":
                return None
            if action == "join":
                return lambda: self._until_down(vm)
            guest = vm.status in UP  # a suspended or repairing VM has no guest to shut down
            vm.status, boot = "STOPPING", vm.starts

        def finish() -> None:
            # The guest may have powered itself off meanwhile and the VM been started again:
            # this stop belongs to the earlier boot and must not touch the new one.
            with self._lock:
                if vm.status != "STOPPING" or vm.starts != boot:
                    return
            if self.on_stop is not None:
                self._hook(self.on_stop, vm, "stop")
            elif guest and not vm.scheduling.get("skipGuestOsShutdown"):
                model = vm.scheduling.get("provisioningModel", "STANDARD")
                window = SOFT_OFF_SECONDS.get(model, SOFT_OFF_SECONDS["STANDARD"])
                if not self._sleep(min(self.guest_shutdown_seconds, window)):
                    return
            with self._lock:
                if vm.starts == boot:
                    self._terminated(vm)
                if delete:
                    self._vms.pop(vm.name, None)
        return finish

    def _until_down(self, vm: VmRecord) -> None:
        with self._lock:
            while vm.status == "STOPPING" and not self._stopping.is_set():
                self._lock.wait(timeout=0.1)

    def _enforce(self) -> None:
        """GCE's hard cap: a VM RUNNING longer than its maxRunDuration is terminated."""
        while not self._stopping.wait(self._enforce_interval):
            due: list[tuple[VmRecord, bool]] = []
            with self._lock:
                now = time.monotonic()
                for vm in self._vms.values():
                    limit = vm.max_run_seconds()
                    if (vm.status == "RUNNING" and limit is not None
                            and vm.started_at is not None
                            and now - vm.started_at >= limit * self.run_clock_scale):
                        action = vm.scheduling.get("instanceTerminationAction", "STOP")
                        due.append((vm, action == "DELETE"))
            for vm, delete in due:
                log("NOTICE", "local_compute.max_run_duration", stack="",
                    reason=f"{vm.name} ran past maxRunDuration; "
                           f"{'deleting' if delete else 'stopping'} it")
                try:
                    finish = self._begin_stop(vm, delete)
                except _HttpError:
                    continue
                if finish is not None:
                    self._in_background(finish, f"local-compute-maxrun-{vm.name}")

    def _in_background(self, fn: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=fn, daemon=True, name=name)
        with self._lock:
            self._timers = [t for t in self._timers if t.is_alive()] + [thread]
        thread.start()

    # ------------------------------------------------------------ operations

    def _operation(self, kind: str, vm: VmRecord, apply: Callable[[], None] | None,
                   error: str | None, timed: bool = False) -> dict[str, Any]:
        """Record an operation; it is DONE when `apply` has run (after `slow_seconds`).

        A timed `apply` (a VM changing status) or a slow operation runs in the background and
        the call answers with a RUNNING operation, as GCE's start and stop do.
        """
        with self._lock:
            # GCE's operation names are lowercase and at most 63 characters (the discovery
            # document's pattern for zoneOperations' `operation`).
            name = f"operation-{next(self._ids)}-{kind.lower()}-{os.urandom(6).hex()}"
            op: dict[str, Any] = {
                "kind": "compute#operation", "id": str(next(self._ids)), "name": name,
                "zone": self._zone_url(), "operationType": kind, "targetId": str(vm.id),
                "targetLink": f"{self._zone_url()}/instances/{vm.name}", "status": "RUNNING",
                "progress": 0, "insertTime": _now_rfc3339(), "startTime": _now_rfc3339(),
                "selfLink": f"{self._zone_url()}/operations/{name}", "user": "local",
            }
            self._ops[name] = op
        delay = self.faults.slow_seconds.get(kind, 0.0)

        def complete() -> None:
            if error is None and apply is not None:
                apply()
            with self._lock:
                if error is not None:
                    status, text = OP_ERROR_STATUS.get(error, (400, "BAD REQUEST"))
                    op["error"] = {"errors": [{"code": error, "message": self._error_text(
                        error, vm)}]}
                    op["httpErrorStatusCode"], op["httpErrorMessage"] = status, text
                op.update(status="DONE", progress=100, endTime=_now_rfc3339())
                self._lock.notify_all()

        if delay <= 0 and not (timed and apply is not None and error is None):
            complete()
        else:
            def later() -> None:
                if not self._stopping.wait(delay):  # an endpoint being stopped drops it
                    complete()
            self._in_background(later, f"local-compute-{name}")
        with self._lock:
            return dict(op)

    def _error_text(self, code: str, vm: VmRecord) -> str:
        gpu = vm.accelerator[0] if vm.accelerator else vm.machine_type
        if code.startswith("ZONE_RESOURCE_POOL_EXHAUSTED"):
            return (f"The zone 'projects/{self.project}/zones/{self.zone}' does not have enough "
                    f"resources available to fulfill the request ({gpu}). Try a different "
                    "zone, or try again later.")
        if code == "QUOTA_EXCEEDED":
            return f"Quota '{gpu.upper().replace('-', '_')}_GPUS' exceeded. Limit: 0.0."
        return f"{code} (injected)"

    def _zone_url(self) -> str:
        return (f"https://www.googleapis.com/compute/v1/projects/{self.project}"
                f"/zones/{self.zone}")

    # ------------------------------------------------------------ JSON views

    def _instance_json(self, vm: VmRecord) -> dict[str, Any]:
        zone = self._zone_url()
        body: dict[str, Any] = {
            "kind": "compute#instance", "id": str(vm.id), "name": vm.name,
            "zone": zone, "status": vm.status, "machineType": f"{zone}/machineTypes/"
            f"{vm.machine_type}", "labels": dict(vm.labels),
            "labelFingerprint": vm.label_fingerprint,
            "metadata": {"kind": "compute#metadata", "fingerprint": vm.metadata_fingerprint,
                         "items": [{"key": k, "value": v} for k, v in vm.metadata.items()]},
            "scheduling": json.loads(json.dumps(vm.scheduling)),
            "selfLink": f"{zone}/instances/{vm.name}",
        }
        body["disks"] = [{
            "kind": "compute#attachedDisk", "type": "PERSISTENT", "mode": "READ_WRITE",
            "source": f"{zone}/disks/{vm.name}", "deviceName": "persistent-disk-0", "index": 0,
            "boot": True, "autoDelete": True, "diskSizeGb": str(vm.boot_disk_gb),
            "interface": "SCSI"}]
        if vm.accelerator:
            body["guestAccelerators"] = [{
                "acceleratorType": f"{zone}/acceleratorTypes/{vm.accelerator[0]}",
                "acceleratorCount": vm.accelerator[1]}]
        if vm.last_start:
            body["lastStartTimestamp"] = vm.last_start
        if vm.last_stop:
            body["lastStopTimestamp"] = vm.last_stop
        return body

    # ------------------------------------------------------------ request handling

    def _disk_json(self, d: dict[str, Any], users: list[str]) -> dict[str, Any]:
        zone = self._zone_url()
        out: dict[str, Any] = {
            "kind": "compute#disk", "id": str(d["id"]), "name": d["name"], "zone": zone,
            "sizeGb": str(d["sizeGb"]), "status": "READY",
            "type": f"{zone}/diskTypes/{d['type']}", "selfLink": f"{zone}/disks/{d['name']}",
            "labels": dict(d.get("labels") or {})}
        if users:
            out["users"] = users
        return out

    def _list_resources(self, coll: str, filter_text: str) -> dict[str, Any]:
        clauses = _parse_filter(filter_text)
        zone = self._zone_url()
        region = (f"https://www.googleapis.com/compute/v1/projects/{self.project}"
                  f"/regions/{self.region}")

        def keep(labels: Mapping[str, str]) -> bool:
            return all((labels.get(k) == v) == (op == "=") for k, op, v in clauses)
        with self._lock:
            if coll == "disks":
                boot = [self._disk_json({"name": vm.name, "sizeGb": vm.boot_disk_gb,
                                         "type": vm.boot_disk_type, "labels": {},
                                         "id": vm.id + 500000},
                                        [f"{zone}/instances/{vm.name}"])
                        for vm in self._vms.values()]
                items = [d for d in boot if keep(d["labels"])] + [
                    self._disk_json(d, []) for d in self._disks.values() if keep(d["labels"])]
                return {"kind": "compute#diskList", "id": f"projects/{self.project}/zones/"
                        f"{self.zone}/disks", "items": items, "selfLink": f"{zone}/disks"}
            addresses = [{
                "kind": "compute#address", "id": str(a["id"]), "name": a["name"],
                "address": a["address"], "addressType": "EXTERNAL", "region": region,
                "status": "IN_USE" if a["users"] else "RESERVED", "networkTier": "PREMIUM",
                "selfLink": f"{region}/addresses/{a['name']}", "labels": dict(a["labels"]),
                **({"users": list(a["users"])} if a["users"] else {}),
            } for a in self._addresses.values() if keep(a["labels"])]
            return {"kind": "compute#addressList", "id": f"projects/{self.project}/regions/"
                    f"{self.region}/addresses", "items": addresses,
                    "selfLink": f"{region}/addresses"}

    def _handle_list(self, method: str, path: str, m: re.Match[str],
                     query: dict[str, list[str]], body: Any) -> tuple[int, dict[str, Any]]:
        coll = m["coll"]
        scope, resource, method_name = LISTS[coll]
        where = self.zone if scope == "zones" else self.region
        if m["project"] != self.project or m["scope"] != scope or m["where"] != where:
            raise _HttpError(404, f"The resource '{path}' was not found")
        kind = f"{coll}.list"
        with self._lock:
            self.calls.append((method, path))
            self.call_counts[(kind, None)] += 1
        spec = self.schema.method(resource, method_name)
        if method != spec["httpMethod"]:
            raise _HttpError(404, f"The resource '{path}' was not found: {method} is not "
                                  f"served for {resource}.{method_name}")
        try:
            self.schema.check_parameters(resource, method_name, {
                "project": m["project"], scope.removesuffix("s"): m["where"]}, query)
        except RequestInvalid as e:
            raise _invalid(str(e)) from None
        if body:
            raise _invalid("Invalid JSON payload received. Unknown name "
                           f"\"{next(iter(body)) if isinstance(body, dict) else body}\": "
                           "Cannot find field.")
        injected = self.faults.take(kind, None)
        if isinstance(injected, int):
            raise _injected_http(kind, injected)
        payload = self._list_resources(coll, query.get("filter", [""])[0])
        try:
            self.schema.check_response(spec["response"]["$ref"], payload)
        except ResponseInvalid as e:
            with self._lock:
                self.invalid_responses.append(str(e))
            raise _HttpError(500, str(e)) from None
        return 200, payload

    def handle(self, method: str, path: str, query: dict[str, list[str]],
               body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        listed = _LIST_PATH.match(path)
        if listed is not None:
            return self._handle_list(method, path, listed, query, body)
        m = _PATH.match(path)
        if m is None or m["project"] != self.project or m["zone"] != self.zone:
            raise _HttpError(404, f"The resource '{path}' was not found")
        coll, name, verb = m["coll"], m["name"], m["verb"]
        if coll == "operations":
            kind = "operations.wait" if verb == "wait" else "operations.get"
        elif name is None:
            kind = "list"
        else:
            kind = verb or "get"
        target = None if coll == "operations" else name
        with self._lock:
            self.calls.append((method, path))
            self.call_counts[(kind, target)] += 1
        if kind not in METHODS or (coll == "operations" and (name is None or (
                verb not in (None, "wait")))):
            raise _HttpError(404, f"The resource '{path}' was not found")
        resource, method_name = METHODS[kind]
        spec = self.schema.method(resource, method_name)
        if method != spec["httpMethod"]:
            raise _HttpError(404, f"The resource '{path}' was not found: {method} is not "
                                  f"served for {resource}.{method_name}")
        body = self._validate_request(resource, method_name, spec, m, query, body)
        if delay := self.faults.delay(kind):
            time.sleep(delay)
        code, payload = self._answer(kind, coll, name, query, body)
        try:
            self.schema.check_response(spec["response"]["$ref"], payload)
        except ResponseInvalid as e:
            with self._lock:
                self.invalid_responses.append(str(e))
            raise _HttpError(500, str(e)) from None
        return code, payload

    def _validate_request(self, resource: str, method_name: str, spec: dict[str, Any],
                          m: re.Match[str], query: dict[str, list[str]],
                          body: Any) -> dict[str, Any]:
        """The body in its canonical form (GCE stores and echoes that), or 400 invalid."""
        path_params = {"project": m["project"], "zone": m["zone"]}
        if m["name"] is not None:
            path_params["operation" if resource == "zoneOperations" else "instance"] = m["name"]
        try:
            self.schema.check_parameters(resource, method_name, path_params, query)
            if "request" in spec:
                canonical: dict[str, Any] = self.schema.check_request(spec["request"]["$ref"],
                                                                      body)
                return canonical
            if body:
                first = next(iter(body)) if isinstance(body, dict) else body
                raise RequestInvalid(f"Invalid JSON payload received. Unknown name "
                                     f"\"{first}\": Cannot find field.")
            return {}
        except RequestInvalid as e:
            raise _invalid(str(e)) from None

    def _answer(self, kind: str, coll: str, name: str | None, query: dict[str, list[str]],
                body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if coll == "operations" and name is not None:
            return 200, self._op_call(kind, name)
        if kind == "list":
            return 200, self._list(query.get("filter", [""])[0])
        assert name is not None
        with self._lock:
            vm = self._vms.get(name)
        if vm is None:
            raise _HttpError(404, f"The resource 'projects/{self.project}/zones/{self.zone}"
                                  f"/instances/{name}' was not found")
        injected = self.faults.take(kind, name)
        if isinstance(injected, int) and not (injected == 412 and kind in ("setMetadata",
                                                                           "setLabels")):
            raise _injected_http(kind, injected)
        if kind == "get":
            with self._lock:
                return 200, self._instance_json(vm)
        return 200, self._mutate(kind, vm, body, query, injected)

    def _mutate(self, kind: str, vm: VmRecord, body: dict[str, Any],
                query: dict[str, list[str]], injected: str | int | None) -> dict[str, Any]:
        error = injected if isinstance(injected, str) and injected != DROPPED else None
        apply: Callable[[], None] | None = None
        if kind in ("setMetadata", "setLabels"):
            self._check_fingerprint(kind, vm, body, stale=injected == 412)
        with self._lock:
            action = self._refuse(kind, vm)  # refused before any fault applies
        # A start or stop takes time (none with time_scale 0: the operation answers DONE); a
        # stop of a VM already stopping ends when it is down, however long that takes.
        timed = (kind in ("start", "stop") and self.time_scale > 0) or action == "join"
        if kind == "setScheduling":
            check_scheduling(body)
        elif kind == "setLabels":
            check_labels(body.get("labels") or {})
        elif kind == "setMetadata":
            check_metadata({str(i.get("key")): str(i.get("value", ""))
                            for i in body.get("items", [])})
        if error is not None or injected == DROPPED:
            pass  # a refused or dropped call changes nothing
        elif kind == "start":
            apply = self._begin_start(vm)
        elif kind == "stop":
            apply = self._begin_stop(vm)
        elif kind in ("setMetadata", "setLabels"):
            apply = self._setter(kind, vm, body)
        elif kind == "setScheduling":
            apply = self._assign(vm, "scheduling", {k: v for k, v in body.items()
                                                    if v not in ([], {}, None)})
        return self._operation(kind, vm, apply, error, timed)

    def _check_fingerprint(self, kind: str, vm: VmRecord, body: dict[str, Any],
                           stale: bool) -> None:
        key = "fingerprint" if kind == "setMetadata" else "labelFingerprint"
        attr = "metadata_fingerprint" if kind == "setMetadata" else "label_fingerprint"
        with self._lock:
            if stale:  # another writer got there first
                setattr(vm, attr, _fingerprint())
            if body.get(key) != getattr(vm, attr):
                raise _HttpError(412, "Supplied fingerprint does not match current "
                                      f"{'metadata' if kind == 'setMetadata' else 'label'} "
                                      "fingerprint.", "conditionNotMet")

    def _setter(self, kind: str, vm: VmRecord, body: dict[str, Any]) -> Callable[[], None]:
        if kind == "setMetadata":
            items = {str(i["key"]): str(i.get("value", "")) for i in body.get("items", [])}
            with self._lock:  # the fingerprint changes with the request, as in GCE
                vm.metadata_fingerprint = _fingerprint()
            return self._assign(vm, "metadata", items)
        labels = {str(k): str(v) for k, v in (body.get("labels") or {}).items()}
        with self._lock:
            vm.label_fingerprint = _fingerprint()
        return self._assign(vm, "labels", labels)

    def _assign(self, vm: VmRecord, attr: str, value: Any) -> Callable[[], None]:
        def apply() -> None:
            with self._lock:  # replaced whole, so a reader never sees a half-written dict
                setattr(vm, attr, value)
        return apply

    def _list(self, filter_text: str) -> dict[str, Any]:
        clauses = _parse_filter(filter_text)
        with self._lock:
            items = [self._instance_json(vm) for vm in self._vms.values()
                     if all((vm.labels.get(k) == v) == (op == "=") for k, op, v in clauses)]
        return {"kind": "compute#instanceList", "id": f"projects/{self.project}/zones/"
                f"{self.zone}/instances", "items": items,
                "selfLink": f"{self._zone_url()}/instances"}

    def _op_call(self, kind: str, name: str) -> dict[str, Any]:
        injected = self.faults.take(kind, None)
        if isinstance(injected, int):
            raise _injected_http(kind, injected)
        cap = time.monotonic() + self.wait_cap_seconds
        with self._lock:
            op = self._ops.get(name)
            if op is None:
                raise _HttpError(404, f"The resource 'projects/{self.project}/zones/"
                                      f"{self.zone}/operations/{name}' was not found")
            while (kind == "operations.wait" and op["status"] != "DONE"
                   and not self._stopping.is_set() and time.monotonic() < cap):
                self._lock.wait(timeout=min(0.1, max(0.0, cap - time.monotonic())))
            return dict(op)


def _injected_http(kind: str, code: int) -> _HttpError:
    if code == 429:  # how GCE words an API rate limit: it says "quota", yet it is transient
        return _HttpError(429, "Quota exceeded for quota metric 'Queries' and limit 'Queries "
                               "per minute' of service 'compute.googleapis.com'")
    return _HttpError(code, f"{kind} failed (injected HTTP {code})")


def _parse_filter(text: str) -> list[tuple[str, str, str]]:
    """`labels.KEY = "VALUE"` clauses joined by AND: the filter ComputeFleet sends."""
    clauses: list[tuple[str, str, str]] = []
    pos = 0
    while pos < len(text):
        m = _CLAUSE.match(text, pos)
        if m is None or (not clauses and text[pos:].lstrip().startswith("AND")):
            raise _HttpError(400, f"Invalid value for field 'filter': {text!r} (the local "
                                  "endpoint serves labels.KEY = \"VALUE\" joined by AND)")
        value = m["quoted"] if m["quoted"] is not None else m["bare"]
        clauses.append((m["key"], m["op"], value))
        pos = m.end()
    return clauses


class _Handler(BaseHTTPRequestHandler):
    compute: LocalCompute
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers, adding ~40 ms to every call on a kept-alive connection.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # the http.server naming
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        try:
            try:
                body = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                raise _HttpError(400, "Invalid JSON payload received.") from None
            code, payload = self.compute.handle(method, url.path, parse_qs(url.query), body)
        except _HttpError as e:
            code, payload = e.code, e.body()
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # every call is in LocalCompute.calls; access lines would only be noise
