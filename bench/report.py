"""Targets, the markdown table and the plot, from the benchmark's results dictionary.

A target is a line in a table with a pass or fail, never an assert: the benchmark reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

STORM_LATENCY_S = 2.0
STORM_WALL_S = 5.0
STACK_DOC_WRITES = 6
COLD_IMPORT_S = 1.0


def _row(results: dict[str, Any], section: str, n: int) -> dict[str, Any] | None:
    body = results.get(section) or {}
    return next((r for r in body.get("rows", []) if r.get("n") == n), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value and pass (True), fail (False) or None (not run)."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: str | None, ok: bool | None) -> None:
        out.append({"target": name, "measured": value or "not measured", "pass": ok})

    for n, limit in ((15, 1.5), (256, 3.0)):
        row = _row(results, "fanout", n)
        ratio = None if row is None else row.get("ratio")
        add(f"start fan-out at N = {n} within {limit:g}x of N = 1",
            None if ratio is None else f"{ratio:.2f}x ({row['seconds']:.2f} s)",  # type: ignore[index]
            None if ratio is None else ratio <= limit)

    storm_rows = (results.get("storm") or {}).get("rows", [])
    if storm_rows:
        worst = max(storm_rows, key=lambda r: (r["stack_doc_writes"], r["stack_doc_429s"]))
        add(f"at most {STACK_DOC_WRITES} writes of the stack document per run and no 429 on "
            "it (every N, under the limit)",
            f"worst N = {worst['n']}: {worst['stack_doc_writes']} writes, "
            f"{worst['stack_doc_429s']} 429s; lost updates "
            f"{sum(r['lost_updates'] for r in storm_rows)}, ends "
            f"{sorted({r['ended_times'] for r in storm_rows})}",
            all(r["stack_doc_writes"] <= STACK_DOC_WRITES and r["stack_doc_429s"] == 0
                and r["lost_updates"] == 0 and r["ended_times"] == 1 for r in storm_rows))
    else:
        add(f"at most {STACK_DOC_WRITES} writes of the stack document per run and no 429 on it",
            None, None)
    for n, limit in ((15, STORM_LATENCY_S), (64, 3.0)):
        row = _row(results, "storm", n)
        latency = None if row is None else row.get("last_stop_after_last_marker_s")
        add(f"last VM stop within {limit:g} s of the last done marker at N = {n}",
            None if row is None else "-" if latency is None else f"{latency:.2f} s",
            None if row is None else latency is not None and latency <= limit)
    row = _row(results, "storm", 15)
    add(f"each storm (all booted, all done) answered within {STORM_WALL_S:g} s at N = 15",
        None if row is None else f"booted {row['booted_storm_s']:.2f} s, done "
                                 f"{row['done_storm_s']:.2f} s",
        None if row is None else max(row["booted_storm_s"], row["done_storm_s"]) <= STORM_WALL_S)

    rows = (results.get("calls") or {}).get("rows", [])
    if rows:
        worst = max(rows, key=lambda r: r["cloud_calls"] / r["budget_8n_20"])
        add("at most 8N + 20 cloud calls per run (every N)",
            f"{sum(r['within_budget'] for r in rows)}/{len(rows)} N within; worst N = "
            f"{worst['n']}: {worst['cloud_calls']} > {worst['budget_8n_20']}"
            if not all(r["within_budget"] for r in rows)
            else f"all {len(rows)} N within (N = {worst['n']}: {worst['cloud_calls']} of "
                 f"{worst['budget_8n_20']})",
            all(r["within_budget"] for r in rows))
    else:
        add("at most 8N + 20 cloud calls per run (every N)", None, None)

    cold = results.get("cold_import") or {}
    value = cold.get("import_s")
    add(f"cold import of functions/main.py under {COLD_IMPORT_S:g} s",
        None if value is None else f"{value:.3f} s (median of {cold['runs']})",
        None if value is None else value < COLD_IMPORT_S)
    return out


def _verdict(ok: bool | None) -> str:
    return {True: "pass", False: "**fail**", None: "not run"}[ok]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _not_run(title: str, body: dict[str, Any]) -> list[str]:
    if body.get("error"):
        return ["", f"## {title}: broke ({body['error']})"]
    return ["", f"## {title}: not run ({body.get('skipped', 'no figures')})"]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# pcp benchmark",
        "",
        f"{results['generated_at']} · `{results['command']}` · {m['cores']} cores · "
        f"Python {m['python']} · {m['platform']} · load average at start {m['loadavg']}",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['measured']} | {_verdict(t['pass'])} |"
              for t in results["targets"]]

    fan = results.get("fanout")
    if fan and fan.get("rows"):
        lines += ["", f"## Start fan-out ({fan['delay_per_call_s'] * 1000:.0f} ms per Compute "
                  f"call, ComputeFleet max_workers = {fan['default_max_workers']} (default), "
                  f"median of {fan['reps']})", "",
                  "| N | seconds | ratio to N = 1 | calls per VM | floor set by the pool (s) | "
                  "fleet CPU (s) |",
                  "|---|---|---|---|---|---|"]
        for r in fan["rows"]:
            lines.append(f"| {r['n']} | {r['seconds']:.3f} | {_fmt(r['ratio'])} | "
                         f"{r['calls_per_vm']:g} | {fan['pool_floor_s'][str(r['n'])]:.2f} | "
                         f"{_fmt(r.get('cpu_s'))} |")
        for r in fan.get("uncapped", []):
            lines.append(f"| {r['n']} with max_workers = {r['max_workers']} | "
                         f"{r['seconds']:.3f} | {_fmt(r['ratio'])} | {r['calls_per_vm']:g} | "
                         f"{6 * fan['delay_per_call_s']:.2f} | {_fmt(r.get('cpu_s'))} |")
    elif fan:
        lines += _not_run("Start fan-out", fan)

    storm = results.get("storm")
    if storm and storm.get("rows"):
        lines += ["", "## Marker storms under the per-object limit (N + 1 booted markers at "
                  "once, then N + 1 done markers at once, through on_marker)", "",
                  "| N | markers | booted storm (s) | done storm (s) | last stop after last "
                  "marker (s) | stack document writes | its 429s | all 429s | conflicts "
                  "retried | redeliveries | lost updates | run ended | stops per VM |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in storm["rows"]:
            lines.append(
                f"| {r['n']} | {r['markers']} | {r['booted_storm_s']:.3f} | "
                f"{r['done_storm_s']:.3f} | {_fmt(r['last_stop_after_last_marker_s'], 3)} | "
                f"{r['stack_doc_writes']} | {r['stack_doc_429s']} | {r['all_429s']} | "
                f"{r['conflicts']} | {r['redeliveries']} | {r['lost_updates']} | "
                f"{r['ended_times']}x | {r['max_stops_per_vm']} |")
    elif storm:
        lines += _not_run("Marker storm", storm)

    calls = results.get("calls")
    if calls and calls.get("rows"):
        lines += ["", "## Cloud calls per run (start, booted and done for every node, end)", "",
                  "| N | Compute | GCS | Pub/Sub | total | 8N + 20 | within | per node | "
                  "invocations | one sweep tick (C/G/P) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in calls["rows"]:
            s = r["sweep_tick"]
            lines.append(f"| {r['n']} | {r['compute']} | {r['gcs']} | {r['pubsub']} | "
                         f"{r['cloud_calls']} | {r['budget_8n_20']} | "
                         f"{_fmt(r['within_budget'])} | {r['per_node']:g} | "
                         f"{r['invocations']} | {s['compute']}/{s['gcs']}/{s['pubsub']} |")
        last = calls["rows"][-1]
        kinds = "; ".join(f"{svc}: " + ", ".join(f"{k} {v}" for k, v in sorted(d.items()))
                          for svc, d in last["by_kind"].items())
        lines += ["", f"Breakdown at N = {last['n']}: {kinds}."]
    elif calls:
        lines += _not_run("Cloud calls per run", calls)

    cold = results.get("cold_import")
    if cold and cold.get("error"):
        lines += _not_run("Cold import of functions/main.py", cold)
    elif cold and cold.get("import_s") is not None:
        lines += ["", "## Cold import of functions/main.py", "",
                  f"`import main` in a fresh interpreter: median {cold['import_s']:.3f} s of "
                  f"{cold['runs']} ({', '.join(f'{t:.3f}' for t in cold['import_runs_s'])}); "
                  f"whole process {cold['process_wall_s']:.3f} s, a bare interpreter "
                  f"{cold['bare_interpreter_s']:.3f} s; google.cloud.compute_v1 imported: "
                  f"{_fmt(cold['imports_compute_v1'])}."]

    demo = results.get("demo")
    if demo:
        lines += ["", "## Local replica overhead (`python -m pcp_dev.local.demo`)", ""]
        if demo.get("overhead_s") is None:
            lines.append(f"Not measured: {demo.get('reason') or demo.get('error') or 'not run'}")
        else:
            lines.append(
                f"Wall {demo['wall_s']:.1f} s, trainer {demo['trainer_elapsed_s']:.1f} s: "
                f"overhead **{demo['overhead_s']:.1f} s** (replica up after "
                f"{_fmt(demo.get('replica_up_s'), 1)} s; start to every node booted "
                f"{_fmt(demo.get('start_to_all_booted_s'), 1)} s; run start to end "
                f"{_fmt(demo.get('run_duration_s'), 1)} s; report and tear-down "
                f"{_fmt(demo.get('after_final_s'), 1)} s).")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> bool:
    """Three panels: fan-out, storm latency, calls per run. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    fan = (results.get("fanout") or {}).get("rows", [])
    ax = axes[0]
    if fan:
        ax.plot([r["n"] for r in fan], [r["seconds"] for r in fan], "o-",
                label=f"max_workers = {results['fanout']['default_max_workers']}")
        unc = results["fanout"].get("uncapped", [])
        if unc:
            ax.plot([r["n"] for r in unc], [r["seconds"] for r in unc], "s",
                    label="max_workers = N")
        base = next((r["seconds"] for r in fan if r["n"] == 1), None)
        if base is not None:
            ax.axhline(3 * base, color="grey", ls="--", lw=1, label="3x N = 1")
        ax.legend()
    ax.set(title="start fan-out (100 ms per call)", xlabel="workers N", ylabel="seconds",
           xscale="log")
    storm = (results.get("storm") or {}).get("rows", [])
    ax = axes[1]
    if storm:
        ax.plot([r["n"] for r in storm],
                [r["last_stop_after_last_marker_s"] or 0 for r in storm], "o-",
                label="last marker -> last stop")
        ax.axhline(STORM_LATENCY_S, color="grey", ls="--", lw=1, label="2 s target")
        ax.legend()
    ax.set(title="marker storm", xlabel="workers N", ylabel="seconds", xscale="log")
    calls = (results.get("calls") or {}).get("rows", [])
    ax = axes[2]
    if calls:
        ns = [r["n"] for r in calls]
        for key in ("compute", "gcs", "cloud_calls"):
            ax.plot(ns, [r[key] for r in calls], "o-", label=key.replace("_", " "))
        ax.plot(ns, [r["budget_8n_20"] for r in calls], "--", color="grey", label="8N + 20")
        ax.legend()
    ax.set(title="cloud calls per run", xlabel="workers N", ylabel="calls", xscale="log",
           yscale="log")
    ns = results.get("ns") or []
    for ax in axes:
        if ns:
            ax.set_xticks(ns, [str(n) for n in ns])
            ax.minorticks_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
