"""Start fan-out: how long `ComputeFleet.start` takes to arm and start N worker VMs.

Per VM the fleet reads the instance, writes the assignment to metadata, sets the run labels,
sets `scheduling.maxRunDuration`, reads it back, and starts the VM: six API calls, each
answered after an injected 100 ms by the local endpoint (a child process). The figure is the
wall time of one `start` call for all N VMs, median of `reps`, and its ratio to N = 1.

Each repetition is a fresh attempt on powered-off VMs, so the fleet really does every call
(an unchanged attempt on a running VM would be left alone after one read).
"""

from __future__ import annotations

import contextlib
import io
import statistics
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from pcp.adapters.compute_fleet import ComputeFleet
from pcp.core.messages import Assignment
from pcp_dev.bench.remote_compute import RemoteCompute

PROJECT, ZONE, STACK = "pcp-bench", "us-central1-a", "fanout"
DELAY_S = 0.1


def default_max_workers() -> int:
    """The production default of ComputeFleet's thread pool, read from its signature."""
    import inspect

    return int(inspect.signature(ComputeFleet).parameters["max_workers"].default)


def _assignments(count: int, attempt: int, deadline: datetime) -> list[Assignment]:
    return [Assignment(run_id="fanout", attempt=attempt, stack=STACK, node=f"worker-{i}",
                       role="worker", rank=i + 1, num_nodes=count + 1,
                       head_host="shepherd.bench", port=9000, binary="github:example/trainer",
                       args=(), deadline=deadline, boot_deadline=deadline)
            for i in range(count)]


def measure_one(count: int, reps: int, max_workers: int | None) -> dict[str, Any]:
    """Time `reps` starts of `count` VMs through one fleet (its clients warm after rep 1)."""
    from google.cloud import compute_v1  # noqa: F401 - paid once, outside every timing

    with RemoteCompute(PROJECT, ZONE) as compute:
        compute.add_workers(STACK, count, {"pcp-stack": STACK})
        compute.set_delay(DELAY_S)
        kwargs: dict[str, Any] = {} if max_workers is None else {"max_workers": max_workers}
        fleet = ComputeFleet(PROJECT, ZONE, STACK, endpoint=compute.endpoint, **kwargs)
        names = [f"pcp-{STACK}-worker-{i}" for i in range(count)]
        deadline = datetime.now(UTC) + timedelta(hours=6)
        times: list[float] = []
        cpu: list[float] = []
        calls: Counter[str] = Counter()
        for rep in range(reps):
            compute.power_off(names)
            compute.clear()
            before = Counter(fleet.calls)
            with contextlib.redirect_stdout(io.StringIO()):  # one log line per VM
                t0, c0 = time.perf_counter(), time.process_time()
                fleet.start(_assignments(count, rep + 1, deadline), deadline)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            calls = Counter(fleet.calls) - before
            statuses = compute.statuses(names)
            started = sum(1 for s in statuses.values() if s == "RUNNING")
            if started != count:
                raise RuntimeError(f"fan-out of {count}: only {started} VMs RUNNING")
    # cpu_s: the fleet's own CPU time (this process; the endpoint runs in another), which
    # bounds the fan-out however many threads there are: they share one interpreter lock.
    return {"n": count, "seconds": round(statistics.median(times), 3),
            "runs_s": [round(t, 3) for t in times], "cpu_s": round(statistics.median(cpu), 3),
            "calls_per_vm": round(sum(calls.values()) / count, 2), "calls": dict(calls),
            "max_workers": max_workers or fleet.max_workers}


def run(ns: list[int], reps: int, uncapped_from: int = 64) -> dict[str, Any]:
    """Fan-out with the production pool for every N; also with one thread per VM for large N."""
    default = default_max_workers()
    rows = []
    for n in ns:
        print(f"  fan-out N={n} ...", file=sys.stderr, flush=True)
        rows.append(measure_one(n, reps, None))
    base = next((r["seconds"] for r in rows if r["n"] == 1), None)
    for r in rows:
        r["ratio"] = None if base is None else round(r["seconds"] / base, 2)
    uncapped = []
    for n in (n for n in ns if n >= uncapped_from and n > default):
        print(f"  fan-out N={n}, max_workers={n} ...", file=sys.stderr, flush=True)
        row = measure_one(n, reps, n)
        row["ratio"] = None if base is None else round(row["seconds"] / base, 2)
        uncapped.append(row)
    ideal_per_vm = 6 * DELAY_S
    return {
        "delay_per_call_s": DELAY_S,
        "default_max_workers": default,
        "reps": reps,
        "rows": rows,
        "uncapped": uncapped,
        # Batches of max_workers VMs, each at least 6 calls x 100 ms: what the pool alone allows.
        "pool_floor_s": {str(n): round(-(-n // default) * ideal_per_vm, 2) for n in ns},
        "max_workers_for_3x_at_256": -(-256 // 3),
    }
