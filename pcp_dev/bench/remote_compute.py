"""The local Compute endpoint served from a child process, with a timestamped call log.

Why a child process: the benchmark measures the control plane (ComputeFleet, the functions),
not the stand-in for Compute Engine. In one process the endpoint's request parsing and JSON
would share the interpreter lock with the fleet's clients and be billed to them; in its own
process it runs on the other core, as Google's servers would run elsewhere.

The child runs the unchanged `LocalCompute` with a subclass that stamps every request with
the wall-clock time it arrived, so "when was the last stop issued" can be read afterwards.
"""

from __future__ import annotations

import multiprocessing as mp
import re
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import Any

_KIND = re.compile(r"/(?:instances|operations)(?:/(?P<name>[^/]+)(?:/(?P<verb>[A-Za-z]+))?)?$")


@dataclass(frozen=True)
class Call:
    """One request as it reached the endpoint."""

    at: float  # time.time() on arrival
    method: str
    kind: str  # get, list, start, stop, setMetadata, ..., operations.get, operations.wait
    vm: str | None


def classify(method: str, path: str) -> tuple[str, str | None]:
    """(kind, vm) of a Compute v1 request path, as the endpoint itself names them."""
    m = _KIND.search(path)
    if m is None:
        return f"{method} ?", None
    if "/operations" in path:
        return ("operations.wait" if m["verb"] == "wait" else "operations.get"), None
    if m["name"] is None:
        return "list", None
    return (m["verb"] or "get"), m["name"]


def _serve(conn: Connection, project: str, zone: str) -> None:
    """The child: a LocalCompute whose requests are logged with their arrival time."""
    import os
    import sys

    from pcp_dev.local.compute import LocalCompute

    # The endpoint's own log lines (a hook failing, maxRunDuration) are not the bench's output.
    sys.stdout = open(os.devnull, "w")  # for the child's whole life

    log: list[tuple[float, str, str]] = []

    class Timed(LocalCompute):
        def handle(self, method: str, path: str, query: dict[str, list[str]],
                   body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            log.append((time.time(), method, path))  # list.append is atomic
            return super().handle(method, path, query, body)

    # The bench measures the fleet's API calls, not boots: VMs change status at once.
    compute = Timed(project, zone, time_scale=0.0).start()
    conn.send(compute.endpoint)
    try:
        while True:
            op, args = conn.recv()
            if op == "add":
                stack, count, metadata = args
                for i in range(count):
                    compute.add_instance(
                        f"pcp-{stack}-worker-{i}",
                        labels={"pcp-stack": stack, "pcp-role": "worker",
                                "pcp-node": f"worker-{i}"},
                        metadata=metadata)
                conn.send(count)
            elif op == "delay":
                compute.faults.delay_seconds["*"] = float(args)
                conn.send(None)
            elif op == "power_off":
                for name in args:
                    compute.power_off(name)
                conn.send(None)
            elif op == "status":
                conn.send({name: compute.vm(name).status for name in args})
            elif op == "log":
                conn.send(list(log))
            elif op == "clear":
                log.clear()
                conn.send(None)
            else:
                conn.send(None)
                return
    finally:
        compute.stop()


class RemoteCompute:
    """A handle on the child's endpoint: add VMs, inject latency, read the call log."""

    def __init__(self, project: str, zone: str) -> None:
        self.project, self.zone = project, zone
        self.endpoint = ""
        self._conn: Connection | None = None
        self._proc: Any = None

    def start(self, timeout: float = 60.0) -> RemoteCompute:
        # spawn, not fork: the parent holds gRPC and HTTP threads that a fork would copy.
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.project, self.zone),
                                 daemon=True, name="bench-compute")
        self._proc.start()
        child.close()
        self._conn = parent
        if not parent.poll(timeout):
            self.stop()
            raise RuntimeError(f"the Compute endpoint did not start within {timeout:.0f} s")
        self.endpoint = parent.recv()
        return self

    def _ask(self, op: str, args: Any = None) -> Any:
        assert self._conn is not None, "RemoteCompute is not started"
        self._conn.send((op, args))
        return self._conn.recv()

    def add_workers(self, stack: str, count: int, metadata: dict[str, str]) -> None:
        self._ask("add", (stack, count, metadata))

    def set_delay(self, seconds: float) -> None:
        """Latency added before every API call answers (LocalCompute's `faults`)."""
        self._ask("delay", seconds)

    def power_off(self, names: list[str]) -> None:
        self._ask("power_off", names)

    def statuses(self, names: list[str]) -> dict[str, str]:
        return dict(self._ask("status", names))

    def calls(self) -> list[Call]:
        out = []
        for at, method, path in self._ask("log"):
            kind, vm = classify(method, path)
            out.append(Call(at, method, kind, vm))
        return out

    def clear(self) -> None:
        self._ask("clear")

    def stop(self) -> None:
        if self._conn is not None:
            try:
                self._ask("quit")
            except (EOFError, OSError, BrokenPipeError):
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=5)
            self._proc = None

    def __enter__(self) -> RemoteCompute:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
