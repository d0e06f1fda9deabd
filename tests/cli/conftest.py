"""Fixtures for the CLI tests: an in-memory stack, a control plane that drives runs, and a
tiny Cloud Scheduler REST endpoint for the real `CloudSchedulerClient`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner, Result

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.cli import cli
from pcp.cli.context import Context
from pcp.core.messages import NodeMarker, StartRequest
from pcp.core.names import marker_path
from pcp.core.policy import Policy
from pcp.core.ports import BlobStore
from pcp.service import Service

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
POLICY = Policy("tiny", 1, default_binary="github:example/trainer", worker_hourly_usd=1.2,
                shepherd_hourly_usd=0.3)
# Variables that would point the CLI somewhere real; every test starts without them.
CLEAN_ENV: dict[str, str | None] = {k: None for k in (
    "PCP_STACK", "PCP_PROJECT", "PCP_BUCKET", "PCP_REGION", "PCP_OUTPUTS", "GITHUB_ACTOR",
    "STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")}


def run_cli(args: list[str], obj: Context | None = None,
            env: Mapping[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(cli, args, obj=obj, env={**CLEAN_ENV, **(env or {})})


@pytest.fixture
def invoke() -> Callable[..., Result]:
    """`invoke(args, obj=context, env=...)`: the CLI in-process, without PCP_* leaking in."""
    return run_cli


@dataclass
class Stack:
    """An in-memory stack: the CLI's Context and a Service over the same store."""

    store: MemoryStore = field(default_factory=MemoryStore)
    bus: MemoryBus = field(default_factory=MemoryBus)

    policy: Policy = POLICY
    t0: datetime = T0

    def __post_init__(self) -> None:
        self.fleet = MemoryFleet("tiny", POLICY.worker_vms)
        self.service = Service(self.store, self.fleet, self.bus, POLICY, sleep=lambda s: None)
        self.context = Context("tiny", store=self.store, bus=self.bus,
                               sleep=lambda s: time.sleep(0.005))

    def start(self, run_id: str, now: datetime = T0, **fields: Any) -> None:
        self.service.handle(StartRequest.from_json(json.dumps({"run_id": run_id, **fields})),
                            now)

    def marker(self, run_id: str, node: str, kind: str, now: datetime, **fields: Any) -> None:
        m = NodeMarker(run_id=run_id, node=node, kind=kind, attempt=1, at=now,  # type: ignore
                       **fields)
        self.store.put(marker_path(run_id, node, kind), m.to_json())
        self.service.handle_marker(marker_path(run_id, node, kind), now)

    def finish(self, run_id: str, exit_codes: Mapping[str, int], *, logs: bool = True) -> None:
        """Boot every node, let them write logs and metrics, then exit with these codes."""
        for node in POLICY.node_names:
            self.marker(run_id, node, "booted", T0 + timedelta(minutes=1))
        if logs:
            for node in POLICY.node_names:
                self.store.put(f"runs/{run_id}/{node}/stdout.log", f"{node}: step 1\n".encode(),
                               content_type="text/plain")
                self.store.put(f"runs/{run_id}/{node}/stderr.log", b"", content_type="text/plain")
            self.store.put(f"runs/{run_id}/shepherd/metrics.json",
                           json.dumps({"loss": 0.125, "steps": 100}).encode())
        end = T0 + timedelta(minutes=30)
        for node in sorted(POLICY.node_names, key=lambda n: exit_codes.get(n, 0)):
            self.marker(run_id, node, "done", end, exit_code=exit_codes.get(node, 0),
                        duration_s=1800.0)

    def published(self, topic: str) -> list[bytes]:
        return self.bus.on(topic)


@pytest.fixture
def stack() -> Stack:
    return Stack()


@pytest.fixture
def stack_over() -> Callable[[BlobStore], Stack]:
    """`stack_over(store)`: a Stack (Service and Context) over another store."""
    return lambda store: Stack(store=store)  # type: ignore[arg-type]


def play(store: BlobStore, bus: MemoryBus, exit_codes: Mapping[str, int],
         delay: float = 0.05) -> threading.Thread:
    """A background control plane: takes the CLI's start request off the bus, then plays the
    nodes (booted, done with `exit_codes`) through the real Service, a step per `delay`."""

    def work() -> None:
        deadline = time.monotonic() + 10
        while not bus.on("start") and time.monotonic() < deadline:
            time.sleep(0.005)
        data = bus.on("start")[0]
        request = StartRequest.from_json(data)
        driver = Stack(store=store, bus=bus)  # type: ignore[arg-type]
        time.sleep(delay)
        driver.service.handle(request, T0)
        time.sleep(delay)
        driver.finish(request.run_id, exit_codes)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def control_plane() -> Iterator[Callable[..., threading.Thread]]:
    """`control_plane(store, bus, exit_codes)` starts `play` in a thread, joined at the end."""
    threads: list[threading.Thread] = []

    def start(*args: Any, **kwargs: Any) -> threading.Thread:
        threads.append(play(*args, **kwargs))
        return threads[-1]

    yield start
    for thread in threads:
        thread.join(10)


# ---------------------------------------------------------------- Cloud Scheduler stand-in


@dataclass
class SchedulerServer:
    """Answers the Cloud Scheduler v1 REST calls `get_job` and `run_job`."""

    jobs: dict[str, str]  # full job name -> state
    calls: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0


def _handler(server: SchedulerServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _job(self) -> tuple[str, str | None]:
            path = self.path.split("?", 1)[0].removeprefix("/v1/")
            name, _, verb = path.partition(":")
            return name, verb or None

        def do_GET(self) -> None:  # http.server's naming
            name, _ = self._job()
            server.calls.append(("get", name))
            self._reply(name)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            name, verb = self._job()
            server.calls.append((verb or "post", name))
            self._reply(name)

        def _reply(self, name: str) -> None:
            if name not in server.jobs:
                self._answer(404, {"error": {"code": 404, "status": "NOT_FOUND",
                                             "message": f"Job not found: {name}"}})
                return
            self._answer(200, {"name": name, "state": server.jobs[name],
                               "schedule": "*/5 * * * *"})

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def scheduler_server() -> Iterator[SchedulerServer]:
    state = SchedulerServer(jobs={})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = httpd.server_port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def scheduler_client(scheduler_server: SchedulerServer) -> Any:
    """The real CloudSchedulerClient (REST) pointed at `scheduler_server`."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import scheduler_v1

    return scheduler_v1.CloudSchedulerClient(
        transport="rest", credentials=AnonymousCredentials(),
        client_options={"api_endpoint": f"http://127.0.0.1:{scheduler_server.port}"})
