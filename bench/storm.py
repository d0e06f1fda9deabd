"""Marker storm: N + 1 `done` markers delivered to the marker function at the same moment.

Setup (not timed): a start request, then every node's `booted` marker one at a time, so the
run is `running` with every node booted. Then all `done` markers are uploaded, and N + 1
threads, released by one barrier, each deliver one finalized event to `on_marker` through
the functions-framework test client. A delivery answered with HTTP 500 is redelivered (as
Eventarc would) after a short pause and counted.

Figures:
- `last_stop_after_last_marker_s`: from the moment the last marker was handed to the
  function to the last worker's `stop` request arriving at the Compute endpoint (its log is
  timestamped on arrival).
- `conflicts`: lost compare-and-swap races, summed from the `conflicts` field of the marker
  function's structured log lines (the service's `Outcome.conflicts`).
- `lost_updates`: nodes not DONE in the final run record (must be 0); `ended_times` must be 1.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import threading
import time
from typing import Any

from pcp_dev.bench.fnstack import Emulators, FnStack, check_run, fn_stack, post, start_event

REDELIVER_PAUSE_S = 0.5
MAX_DELIVERIES = 20


class _Lines(io.TextIOBase):
    """stdout for the storm: keeps the functions' JSON lines (written whole, under a lock)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in "".join(self.parts).splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and "severity" in obj:
                out.append(obj)
        return out


def _setup(fn: FnStack, run_id: str) -> float:
    """Start the run and boot every node, one event at a time; returns seconds per marker."""
    client = fn.apps["on_start"].test_client()
    code = post(client, start_event(fn.stack, {"run_id": run_id}))
    if code != 200:
        raise RuntimeError(f"start of {run_id} answered {code}")
    marker = fn.apps["on_marker"].test_client()
    events = fn.marker_events(run_id, "booted")
    t0 = time.perf_counter()
    for event in events:
        code = post(marker, event)
        if code != 200:
            raise RuntimeError(f"booted marker {event['subject']} answered {code}")
    per_marker = (time.perf_counter() - t0) / len(events)
    state = fn.read("control/stack.json") or {}
    phase = (state.get("active") or {}).get("phase")
    if phase != "running":
        raise RuntimeError(f"run {run_id} is {phase!r} after every node booted")
    return per_marker


def _storm(fn: FnStack, events: list[dict[str, Any]]) -> dict[str, Any]:
    app = fn.apps["on_marker"]
    barrier = threading.Barrier(len(events))
    sent = [0.0] * len(events)
    finished = [0.0] * len(events)
    deliveries = [0] * len(events)
    failures: list[str] = []

    def deliver(i: int) -> None:
        client = app.test_client()
        try:
            barrier.wait(timeout=120)
            sent[i] = time.time()
            for _ in range(MAX_DELIVERIES):
                deliveries[i] += 1
                if post(client, events[i]) == 200:
                    break
                time.sleep(REDELIVER_PAUSE_S)
            else:
                failures.append(f"{events[i]['subject']}: {MAX_DELIVERIES} deliveries failed")
            finished[i] = time.time()
        except Exception as e:  # noqa: BLE001 - reported with the figures
            failures.append(f"{events[i]['subject']}: {e!r}")

    threads = [threading.Thread(target=deliver, args=(i,), name=f"storm-{i}")
               for i in range(len(events))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if any(t.is_alive() for t in threads):
        failures.append("a delivery thread hung past 600 s")
    return {"sent": sent, "finished": finished, "deliveries": deliveries, "failures": failures}


def measure_one(emulators: Emulators, workers: int) -> dict[str, Any]:
    run_id = f"storm-{workers}"
    with fn_stack(emulators, f"storm{workers}", workers) as fn, fn.activated():
        lines = _Lines()
        with contextlib.redirect_stdout(lines):
            one_at_a_time = _setup(fn, run_id)
            events = fn.marker_events(run_id, "done")
            fn.compute.clear()
            mark = len(lines.parts)
            got = _storm(fn, events)
        storm_lines = _Lines()
        storm_lines.parts = lines.parts[mark:]
        records = storm_lines.records()
        calls = fn.compute.calls()
        first_stop: dict[str, float] = {}
        for c in calls:
            if c.kind == "stop" and c.vm is not None:
                first_stop.setdefault(c.vm, c.at)
        stops_per_vm = [sum(1 for c in calls if c.kind == "stop" and c.vm == vm) for vm in fn.vms]
        last_marker = max(got["sent"])
        last_stop = max(first_stop.values()) if len(first_stop) == len(fn.vms) else None
        marker_lines = [r for r in records if r.get("event") == "marker"]
        result = {
            "n": workers,
            "markers": len(events),
            "last_stop_after_last_marker_s": (None if last_stop is None
                                              else round(last_stop - last_marker, 3)),
            "storm_wall_s": round(max(got["finished"]) - min(got["sent"]), 3),
            # The same handler without contention (the booted markers, one at a time): the
            # storm cannot beat markers x this, since every update is one CAS on one document.
            "uncontended_marker_s": round(one_at_a_time, 4),
            "conflicts": sum(int(r.get("conflicts") or 0) for r in marker_lines),
            "max_conflicts_one_event": max((int(r.get("conflicts") or 0)
                                            for r in marker_lines), default=0),
            "redeliveries": sum(got["deliveries"]) - len(events),
            "transient_errors": sum(1 for r in records if r.get("severity") == "ERROR"),
            "vms_stopped": len(first_stop),
            "max_stops_per_vm": max(stops_per_vm, default=0),
            "failures": got["failures"][:5],
        }
        result.update(check_run(fn, run_id))
        return result


def run(emulators: Emulators, ns: list[int]) -> dict[str, Any]:
    rows = []
    for n in ns:
        print(f"  marker storm N={n} ({n + 1} markers) ...", file=sys.stderr, flush=True)
        rows.append(measure_one(emulators, n))
    return {"redeliver_pause_s": REDELIVER_PAUSE_S, "rows": rows,
            "conflicts_source": "sum of `conflicts` in the marker function's JSON log lines"}
