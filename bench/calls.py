"""Cloud calls and function invocations for one whole run, for each N.

One run, driven through the functions one event at a time (so no lost race inflates the
count): the start request, every node's `booted` marker, every node's `done` marker, which
ends the run. Counted where the calls land:
- Compute: every request at the local Compute endpoint (operation waits included);
- GCS: every request at a counting proxy the functions reach fake-gcs-server through;
- Pub/Sub: every publish by the service's bus (the shepherd's start and stop commands);
- invocations: events delivered to the functions.
The agents' own uploads (two markers per node, logs, metrics) are not the control plane's
and are left out. One sweep tick in the middle of the run is counted on its own: the sweeper
runs every few minutes whether or not a run is going, so it is a cost per tick, not per run.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pcp_dev.bench.fnstack import (
    Emulators,
    FnStack,
    check_run,
    fn_stack,
    post,
    start_event,
    sweep_event,
)
from pcp_dev.local.gcs_proxy import GcsProxy


class CountingBus:
    """Wraps the service's Bus port: every publish is one Pub/Sub call."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.topics: Counter[str] = Counter()
        self._lock = threading.Lock()

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        with self._lock:
            self.topics[topic] += 1
        return str(self.inner.publish(topic, data, attributes))

    def take(self) -> Counter[str]:
        with self._lock:
            out, self.topics = self.topics, Counter()
            return out


class Meter:
    """Calls at the three endpoints since the last `take`."""

    def __init__(self, fn: FnStack, proxy: GcsProxy, bus: CountingBus) -> None:
        self.fn, self.proxy, self.bus = fn, proxy, bus

    def take(self) -> dict[str, Any]:
        compute = Counter(c.kind for c in self.fn.compute.calls())
        self.fn.compute.clear()
        gcs = self.proxy.snapshot()
        self.proxy.reset()
        pubsub = self.bus.take()
        return {"compute": sum(compute.values()), "gcs": sum(gcs.values()),
                "pubsub": sum(pubsub.values()), "compute_by_kind": dict(compute),
                "gcs_by_kind": dict(gcs), "pubsub_by_topic": dict(pubsub)}


def _deliver(fn: FnStack, target: str, event: dict[str, Any]) -> None:
    code = post(fn.apps[target].test_client(), event)
    if code != 200:
        raise RuntimeError(f"{target} answered {code} for {event.get('subject', event['id'])}")


PHASE_S = 1.1  # between the start, the boots and the ends


def measure_one(emulators: Emulators, workers: int) -> dict[str, Any]:
    assert emulators.gcs is not None
    run_id = f"calls-{workers}"
    with GcsProxy(emulators.gcs.endpoint) as proxy, \
            fn_stack(emulators, f"calls{workers}", workers, proxy.endpoint) as fn, \
            fn.activated(), contextlib.redirect_stdout(io.StringIO()):
        service = fn.service()
        bus = CountingBus(service.bus)
        service.bus = bus  # the same Service object the entry point reuses per process
        meter = Meter(fn, proxy, bus)
        meter.take()
        invocations = 1
        _deliver(fn, "on_start", start_event(fn.stack, {"run_id": run_id}))
        # The VMs boot, then train: each of the run's transitions comes more than a second
        # after the previous one, as in any real run (Cloud Storage's per-object limit).
        time.sleep(PHASE_S)
        # Each marker is uploaded just before its event, so the sweep sees only those sent.
        half = len(fn.nodes) // 2
        for node in fn.nodes[:half]:
            _deliver(fn, "on_marker", fn.marker_event(run_id, node, "booted"))
        run_part = meter.take()
        _deliver(fn, "on_sweep", sweep_event(fn.stack))
        sweep = meter.take()
        for node in fn.nodes[half:]:
            _deliver(fn, "on_marker", fn.marker_event(run_id, node, "booted"))
        time.sleep(PHASE_S)
        for node in fn.nodes:
            _deliver(fn, "on_marker", fn.marker_event(run_id, node, "done"))
        invocations += 2 * len(fn.nodes)
        rest = meter.take()
        check = check_run(fn, run_id)
    total = {k: run_part[k] + rest[k] for k in ("compute", "gcs", "pubsub")}
    by_kind = {
        "compute": dict(Counter(run_part["compute_by_kind"]) + Counter(rest["compute_by_kind"])),
        "gcs": dict(Counter(run_part["gcs_by_kind"]) + Counter(rest["gcs_by_kind"])),
        "pubsub": dict(Counter(run_part["pubsub_by_topic"]) + Counter(rest["pubsub_by_topic"])),
    }
    cloud = sum(total.values())
    budget = 8 * workers + 20
    return {
        "n": workers, **total, "cloud_calls": cloud, "invocations": invocations,
        "budget_8n_20": budget, "within_budget": cloud <= budget,
        "per_node": round(cloud / (workers + 1), 2), "by_kind": by_kind,
        "sweep_tick": {k: sweep[k] for k in ("compute", "gcs", "pubsub")},
        "run_ok": check["ok"],
    }


def run(emulators: Emulators, ns: list[int]) -> dict[str, Any]:
    rows = []
    for n in ns:
        print(f"  calls per run N={n} ...", file=sys.stderr, flush=True)
        rows.append(measure_one(emulators, n))
    return {"rows": rows, "budget": "4N + 20 cloud calls per run (Compute + GCS + Pub/Sub)"}
