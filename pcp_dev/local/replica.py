"""The local replica: the whole cloud side of one stack on 127.0.0.1, wired as Pulumi wires it.

Real parts: the Pub/Sub emulator, fake-gcs-server (notifying `markers/` into
`pcp-<stack>-markers`), the five functions served by the real functions-framework behind push
subscriptions, the node agents and the reference trainer. Stood in for: Eventarc (push
subscriptions), Cloud Scheduler (`Ticker`), Compute Engine (`LocalCompute`, whose VMs are
worker agent processes) and the GCE metadata server (`MetadataServer`, one per VM).

Every process started here runs in its own session with its output in a log file under
`<state_dir>/logs/<stack>/`, carries `PCP_REPLICA_TOKEN` in its environment, and is stopped
on exit, Ctrl-C, SIGTERM and error, together with anything it started (the trainer runs in a
session of its own, so it is found through the process table, not the process group).

`up()` / `down()` keep a replica running in the background for `pcp local up` / `down`; the
CLI finds it through `<state_dir>/<stack>.json`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import pcp
from pcp.cli.supervisor import process_start
from pcp.core.names import (
    LABEL_NODE,
    LABEL_ROLE,
    LABEL_STACK,
    META_BUCKET,
    META_PROJECT,
    META_STACK,
    POLICY_DOC,
    Names,
)
from pcp.core.policy import STACK_SIZES, Policy
from pcp.logs import log
from pcp.settings import Settings
from pcp_dev import REFERENCE_BINARY
from pcp_dev.local.compute import LocalCompute, VmRecord
from pcp_dev.local.emulators import (
    EmulatorMissing,
    FakeGcs,
    PubSubEmulator,
    ensure_subscription,
    ensure_topic,
    fake_gcs_binary,
    free_port,
    java_binary,
    publisher,
    pubsub_jar,
    storage_client,
    subscriber,
)
from pcp_dev.local.gcs_proxy import GcsProxy
from pcp_dev.local.metadata import MetadataServer
from pcp_dev.local.processes import (
    TOKEN_ENV,
    Child,
    _http_answers,
    _kill,
    record,
    token_pids,
)
from pcp_dev.local.secrets import SecretManagerStandIn
from pcp_dev.local.ticker import Ticker

if TYPE_CHECKING:
    from pcp.adapters.gcs_store import GcsStore

TOPICS = ("start", "stop", "sweep", "shepherd", "markers", "dead-letter", "budget")
# function kind -> (entry point, topic that triggers it), as the Pulumi program deploys them
# (the budget's only for a stack with pcp:billing_account: the replica always has one)
FUNCTIONS = {"start": ("on_start", "start"), "stop": ("on_stop", "stop"),
             "marker": ("on_marker", "markers"), "sweep": ("on_sweep", "sweep"),
             "budget": ("on_budget", "budget")}
#: The replica's stand-in Cloud Billing budget: what its notifications name (no Cloud Billing
#: runs here: a test publishes notifications in the documented format to pcp-<stack>-budget).
LOCAL_BUDGET_ID = "pcp-local-budget"
LOCAL_BILLING_ACCOUNT = "000000-000000-000000"
# The stacks' worker prices (infra/Pulumi.<stack>.yaml), so the demo's cost estimate is real.
WORKER_HOURLY_USD = {"tiny": 0.54, "small": 0.73, "large": 0.85, "huge": 0.85}


@dataclass(frozen=True)
class Options:
    """A replica's settings; the defaults suit `make demo` and `pcp local up`."""

    stack: str = "tiny"
    state_dir: Path = Path(".pcp-local")
    project: str = "pcp-local"
    zone: str = "local-a"
    workers: int | None = None  # default: the stack's size
    sweep_interval: float = 5.0  # seconds between sweep ticks
    boot_timeout_minutes: float = 2.0
    keep_alive_hours: float = 0.25
    max_run_hours: float = 1.0
    binary: str = REFERENCE_BINARY
    agent_interval: float = 1.0  # the agents' upload and poll intervals, seconds
    grace: float = 5.0  # the agents' SIGTERM -> SIGKILL for the binary (--grace)
    # A VM stop: SIGTERM to the agent, SIGKILL this long after (the guest's soft-off window:
    # 120 s on a Standard VM, 30 s on a Spot one). Default: `grace`, plus 3 s for the agent
    # to upload its logs and write done once the binary is gone.
    soft_off_seconds: float | None = None
    # Cloud Storage's per-object mutation limit, held by a proxy in front of fake-gcs-server;
    # None turns it off (for debugging only: the cloud has it).
    gcs_mutation_interval: float | None = 1.0
    # Compute Engine's timed transitions (a boot's ~30 s of PROVISIONING and STAGING, a
    # guest's shutdown) take this fraction of their real time: 0.01 makes a boot 0.3 s.
    compute_time_scale: float = 0.01
    extra_env: Mapping[str, str] = field(default_factory=dict)  # for the functions
    # Worker "VMs" get the stand-in nvidia-smi (pcp_dev/local/nvidia_smi.py) on their PATH,
    # reporting what `set_gpus` says (one idle GPU until then); False: no nvidia-smi at all.
    nvidia_smi: bool = True
    gpu_minute_seconds: float = 60.0  # one minute of a gpu_idle policy, for the agents
    # How long after a notice Compute Engine stops the VM: about 30 s for a Spot preemption;
    # a GPU VM's maintenance notice comes up to an hour ahead (shortened here).
    preempt_notice_seconds: float = 30.0
    maintenance_notice_seconds: float = 60.0
    max_cost_usd: float | None = None  # the stack's default cap (pcp:max_cost_usd)
    budget_stop_threshold: float = 1.0
    # For runs that name an OCI image: the agents' --container-engine (None: docker if
    # installed, else podman) and what the engine needs in its environment (CONTAINERS_CONF).
    container_engine: str | None = None
    agent_extra_env: Mapping[str, str] = field(default_factory=dict)
    # Keep the bucket on disk (<state_dir>/gcs/<stack>/, fake-gcs-server's filesystem
    # backend), so run history survives a restart; off: memory, gone when the replica stops.
    keep_bucket: bool = False

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers is not None else STACK_SIZES[self.stack]

    @property
    def bucket(self) -> str:
        return Names(self.stack, self.project).bucket


#: What the replica's own processes import (module, package to install), beyond the CLI:
#: the function servers, the agents and the reference trainer.
PYTHON_NEEDS = (("functions_framework", "functions-framework"), ("cloudevents", "cloudevents"),
                ("google.cloud.compute_v1", "google-cloud-compute"),
                ("google.cloud.pubsub_v1", "google-cloud-pubsub"),
                ("google.cloud.storage", "google-cloud-storage"),
                ("googleapiclient", "google-api-python-client"), ("numpy", "numpy"))


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def bucket_dir(state_dir: Path, stack: str) -> Path:
    """Where a kept bucket lives (fake-gcs-server's filesystem root)."""
    return Path(state_dir) / "gcs" / stack


def check_prerequisites() -> None:
    """Name every missing emulator or runtime at once, with how to install it."""
    missing = []
    absent = [name for module, name in PYTHON_NEEDS if not _importable(module)]
    if absent:
        missing.append(f"the Python packages {', '.join(absent)} (pip install '.[demo]' in "
                       "the checkout, or `make demo`)")
    for check in (java_binary, pubsub_jar, fake_gcs_binary):
        try:
            check()
        except EmulatorMissing as e:
            missing.append(str(e))
    if missing:
        raise EmulatorMissing("the local replica needs: " + "; ".join(missing))


def functions_source() -> Path:
    """functions/main.py of this checkout (the replica serves the very file that is deployed)."""
    source = Path(pcp.__file__).resolve().parent.parent / "functions" / "main.py"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: the local replica runs from a checkout "
                                "of the repository (pip install -e .)")
    return source


# ---------------------------------------------------------------- the replica


def o_stack_safe(stack: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stack)


class Replica:
    """The stack's cloud on loopback. Use as a context manager, or start() / stop()."""

    def __init__(self, options: Options | None = None, **kwargs: Any) -> None:
        self.options = options or Options(**kwargs)
        o = self.options
        if o.stack not in STACK_SIZES and o.workers is None:
            raise ValueError(f"unknown stack {o.stack!r}: use one of {', '.join(STACK_SIZES)}")
        self.token = uuid.uuid4().hex
        self.state_dir = Path(o.state_dir).resolve()
        self.log_dir = self.state_dir / "logs" / o.stack
        self.node_dir = self.state_dir / "nodes" / o.stack
        self.bucket_dir = bucket_dir(self.state_dir, o.stack)
        self.tcp_port = free_port()
        self.vms = tuple(Names(o.stack).worker_vm(i) for i in range(o.worker_count))
        self.hold_boot: set[str] = set()  # VMs that come up but whose agent never starts
        self.pubsub: PubSubEmulator | None = None
        self.gcs: FakeGcs | None = None
        self.gcs_proxy: GcsProxy | None = None
        self.compute: LocalCompute | None = None
        self.metadata: dict[str, MetadataServer] = {}
        self.secrets: SecretManagerStandIn | None = None
        self.functions: dict[str, Child] = {}
        self.function_ports = {kind: free_port() for kind in FUNCTIONS}
        self.shepherd: Child | None = None
        self.workers: dict[str, Child] = {}
        self.ticker: Ticker | None = None
        self.started_at: datetime | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._publisher: Any = None
        self._runtime: Path | None = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> Replica:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> Replica:
        check_prerequisites()
        source = functions_source()
        atexit.register(self.stop)
        try:
            self._start(source)
        except BaseException:
            self.stop()
            raise
        self.started_at = datetime.now(UTC)
        log("INFO", "replica.up", stack=self.options.stack,
            reason=f"local replica of stack {self.options.stack} is up",
            endpoints={k: v for k, v in self.info().items() if k != "stack"})
        return self

    def _start(self, source: Path) -> None:
        o = self.options
        self.log_dir.mkdir(parents=True, exist_ok=True)
        token = {TOKEN_ENV: self.token}  # so `pcp local down` finds them if we cannot
        self.pubsub = PubSubEmulator(o.project, env=token).start()
        host = self.pubsub.host
        for kind in TOPICS:
            ensure_topic(host, o.project, self.topic(kind))
        ensure_subscription(host, o.project, Names(o.stack).shepherd_subscription,
                            self.topic("shepherd"))
        root = None
        if o.keep_bucket:
            root = self.bucket_dir
            root.mkdir(parents=True, exist_ok=True)
        self.gcs = FakeGcs(notify_project=o.project, notify_topic=self.topic("markers"),
                           notify_prefix="markers/", pubsub_host=host, env=token,
                           root=root).start()
        self.gcs_proxy = GcsProxy(self.gcs.endpoint, o.gcs_mutation_interval).start()
        client = storage_client(self.storage_endpoint, o.project)
        if client.lookup_bucket(o.bucket) is None:  # kept from the last `pcp local up`
            client.create_bucket(o.bucket)
        # What the Pulumi program writes at deploy time: the limits `pcp run` previews with.
        self.store().put(POLICY_DOC, self.policy().to_doc(), content_type="application/json")
        self.compute = LocalCompute(o.project, o.zone, on_start=self._vm_started,
                                    on_stop=self._vm_stopping,
                                    time_scale=o.compute_time_scale).start()
        for i, vm in enumerate(self.vms):
            self.compute.add_instance(
                vm, labels={LABEL_STACK: o.stack, LABEL_ROLE: "worker", LABEL_NODE: str(i)},
                metadata={META_STACK: o.stack, META_BUCKET: o.bucket, META_PROJECT: o.project})
            self.metadata[vm] = MetadataServer(self._lookup(vm), vm,
                                               on_notice=self._notice_hook(vm)).start()
        # The stack's wandb key secret, as the Pulumi program makes it (empty), readable by the
        # workers' tokens; a key in <state dir>/wandb-api-key becomes its version, and the
        # shepherd (no metadata server) reads that file.
        self.secrets = SecretManagerStandIn(o.project).start()
        self.secrets.create(Names(o.stack).wandb_secret)
        self.secrets.tokens.update(m.token for m in self.metadata.values())
        if self.wandb_key_file.is_file():
            self.secrets.add_version(Names(o.stack).wandb_secret,
                                     self.wandb_key_file.read_bytes().strip())
        for kind in FUNCTIONS:
            self.start_function(kind, source, wait=False)
        for kind in FUNCTIONS:
            self._wait_function(kind)
        for kind, (_, topic) in FUNCTIONS.items():
            ensure_subscription(host, o.project, f"{Names(o.stack).topic(kind)}-trigger",
                                self.topic(topic), push_endpoint=self.push_endpoint(kind))
        self.shepherd = Child("shepherd", self._agent_argv("shepherd", "shepherd") + [
            "--stack", o.stack, "--project", o.project, "--bucket", o.bucket,
            "--wandb-key-file", str(self.wandb_key_file)],
            self._agent_env(), self.log_dir / "shepherd.log").start()
        self.ticker = Ticker(lambda data: self.publish("sweep", data), o.sweep_interval,
                             stack=o.stack).start()

    def stop(self) -> None:
        """Stop everything, newest first. Idempotent; safe from atexit and signal handlers."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        atexit.unregister(self.stop)
        # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short.
        masked = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in masked} if main else {}
        try:
            self._stop()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _stop(self) -> None:
        grace = self.options.grace
        steps: list[tuple[str, Any]] = []
        if self.ticker is not None:
            steps.append(("ticker", self.ticker.stop))
        workers = list(self.workers.values())
        steps.append(("workers", lambda: self._stop_all(workers, grace)))
        if self.shepherd is not None:
            shepherd = self.shepherd
            steps.append(("shepherd", lambda: shepherd.stop(grace)))
        functions = list(self.functions.values())
        # A function holds no state worth a graceful exit: what it did not finish is redone.
        steps.append(("functions", lambda: self._stop_all(functions, min(grace, 1.0))))
        if self.compute is not None:
            steps.append(("compute", self.compute.stop))
        for server in self.metadata.values():
            steps.append(("metadata", server.stop))
        if self.secrets is not None:
            steps.append(("secret-manager", self.secrets.stop))
        if self.gcs_proxy is not None:
            steps.append(("gcs-proxy", self.gcs_proxy.stop))
        if self.gcs is not None:
            steps.append(("fake-gcs-server", self.gcs.stop))
        if self.pubsub is not None:
            steps.append(("pubsub-emulator", self.pubsub.stop))
        for name, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - one failure must not leave the rest running
                log("ERROR", "replica.stop", stack=self.options.stack,
                    reason=f"stopping {name}: {type(e).__name__}: {e}")
        for pid in token_pids(self.token):  # anything that slipped through, e.g. a trainer
            _kill(pid, signal.SIGKILL, group=False)
        if self._publisher is not None:
            self._publisher.transport.close()
        if self._runtime is not None:
            shutil.rmtree(self._runtime, ignore_errors=True)

    @staticmethod
    def _stop_all(children: list[Child], grace: float) -> None:
        threads = [threading.Thread(target=c.stop, args=(grace,), daemon=True) for c in children]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    # ------------------------------------------------------------ names and clients

    def topic(self, kind: str) -> str:
        return Names(self.options.stack).topic(kind)

    @property
    def storage_endpoint(self) -> str:
        """Where every client reaches Cloud Storage: the limiting proxy's address."""
        assert self.gcs_proxy is not None, "the replica is not started"
        return self.gcs_proxy.endpoint

    def function_url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.function_ports[kind]}/"

    def push_endpoint(self, kind: str) -> str:
        """Where function `kind`'s trigger pushes: its URL, then the topic's resource path.

        functions-framework turns a push body into a CloudEvent whose source names the topic
        in the path, the source Eventarc sets in production, so the functions' check that an
        event came from their own stack's topic holds here unchanged.
        """
        topic = self.topic(FUNCTIONS[kind][1])
        return f"{self.function_url(kind)}projects/{self.options.project}/topics/{topic}"

    def publish(self, kind: str, data: bytes, attributes: Mapping[str, str] | None = None
                ) -> str:
        """Publish to `pcp-<stack>-<kind>` as `pcp run` / Cloud Scheduler would."""
        from pcp.adapters.pubsub_bus import PubSubBus

        assert self.pubsub is not None, "the replica is not started"
        with self._lock:
            if self._publisher is None:
                self._publisher = publisher(self.pubsub.host)
        bus = PubSubBus(self.options.project, self.options.stack, publisher=self._publisher)
        return bus.publish(kind, data, attributes)

    def publish_budget(self, cost: float, budget: float, period: str | None = None,
                       budget_id: str = LOCAL_BUDGET_ID, **extra: object) -> str:
        """Publish a budget notification as Cloud Billing does (schemaVersion 1.0); the
        period defaults to this month's (budgets start at midnight US Pacific time)."""
        if period is None:
            today = datetime.now(UTC)
            period = f"{today:%Y-%m}-01T08:00:00Z"
        body = {"budgetDisplayName": f"pcp-{self.options.stack} monthly budget",
                "costAmount": cost, "costIntervalStart": period, "budgetAmount": budget,
                "budgetAmountType": "SPECIFIED_AMOUNT", "currencyCode": "USD", **extra}
        return self.publish("budget", json.dumps(body).encode(), {
            "billingAccountId": LOCAL_BILLING_ACCOUNT, "budgetId": budget_id,
            "schemaVersion": "1.0"})

    def store(self) -> GcsStore:
        """A GcsStore on the stack bucket (the BlobStore port), for tests and the demo."""
        from pcp.adapters.gcs_store import GcsStore

        assert self.gcs is not None, "the replica is not started"
        client = storage_client(self.storage_endpoint, self.options.project)
        return GcsStore(self.options.bucket, client=client, project=self.options.project)

    def info(self) -> dict[str, Any]:
        """What `.pcp-local/<stack>.json` holds: how the CLI reaches this replica."""
        o = self.options
        return {
            "stack": o.stack, "project": o.project, "bucket": o.bucket, "zone": o.zone,
            "region": o.zone.rsplit("-", 1)[0],
            "storage_endpoint": self.storage_endpoint if self.gcs_proxy else None,
            "pubsub_host": self.pubsub.host if self.pubsub else None,
            "compute_endpoint": self.compute.endpoint if self.compute else None,
            "functions": {k: self.function_url(k) for k in FUNCTIONS},
            "shepherd_host": "127.0.0.1", "tcp_port": self.tcp_port,
            "worker_vms": list(self.vms), "sweep_interval_s": o.sweep_interval,
            "metadata_hosts": {vm: m.host for vm, m in self.metadata.items()},
            "logs": str(self.log_dir), "pid": os.getpid(), "token": self.token,
            "pid_start": process_start(os.getpid()),
            "started_at": self.started_at.isoformat() if self.started_at else None,
            "processes": self.processes(),
        }

    def processes(self) -> list[dict[str, Any]]:
        """Every process the replica started and that runs now, as `pcp local down` needs
        them to stop each (with what it started) after the replica itself was killed."""
        with self._lock:
            children = [*self.functions.values(), *self.workers.values()]
        if self.shepherd is not None:
            children.append(self.shepherd)
        found = [record(name, server.pid) for name, server in
                 (("pubsub-emulator", self.pubsub), ("fake-gcs-server", self.gcs))
                 if server is not None]
        found += [record(c.name, c.pid) for c in children if c.running]
        return [r for r in found if r is not None]

    # ------------------------------------------------------------ functions

    def policy(self) -> Policy:
        """The stack's Policy, as the functions run with it."""
        o = self.options
        return Policy(
            stack=o.stack, worker_count=o.worker_count, shepherd_host="127.0.0.1",
            tcp_port=self.tcp_port, max_run_hours=o.max_run_hours,
            boot_timeout_minutes=o.boot_timeout_minutes, keep_alive_hours=o.keep_alive_hours,
            sweep_interval_minutes=o.sweep_interval / 60.0, default_binary=o.binary,
            worker_hourly_usd=WORKER_HOURLY_USD.get(o.stack, 0.0), max_cost_usd=o.max_cost_usd,
            budget_id=LOCAL_BUDGET_ID, billing_account=LOCAL_BILLING_ACCOUNT,
            budget_stop_threshold=o.budget_stop_threshold)

    def function_env(self) -> dict[str, str]:
        """The functions' settings, as the Pulumi program sets them, plus the emulators."""
        o = self.options
        assert self.pubsub is not None and self.gcs is not None and self.compute is not None
        env = self._base_env()
        policy = self.policy()
        env.update(Settings(stack=o.stack, project=o.project, zone=o.zone, bucket=o.bucket,
                            policy=policy, compute_endpoint=self.compute.endpoint).to_env())
        env.update({
            "STORAGE_EMULATOR_HOST": self.storage_endpoint,
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,
            "GOOGLE_CLOUD_PROJECT": o.project,
        })
        env.update(o.extra_env)
        return env

    def start_function(self, kind: str, source: Path | None = None, wait: bool = True) -> Child:
        """Serve one entry point with the real functions-framework, on its fixed port."""
        target, _ = FUNCTIONS[kind]
        argv = [sys.executable, "-m", "functions_framework", "--target", target,
                "--source", str(source or functions_source()), "--signature-type", "cloudevent",
                "--host", "127.0.0.1", "--port", str(self.function_ports[kind])]
        env = self.function_env()
        # gunicorn >= 25 puts a control socket in $XDG_RUNTIME_DIR, else one shared path in
        # $HOME; a directory per server keeps four servers (and other users) apart.
        env["XDG_RUNTIME_DIR"] = str(self._runtime_dir(f"function-{kind}"))
        child = Child(f"function-{kind}", argv, env,
                      self.log_dir / f"function-{kind}.log").start()
        self.functions[kind] = child
        if wait:
            self._wait_function(kind)
        return child

    def _runtime_dir(self, name: str) -> Path:
        """A short private directory (a Unix socket path must stay under ~100 bytes)."""
        with self._lock:
            if self._runtime is None:
                self._runtime = Path(tempfile.mkdtemp(prefix="pcp-replica-"))
        path = self._runtime / name
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _wait_function(self, kind: str, timeout: float = 60.0) -> None:
        child = self.functions[kind]
        deadline = time.monotonic() + timeout
        while not _http_answers(self.function_url(kind)):
            if not child.running:
                code = child.proc.returncode if child.proc else None
                raise RuntimeError(f"function {kind} exited with code {code} before serving; "
                                   f"see {child.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"function {kind} not serving after {timeout:.0f} s; "
                                   f"see {child.log_path}")
            time.sleep(0.05)

    def heal(self) -> list[str]:
        """Restart a function server or the shepherd daemon that died on its own (a
        long-lived `pcp local up` should outlive one crash). Returns what was restarted."""
        restarted = []
        for kind, child in list(self.functions.items()):
            if not child.running and not child.expected_exit and not self._stopping:
                self.start_function(kind)
                restarted.append(f"function-{kind}")
        shepherd = self.shepherd
        if shepherd is not None and not shepherd.running and not self._stopping:
            shepherd.expected_exit = False
            self.shepherd = Child(shepherd.name, shepherd.argv, shepherd.env,
                                  shepherd.log_path).start()
            restarted.append("shepherd")
        for name in restarted:
            log("WARNING", "replica.heal", stack=self.options.stack,
                reason=f"{name} had exited; restarted it")
        return restarted

    def drop_backlog(self, kind: str) -> None:
        """Lose every event waiting for function `kind` (as when a trigger gives up): the
        push subscription is deleted and created again, empty. Only the sweeper can then
        notice what those events would have said."""
        o = self.options
        assert self.pubsub is not None
        client = subscriber(self.pubsub.host)
        try:
            client.delete_subscription(subscription=client.subscription_path(
                o.project, f"{Names(o.stack).topic(kind)}-trigger"))
        finally:
            client.close()
        ensure_subscription(self.pubsub.host, o.project, f"{Names(o.stack).topic(kind)}-trigger",
                            self.topic(FUNCTIONS[kind][1]), push_endpoint=self.push_endpoint(kind))

    def kill_function(self, kind: str) -> None:
        """Crash one function server (SIGKILL): its pushes fail until it is restarted."""
        self.functions[kind].kill()

    def restart_function(self, kind: str) -> Child:
        self.functions[kind].stop(self.options.grace)
        return self.start_function(kind)

    # ------------------------------------------------------------ VMs as processes

    def gpu_state(self, vm: str) -> Path:
        return self.state_dir / "gpus" / o_stack_safe(self.options.stack) / vm

    def set_gpus(self, vm: str, gpus: list[tuple[Any, Any]], mode: str = "ok") -> None:
        """What the VM's stand-in nvidia-smi reports from now on: (utilization %, memory
        MiB) per GPU, None for `[N/A]`; `mode` "no-devices" or "no-driver" for its failures."""
        from pcp_dev.local.nvidia_smi import write_state

        write_state(self.gpu_state(vm), gpus, mode)

    def maintenance(self, vm: str, value: str = "TERMINATE_ON_HOST_MAINTENANCE") -> None:
        """A host-maintenance notice on the VM: Compute Engine then stops it after
        `maintenance_notice_seconds` (unless it was stopped and booted again meanwhile)."""
        self.metadata[vm].notify("maintenance-event", value)

    def preempt(self, vm: str) -> None:
        """A Spot preemption: instance/preempted is TRUE; the VM stops after
        `preempt_notice_seconds`."""
        self.metadata[vm].notify("preempted", "TRUE")

    def _notice_hook(self, vm: str) -> Any:
        def on_notice(key: str, value: str) -> None:
            delay = {"TERMINATE_ON_HOST_MAINTENANCE": self.options.maintenance_notice_seconds,
                     "TRUE": self.options.preempt_notice_seconds}.get(value)
            compute = self.compute
            if delay is None or compute is None:
                return
            boot = compute.vm(vm).starts
            log("NOTICE", "replica.notice", stack=self.options.stack,
                reason=f"{vm}: instance/{key} is {value}; the VM stops in {delay:g} s")

            def later() -> None:
                time.sleep(delay)
                if not self._stopping:
                    compute.host_stop(vm, boot, f"instance/{key} was {value}")
            threading.Thread(target=later, daemon=True, name=f"notice-{vm}").start()
        return on_notice

    def _lookup(self, vm: str) -> Any:
        def attributes() -> dict[str, str]:
            assert self.compute is not None
            return self.compute.metadata_of(vm)
        return attributes

    def _base_env(self) -> dict[str, str]:
        drop = ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "GCE_METADATA_HOST",
                "GOOGLE_APPLICATION_CREDENTIALS", "PCP_COMPUTE_ENDPOINT")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PCP_")}
        env.update({TOKEN_ENV: self.token, "PYTHONUNBUFFERED": "1", "NO_GCE_CHECK": "True"})
        return env

    def _agent_env(self, metadata_host: str | None = None) -> dict[str, str]:
        assert self.pubsub is not None and self.gcs is not None
        env = self._base_env()
        env.update({"STORAGE_EMULATOR_HOST": self.storage_endpoint,
                    "PUBSUB_EMULATOR_HOST": self.pubsub.host,
                    "GOOGLE_CLOUD_PROJECT": self.options.project,
                    # the reference trainer listens on loopback only, never on every interface
                    "PCP_TRAINER_HOST": "127.0.0.1"})
        env.update(self.options.agent_extra_env)
        if metadata_host is not None:
            env["GCE_METADATA_HOST"] = metadata_host
        if self.secrets is not None:
            env["PCP_SECRETMANAGER_ENDPOINT"] = self.secrets.endpoint
        return env

    @property
    def wandb_key_file(self) -> Path:
        """A wandb API key for the replica's runs, if a person put one there."""
        return self.state_dir / "wandb-api-key"

    def _agent_argv(self, role: str, node: str) -> list[str]:
        o = self.options
        interval = str(o.agent_interval)
        engine = ["--container-engine", o.container_engine] if o.container_engine else []
        return [sys.executable, "-m", "pcp.agent", role, "--work-dir",
                str(self.node_dir / node), "--grace", str(o.grace), "--upload-interval",
                interval, "--poll-interval", interval, "--output-interval", "0",
                "--gpu-interval", interval, "--gpu-minute-seconds", str(o.gpu_minute_seconds),
                *engine]

    def _vm_started(self, vm: VmRecord) -> None:
        """LocalCompute's on_start: the VM booted, so its agent starts (unless held back)."""
        if vm.name in self.hold_boot:
            log("NOTICE", "replica.vm_held", stack=self.options.stack,
                reason=f"{vm.name} is RUNNING but its agent is held back (never boots)")
            return
        with self._lock:
            if self._stopping:
                return
            old = self.workers.get(vm.name)
        if old is not None and old.running:
            old.stop(self.soft_off)
        argv = self._agent_argv("worker", vm.name) + ["--poweroff-command", "",
                                                      "--boot-grace", "10"]
        self.metadata[vm.name].reset()  # a new boot: no notice pending
        env = self._agent_env(self.metadata[vm.name].host)
        if self.options.nvidia_smi:
            from pcp_dev.local.nvidia_smi import install

            state = self.gpu_state(vm.name)
            bin_dir = install(self.state_dir / "gpus" / o_stack_safe(self.options.stack)
                              / f"{vm.name}-bin", state)
            env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        child = Child(vm.name, argv, env, self.log_dir / f"{vm.name}.log").start()
        with self._lock:
            self.workers[vm.name] = child
        threading.Thread(target=self._watch, args=(vm.name, child), daemon=True,
                         name=f"watch-{vm.name}").start()

    def _watch(self, name: str, child: Child) -> None:
        """The agent exited by itself: its power-off command is 'just exit', so power off."""
        assert child.proc is not None
        child.proc.wait()
        with self._lock:
            current = self.workers.get(name) is child and not self._stopping
        if current and not child.expected_exit and self.compute is not None:
            log("INFO", "replica.vm_power_off", stack=self.options.stack,
                reason=f"{name}: agent exited with code {child.proc.returncode}; VM powered off")
            self.compute.power_off(name)

    @property
    def soft_off(self) -> float:
        """Seconds from a VM stop's SIGTERM to the agent to its SIGKILL."""
        o = self.options
        return o.soft_off_seconds if o.soft_off_seconds is not None else o.grace + 3.0

    def _vm_stopping(self, vm: VmRecord) -> None:
        """LocalCompute's on_stop: an ACPI shutdown, SIGTERM to the agent, SIGKILL after the
        soft-off window."""
        with self._lock:
            child = self.workers.get(vm.name)
        if child is not None and child.running:
            child.stop(self.soft_off)
