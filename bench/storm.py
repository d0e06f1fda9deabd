"""Marker storms under Cloud Storage's per-object limit: N + 1 `booted` markers at once, then
N + 1 `done` markers at once, through the marker function.

The functions reach fake-gcs-server through the limiting proxy (pcp_dev/local/gcs_proxy.py),
which answers a second update of one object within a second with 429 rateLimitExceeded, as
Cloud Storage does. A start request first (not timed); then all `booted` markers are uploaded
and N + 1 threads, released by one barrier, each deliver one event to `on_marker` through the
functions-framework test client, 1.1 s after the start (the boot: minutes in the cloud); after
another 1.1 s (the training) the same for `done`. The pauses keep each of the run's
transitions more than a second after the previous one, as in any real run. A delivery
answered with HTTP 500 is redelivered (as the trigger would) after a short pause and counted.

Figures:
- `booted_storm_s`, `done_storm_s`: from the first delivery to the last one answered.
- `last_stop_after_last_marker_s`: from the moment the last `done` marker was handed to the
  function to the last worker's `stop` request arriving at the Compute endpoint (its log is
  timestamped on arrival).
- `stack_doc_writes`, `stack_doc_429s`, `all_429s`: from the proxy, for the whole run.
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

from pcp.core.names import STACK_DOC
from pcp_dev.bench.fnstack import Emulators, FnStack, check_run, fn_stack, post, start_event
from pcp_dev.local.gcs_proxy import GcsProxy

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


TRAINING_S = 1.1


def _start(fn: FnStack, run_id: str) -> None:
    client = fn.apps["on_start"].test_client()
    code = post(client, start_event(fn.stack, {"run_id": run_id}))
    if code != 200:
        raise RuntimeError(f"start of {run_id} answered {code}")


def _phase(fn: FnStack) -> str | None:
    state = fn.read(STACK_DOC) or {}
    return (state.get("active") or {}).get("phase")


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


def _wall(got: dict[str, Any]) -> float:
    return round(max(got["finished"]) - min(got["sent"]), 3)


def measure_one(emulators: Emulators, workers: int) -> dict[str, Any]:
    run_id = f"storm-{workers}"
    assert emulators.gcs is not None
    with GcsProxy(emulators.gcs.endpoint) as proxy, \
            fn_stack(emulators, f"storm{workers}", workers, proxy.endpoint) as fn, fn.activated():
        lines = _Lines()
        with contextlib.redirect_stdout(lines):
            _start(fn, run_id)
            time.sleep(TRAINING_S)  # the VMs boot (minutes in the cloud, over a second here)
            booted = _storm(fn, fn.marker_events(run_id, "booted"))
            phase_after_boot = _phase(fn)
            time.sleep(TRAINING_S)
            events = fn.marker_events(run_id, "done")
            fn.compute.clear()
            mark = len(lines.parts)
            got = _storm(fn, events)
        storm_lines = _Lines()
        storm_lines.parts = lines.parts
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
        limited = proxy.limited_snapshot()
        result = {
            "n": workers,
            "markers": len(events),
            "booted_storm_s": _wall(booted),
            "running_after_booted_storm": phase_after_boot == "running",
            "done_storm_s": _wall(got),
            "last_stop_after_last_marker_s": (None if last_stop is None
                                              else round(last_stop - last_marker, 3)),
            "stack_doc_writes": proxy.mutations_snapshot()[STACK_DOC],
            "stack_doc_429s": limited[STACK_DOC],
            "all_429s": sum(limited.values()),
            "conflicts": sum(int(r.get("conflicts") or 0) for r in marker_lines),
            "redeliveries": (sum(got["deliveries"]) + sum(booted["deliveries"])
                             - len(events) - len(booted["deliveries"])),
            "transient_errors": sum(1 for r in records[mark:] if r.get("severity") == "ERROR"),
            "vms_stopped": len(first_stop),
            "max_stops_per_vm": max(stops_per_vm, default=0),
            "failures": (booted["failures"] + got["failures"])[:5],
        }
        result.update(check_run(fn, run_id))
        return result


def run(emulators: Emulators, ns: list[int]) -> dict[str, Any]:
    rows = []
    for n in ns:
        print(f"  marker storms N={n} ({n + 1} booted, then {n + 1} done markers, limited "
              "to one update per object per second) ...", file=sys.stderr, flush=True)
        rows.append(measure_one(emulators, n))
    return {"redeliver_pause_s": REDELIVER_PAUSE_S, "training_s": TRAINING_S, "rows": rows,
            "limit": "one update per object per second (429 rateLimitExceeded beyond)",
            "conflicts_source": "sum of `conflicts` in the marker function's JSON log lines"}
