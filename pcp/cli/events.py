"""`pcp events`: what the control plane did and healed, from the bucket alone.

Three sources, merged by time: the sweep audits (control/sweeps/<time>.json, one row per note,
with the heal it stands for), the run records (runs/<id>/run.json, one row per phase change)
and the nodes' dead-man records (runs/<id>/<node>/power_off.json). The same story the
log-based metrics tell in Cloud Monitoring, for the local replica and for a person without
console access. Kinds are stable: `NoteKind` and `Heal` values, `run_<phase>`,
`hard_cap_stop` (a sweep saw a VM that GCE's maxRunDuration stopped) and
`dead_man_power_off` (docs/architecture.md, "Log lines and metrics").
"""

from __future__ import annotations

from typing import Any

import click

from pcp.cli.options import console, context, echo_json, resources
from pcp.cli.views import load_json
from pcp.core.errors import CorruptState
from pcp.core.names import AUDIT_KINDS, RUNS, SWEEPS, run_doc
from pcp.core.ports import BlobStore
from pcp.core.state import Run

DEAD_MAN = "dead_man_power_off"
HARD_CAP = "hard_cap_stop"
POWER_OFF_FILE = "power_off.json"


def _row(at: Any, kind: str, run_id: Any, source: str, text: Any,
         heal: Any = None) -> dict[str, Any]:
    return {"at": str(at or ""), "kind": kind, "heal": heal, "run_id": run_id,
            "source": source, "text": str(text or "")}


def sweep_rows(store: BlobStore, name: str) -> list[dict[str, Any]]:
    """One row per note of one sweep audit; an audit written before notes were kept gives
    one row per kind."""
    record = load_json(store, name)
    if record is None:
        return []
    at = record.get("at")
    capped = [_row(c.get("stopped_at") or at, HARD_CAP, c.get("run_id"), "sweep",
                   f"{c.get('vm')}: GCE's run-duration cap (maxRunDuration) stopped it")
              for c in record.get("hard_cap_stops") or [] if isinstance(c, dict)]
    notes = record.get("notes")
    if isinstance(notes, list):
        return [_row(at, str(n.get("kind")), n.get("run_id"), "sweep", n.get("text"),
                     n.get("heal")) for n in notes if isinstance(n, dict)] + capped
    kinds = record.get("kinds") or []
    return [_row(at, str(k), None, "sweep", record.get("reason")) for k in kinds] + capped


def run_rows(store: BlobStore, run_id: str) -> list[dict[str, Any]]:
    """One row per phase change in the run record, and its nodes' dead-man power-offs."""
    rows: list[dict[str, Any]] = []
    blob = store.get(run_doc(run_id))
    if blob is not None:
        try:
            run = Run.from_json(blob.data)
        except CorruptState:
            run = None
        if run is not None:
            for h in run.history:
                phase = h.change.rsplit("-> ", 1)[-1].strip()
                text = h.reason
                if phase == "ended" and run.reason is not None and h is run.history[-1]:
                    text = f"{run.reason.value}: {text}"
                rows.append(_row(h.at.isoformat(), f"run_{phase}", run_id, "run", text))
    for name in store.list(f"{RUNS}{run_id}/"):
        if name.endswith(f"/{POWER_OFF_FILE}") and name.count("/") == 3:
            record = load_json(store, name) or {}
            rows.append(_row(record.get("at"), DEAD_MAN, run_id, "node",
                             f"{record.get('node')}: {record.get('reason')}"))
    return rows


def run_ids(store: BlobStore) -> list[str]:
    return sorted({n[len(RUNS):].split("/", 1)[0] for n in store.list(RUNS)
                   if n.endswith("/run.json") and n.count("/") == 2})


def collect(store: BlobStore, run_id: str | None = None,
            kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Every event, oldest first, of one run or all, of the given kinds (kind or heal)."""
    rows: list[dict[str, Any]] = []
    for item in store.scan(SWEEPS):
        said = item.metadata.get(AUDIT_KINDS)  # absent on audits older than audit_metadata
        if said is not None and (said == "-" or (kinds and not set(said.split()) & set(kinds))):
            continue  # its metadata says it holds nothing asked for: not read
        rows.extend(r for r in sweep_rows(store, item.name)
                    if run_id is None or r["run_id"] == run_id)
    for rid in [run_id] if run_id is not None else run_ids(store):
        rows.extend(run_rows(store, rid))
    if kinds:
        rows = [r for r in rows if r["kind"] in kinds or r["heal"] in kinds]
    return sorted(rows, key=lambda r: r["at"])


@click.command()
@resources
@click.option("--run", "run_id", help="only this run's events")
@click.option("--kind", "kinds", multiple=True,
              help="only events of this kind or heal (repeatable): e.g. orphans_stopped, "
                   "run_ended, dead_man_power_off, hard_cap_stop")
@click.option("--limit", type=click.IntRange(1, 100000), default=200, show_default=True,
              help="the newest this many")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def events(run_id: str | None, kinds: tuple[str, ...], limit: int, as_json: bool) -> None:
    """What the control plane did and healed: sweep audits, run records, dead-man stops."""
    from rich.table import Table

    ctx = context()
    rows = collect(ctx.store, run_id, kinds)[-limit:]
    if as_json:
        echo_json({"stack": ctx.stack, "events": rows})
        return
    if not rows:
        click.echo(f"no events on stack {ctx.stack}" + (f" for run {run_id}" if run_id else ""))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("at", "kind", "heal", "run", "source", "what"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["at"], r["kind"], r["heal"] or "", r["run_id"] or "", r["source"],
                      r["text"])
    console().print(table)
