"""What every `pcp` command works over: the stack's store and bus, built from resolved names.

Commands see only the ports (`BlobStore`, `Bus`), so tests hand in the in-memory twins and
the same code runs against the emulators or Google Cloud. Clients are built on first use:
`pcp doctor` must be able to report missing credentials as a failed check instead of
failing while it is being set up.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pcp.cli.config import Config, ConfigError, local_dir, read_local_state
from pcp.core.names import Names
from pcp.core.ports import BlobStore, Bus


class ReplicaDown(Exception):
    """The local replica's state file names endpoints nobody answers at."""


#: Bounds on the CLI's bucket reads: each request gets this many seconds to connect and to
#: answer (Cloud Storage answers a small read in well under one), and a command retries a
#: failed read for at most READ_RETRY_S (the library's defaults are 60 s and 120 s: a dead
#: backend froze `pcp run --wait` for two minutes). A wait does not retry inside a read at
#: all: its own loop retries, and says what it cannot reach meanwhile.
READ_TIMEOUT_S = 5.0
READ_RETRY_S = 20.0


def unreachable(e: BaseException) -> bool:
    """Whether `e` says the backend did not answer (a timeout, a refused or reset
    connection, a 5xx or 429, an exhausted retry), as opposed to a bug or a refusal."""
    if isinstance(e, ReplicaDown):
        return False  # its own one-line error, at once
    if isinstance(e, ConnectionError | TimeoutError | socket.timeout):
        return True
    module = type(e).__module__
    if module.startswith(("requests", "urllib3")):
        return True
    try:
        from google.api_core import exceptions as api
        from google.auth.exceptions import TransportError
    except ImportError:  # pragma: no cover - the CLI ships with both
        return False
    return isinstance(e, api.ServerError | api.TooManyRequests | api.RetryError
                      | api.DeadlineExceeded | TransportError)


NO_CREDENTIALS = ("no Google Cloud credentials: run `gcloud auth application-default login` "
                  "or set GOOGLE_APPLICATION_CREDENTIALS")


def describe_credential_file(path: str) -> str:
    """What kind of credential a GOOGLE_APPLICATION_CREDENTIALS file holds (its `type`), in
    words, without using it: a service account key, or a workload identity federation
    configuration (`external_account`) and where its token comes from."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except PermissionError:
        return f"{path} (not readable by this user: run with sudo to see what it holds)"
    except (OSError, ValueError) as e:
        return f"{path} (unreadable: {type(e).__name__})"
    if not isinstance(info, dict):
        return f"{path} (not a credential file)"
    kind = info.get("type")
    if kind == "service_account":
        return (f"a service-account key file ({path}, {info.get('client_email', '?')}); "
                "organisations created since 2024 forbid new keys by default "
                "(iam.disableServiceAccountKeyCreation): workload identity federation needs "
                "none (docs/agent.md)")
    if kind == "external_account":
        source = info.get("credential_source") or {}
        origin = ("an X.509 certificate" if "certificate" in source else
                  "an executable" if "executable" in source else
                  "AWS" if "environment_id" in source else
                  "a URL" if "url" in source else
                  "a file" if "file" in source else "an unknown source")
        url = str(info.get("service_account_impersonation_url") or "")
        account = url.rsplit("/", 1)[-1].removesuffix(":generateAccessToken") if url else ""
        acting = f", acting as {account}" if account else ""
        return (f"workload identity federation ({path}: external_account, token from "
                f"{origin}{acting}); no service-account key")
    if kind == "authorized_user":
        return f"user credentials ({path}, from `gcloud auth application-default login`)"
    if kind == "impersonated_service_account":
        return f"service account impersonation ({path})"
    return f"{path} (credentials of type {kind!r})"


def utcnow() -> datetime:
    return datetime.now(UTC)


def requested_by(env: Mapping[str, str] | None = None) -> str:
    """Who asks: the GitHub actor in a workflow, else the local user name."""
    env = os.environ if env is None else env
    if env.get("GITHUB_ACTOR"):
        return env["GITHUB_ACTOR"]
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        return "unknown"


class Context:
    """The stack's ports plus what a few commands need (scheduler, topic checks, clock).

    Pass ready objects (tests, or anything wired by hand); `for_config` wires Google Cloud or
    the local replica's emulators lazily.
    """

    def __init__(self, stack: str, *, store: BlobStore | None = None, bus: Bus | None = None,
                 config: Config | None = None, scheduler: Any = None, publisher: Any = None,
                 compute: Any = None, inventory: Any = None,
                 local: bool = True, credentials: Callable[[], str] | None = None,
                 clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], None] = time.sleep,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.stack = stack
        self.config = config
        self.local = local  # no Cloud Scheduler: `pcp sweep` publishes the tick itself
        self.clock = clock
        self.sleep = sleep
        self.monotonic = monotonic
        self._store = store
        self._bus = bus
        self._scheduler = scheduler
        self._publisher = publisher
        self._compute = compute
        self._inventory = inventory
        self._credentials = credentials

    # Subclasses build these on first use; a plain Context only has what it was given.

    @property
    def store(self) -> BlobStore:
        if self._store is None:
            self._store = self._make_store()
        return self._store

    @property
    def bus(self) -> Bus:
        if self._bus is None:
            self._bus = self._make_bus()
        return self._bus

    @property
    def scheduler(self) -> Any:
        """A CloudSchedulerClient-like object (`get_job`, `run_job`), or None."""
        if self._scheduler is None and not self.local:
            self._scheduler = self._make_scheduler()
        return self._scheduler

    @property
    def publisher(self) -> Any:
        """A PublisherClient-like object (`get_topic`) for `pcp doctor`, or None."""
        if self._publisher is None:
            self._publisher = self._make_publisher()
        return self._publisher

    @property
    def compute(self) -> Any:
        """A `ComputeRegions`-like object (`get(project, region)`) for `pcp doctor`, or None."""
        if self._compute is None and not self.local:
            self._compute = self._make_compute()
        return self._compute

    @property
    def inventory(self) -> Any:
        """A `pcp.cli.cost.ComputeInventory`-like object (`stack(project, zone, region,
        stack)`) for `pcp cost` and `pcp doctor`, or None."""
        if self._inventory is None:
            self._inventory = self._make_inventory()
        return self._inventory

    def credentials(self) -> str:
        """Describe the credentials in use; raises DefaultCredentialsError when there are none."""
        if self._credentials is not None:
            return self._credentials()
        return "not needed (in-memory stack)"

    @property
    def bucket(self) -> str:
        """For messages: `gs://NAME`, or what stands in for it."""
        return f"gs://{self.config.bucket}" if self.config is not None else "the in-memory store"

    def topic(self, kind: str) -> str:
        return Names(self.stack).topic(kind)

    @property
    def job_name(self) -> str | None:
        return None if self.config is None else self.config.job_name

    @property
    def watch_store(self) -> BlobStore:
        """The store a wait polls: each read bounded and never retried inside (the wait's
        loop retries and says meanwhile what it cannot reach)."""
        return self.store

    @property
    def backend(self) -> str:
        """What the CLI reads, for `cannot reach ...`."""
        return f"the stack bucket {self.bucket}"

    def replica_problem(self) -> str | None:
        """Why the local replica is down, or None (also when there is none to check)."""
        return None

    def check_backend(self) -> None:
        """Raise `ReplicaDown` at once when the backend is known to be gone (between the
        polls of a wait, so a dead replica is said in seconds, not after a 120 s timeout).
        A plain Context has nothing to check."""

    def _make_store(self) -> BlobStore:
        raise RuntimeError("this context has no store")

    def _make_bus(self) -> Bus:
        raise RuntimeError("this context has no bus")

    def _make_scheduler(self) -> Any:
        return None

    def _make_publisher(self) -> Any:
        return None

    def _make_compute(self) -> Any:
        return None

    def _make_inventory(self) -> Any:
        return None


class ComputeRegions:
    """Compute Engine's `regions.get` over its REST API, for the quotas `pcp doctor` reports.

    The CLI carries no Compute client library (it never starts or stops a VM), and this is
    one GET: `{endpoint}/compute/v1/projects/P/regions/R` answers the region with its
    `quotas` (`metric`, `limit`, `usage`). `session` is a requests-like session, e.g. google-
    auth's AuthorizedSession.
    """

    def __init__(self, session: Any, endpoint: str = "https://compute.googleapis.com") -> None:
        self.session = session
        self.endpoint = endpoint.rstrip("/")

    def get(self, project: str, region: str) -> dict[str, Any]:
        from google.api_core.exceptions import from_http_response

        url = f"{self.endpoint}/compute/v1/projects/{project}/regions/{region}"
        response = self.session.get(url, timeout=30)
        if response.status_code >= 400:
            raise from_http_response(response)
        body: dict[str, Any] = response.json()
        return body


class CloudContext(Context):
    """Google Cloud clients (or the local replica's emulators), each built on first use."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        super().__init__(config.stack, config=config, local=config.local, **kwargs)
        self._creds: Any = None
        self._watch_store: BlobStore | None = None

    def _google_credentials(self) -> Any:
        """Application Default Credentials, looked up once; raises when there are none."""
        if self._creds is None:
            import google.auth

            self._creds, _ = google.auth.default()
        return self._creds

    def credentials(self) -> str:
        assert self.config is not None
        if self.config.local:
            return "not needed (local replica emulators)"
        creds = self._google_credentials()
        path = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if path:
            return describe_credential_file(path)
        who = (getattr(creds, "service_account_email", None)
               or getattr(creds, "signer_email", None) or type(creds).__name__)
        return f"application default credentials ({who})"

    def replica_problem(self) -> str | None:
        """Why the local replica is down (its supervisor gone or silent), or None."""
        from pcp.cli.supervisor import supervisor_problem

        config = self.config
        if config is None or not config.local or not config.supervisor:
            return None
        supervisor = dict(config.supervisor)
        try:  # the heartbeat moves on while a wait runs: read it afresh
            fresh = read_local_state(local_dir(os.environ), self.stack) or {}
        except ConfigError:
            fresh = {}
        if fresh.get("pid") == supervisor.get("pid") and fresh.get("heartbeat_at"):
            supervisor["heartbeat_at"] = fresh["heartbeat_at"]
        return supervisor_problem(self.stack, supervisor, self.clock())

    def _check_replica(self, endpoint: str) -> None:
        """Fail at once when a stale state file points at a replica that is gone: the client
        libraries would retry a refused connection for minutes. A supervisor that crashed
        may leave its emulators answering, so it is checked first."""
        problem = self.replica_problem()
        if problem is not None:
            raise ReplicaDown(problem)
        url = urlsplit(endpoint if "//" in endpoint else f"//{endpoint}")
        try:
            socket.create_connection((url.hostname or "127.0.0.1", url.port or 80), 2).close()
        except OSError:
            raise ReplicaDown(f"the local replica of stack {self.stack} is not running (nothing "
                              f"answers at {endpoint}): run `pcp local up --stack "
                              f"{self.stack}`") from None

    def check_backend(self) -> None:
        if self.config is not None and self.config.local and self.config.storage_endpoint:
            self._check_replica(self.config.storage_endpoint)

    @property
    def watch_store(self) -> BlobStore:
        from pcp.adapters.gcs_store import GcsStore

        store = self.store
        if not isinstance(store, GcsStore):
            return store
        if self._watch_store is None:
            self._watch_store = store.with_read_limits(timeout=READ_TIMEOUT_S, retry=None)
        return self._watch_store

    @property
    def backend(self) -> str:
        config = self.config
        assert config is not None
        if config.local:
            return f"the stack bucket gs://{config.bucket} at {config.storage_endpoint}"
        return f"Cloud Storage (gs://{config.bucket})"

    def _make_store(self) -> BlobStore:
        from pcp.adapters.gcs_store import GcsStore

        config = self.config
        assert config is not None
        if config.local:
            from pcp_dev.local.emulators import storage_client

            assert config.storage_endpoint is not None
            self._check_replica(config.storage_endpoint)
            client = storage_client(config.storage_endpoint, config.project)
        else:
            from google.cloud import storage

            client = storage.Client(project=config.project,
                                    credentials=self._google_credentials())
        from google.cloud.storage.retry import DEFAULT_RETRY

        return GcsStore(config.bucket, client=client, project=config.project,
                        read_limits={"timeout": READ_TIMEOUT_S,
                                     "retry": DEFAULT_RETRY.with_timeout(READ_RETRY_S)})

    def _make_publisher(self) -> Any:
        config = self.config
        assert config is not None
        if config.local:
            from pcp_dev.local.emulators import publisher

            assert config.pubsub_host is not None
            self._check_replica(config.pubsub_host)
            return publisher(config.pubsub_host)
        from google.cloud import pubsub_v1

        return pubsub_v1.PublisherClient(credentials=self._google_credentials())

    def _make_bus(self) -> Bus:
        from pcp.adapters.pubsub_bus import PubSubBus

        assert self.config is not None
        return PubSubBus(self.config.project, self.config.stack, publisher=self.publisher)

    def _make_scheduler(self) -> Any:
        from google.cloud import scheduler_v1

        return scheduler_v1.CloudSchedulerClient(credentials=self._google_credentials())

    def _make_compute(self) -> Any:
        from google.auth.transport.requests import AuthorizedSession

        return ComputeRegions(AuthorizedSession(self._google_credentials()))

    def _make_inventory(self) -> Any:
        from pcp.cli.cost import ComputeInventory

        config = self.config
        assert config is not None
        if config.local:
            if not config.compute_endpoint:
                return None
            import requests

            self._check_replica(config.compute_endpoint)
            return ComputeInventory(requests.Session(), config.compute_endpoint)
        from google.auth.transport.requests import AuthorizedSession

        return ComputeInventory(AuthorizedSession(self._google_credentials()))
