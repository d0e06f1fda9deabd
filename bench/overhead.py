"""The local replica's overhead: `python -m pcp_dev.local.demo` wall time minus the trainer's.

The demo starts the emulators, the four functions, a worker "VM" and the shepherd daemon,
runs the reference trainer through a whole run, and tears everything down. The trainer's own
run time is `elapsed_s` in the shepherd's metrics.json, which the demo copies out of the
bucket; what remains is what the replica costs around it. The demo's timestamped lines and
the run summary split that remainder into start-up, boot, end and tear-down.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
_UP = re.compile(r"^\[\s*([0-9.]+)s\] replica up")
_END = re.compile(r"^\[\s*([0-9.]+)s\] run \S+: (succeeded|failed|cancelled|rejected)")
_RUN = re.compile(r"published a start request for run (\S+)")


def _time(text: str | None) -> datetime | None:
    return None if not text else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _breakdown(out: str, results: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for line in out.splitlines():
        if m := _UP.match(line):
            found["replica_up_s"] = float(m[1])
        elif m := _END.match(line):
            found["run_final_seen_s"] = float(m[1])
        elif m := _RUN.search(line):
            found["run_id"] = m[1]
    run_id = found.get("run_id")
    if run_id is None:
        return found
    metrics = results / run_id / "shepherd" / "metrics.json"
    summary = results / run_id / "summary.json"
    if metrics.is_file():
        found["trainer_elapsed_s"] = json.loads(metrics.read_text()).get("elapsed_s")
    if summary.is_file():
        s = json.loads(summary.read_text())
        found["run_duration_s"] = s.get("duration_s")
        started = _time(s.get("started_at"))
        booted = [_time(n.get("booted_at")) for n in s.get("nodes", [])]
        if started is not None and booted and all(booted):
            found["start_to_all_booted_s"] = round(
                max(b for b in booted if b is not None).timestamp() - started.timestamp(), 3)
    return found


def run(timeout: float = 400.0) -> dict[str, Any]:
    print("  make demo (python -m pcp_dev.local.demo) ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="pcp-bench-demo-") as tmp:
        state = Path(tmp)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "pcp_dev.local.demo", "--state-dir",
                                   str(state)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return {"overhead_s": None, "reason": f"the demo did not finish in {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        found = _breakdown(proc.stdout, state / "results")
    elapsed = found.get("trainer_elapsed_s")
    if proc.returncode != 0 or not isinstance(elapsed, (int, float)):
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"overhead_s": None, "wall_s": round(wall, 3), "exit_code": proc.returncode,
                "reason": "the demo did not finish a run with a trainer metrics.json: "
                          + " | ".join(tail)}
    return {
        "overhead_s": round(wall - elapsed, 3),
        "wall_s": round(wall, 3),
        "exit_code": proc.returncode,
        **found,
        "after_final_s": (None if "run_final_seen_s" not in found
                          else round(wall - found["run_final_seen_s"], 3)),
    }
