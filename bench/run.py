"""`make bench`: how the control plane scales, measured on this machine. Not a test.

Figures, for N = 1, 3, 7, 15, 64, 256 workers (--quick: 1, 3, 15):
  fanout  ComputeFleet.start against the local Compute endpoint, 100 ms per API call
  storm   N + 1 concurrent done markers through the marker function
  calls   Compute, GCS and Pub/Sub calls and function invocations for one whole run
  import  cold import of functions/main.py
  demo    the local replica's overhead around the trainer (`make demo`)
Writes bench/results/latest.json, latest.md (also printed) and latest.png, and reports each
target as pass or fail; it exits 0 whatever the figures are (1 only if a part broke).
Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import calls
import coldstart
import fanout
import overhead
import report
import storm

from pcp_dev.bench.fnstack import Emulators

PARTS = ("fanout", "storm", "calls", "import", "demo")
FULL_NS = [1, 3, 7, 15, 64, 256]
QUICK_NS = [1, 3, 15]
RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
BEGIN, END = "<!-- latest:begin -->", "<!-- latest:end -->"


def machine() -> dict[str, Any]:
    """Facts that make figures comparable: the machine is shared, so its load too."""
    model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu": model,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "platform": f"{platform.system()} {platform.machine()}", "loadavg": load}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 1, 3, 15 only")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    p.add_argument("--reps", type=int, default=3, help="fan-out repetitions (median; default 3)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.* are written")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    return args


def refresh_readme(table: str) -> bool:
    """Put the latest table between the README's markers (a full run into results/ only)."""
    if not README.is_file():
        return False
    text = README.read_text()
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return False
    body = "\n" + table.split("\n", 1)[1]  # the README has its own title
    body = body.replace("\n## ", "\n### ").lstrip("\n")
    README.write_text(text[: start + len(BEGIN)] + "\n" + body + text[end:])
    return True


def _guarded(name: str, fn: Callable[[], dict[str, Any]], broken: list[str]) -> dict[str, Any]:
    """Run one part; a crash is recorded in the results instead of losing the others."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - reported, and the exit code says so
        traceback.print_exc(file=sys.stderr)
        broken.append(name)
        out = {"error": f"{type(e).__name__}: {e}"}
    out["took_s"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    ns = QUICK_NS if args.quick else FULL_NS
    command = "bench/run.py" + ("".join(f" {a}" for a in (argv if argv is not None
                                                             else sys.argv[1:])))
    results: dict[str, Any] = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "command": command.strip(), "machine": machine(), "ns": ns, "parts": args.parts,
    }
    broken: list[str] = []
    t0 = time.perf_counter()
    print(f"pcp bench: N = {ns}, parts {', '.join(args.parts)}", file=sys.stderr, flush=True)
    if "fanout" in args.parts:
        results["fanout"] = _guarded("fanout", lambda: fanout.run(ns, args.reps), broken)

    if {"storm", "calls"} & set(args.parts):
        emulators = Emulators().start()
        try:
            for part, module in (("storm", storm), ("calls", calls)):
                if part not in args.parts:
                    continue
                if emulators.failed:
                    broken.append(part)
                    results[part] = {"error": f"emulator failed: {emulators.failed}"}
                    continue
                if emulators.missing:
                    if os.environ.get("PCP_REQUIRE_EMULATORS") == "1":
                        print(f"emulator missing (PCP_REQUIRE_EMULATORS=1): "
                              f"{emulators.missing}", file=sys.stderr)
                        return 2
                    results[part] = {"skipped": f"emulator missing: {emulators.missing}"}
                    continue
                # Under the per-object limit the storms and the calls count are measured up to
                # N = 64 (256 handler threads in one process measure the interpreter lock).
                limited_ns = [n for n in ns if n <= 64]
                results[part] = _guarded(part, partial(module.run, emulators, limited_ns),
                                         broken)
        finally:
            emulators.stop()

    if "import" in args.parts:
        results["cold_import"] = _guarded("import", coldstart.run, broken)
    if "demo" in args.parts:
        results["demo"] = _guarded("demo", overhead.run, broken)

    results["targets"] = report.targets(results)
    results["took_s"] = round(time.perf_counter() - t0, 1)
    results["broken"] = broken
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    text = report.markdown(results)
    (args.out / "latest.md").write_text(text)
    plotted = report.plot(results, args.out / "latest.png")
    sys.stdout.write(text)
    full = ns == FULL_NS and set(args.parts) == set(PARTS) and not broken
    if full and args.out.resolve() == RESULTS:
        refresh_readme(text)
    print(f"\nwrote {args.out / 'latest.json'}, latest.md"
          + (", latest.png" if plotted else " (no plot: matplotlib missing)")
          + f" in {results['took_s']:.0f} s", file=sys.stderr)
    if broken:
        print(f"parts that broke: {', '.join(broken)} (see the errors above)", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
