"""`pcp cost`: what the stack costs standing idle, and what its runs cost, by day.

The standing cost is read from Compute Engine, not assumed: the stack's VMs (label
`pcp-stack`), the persistent disks attached to them or labelled with the stack (`disks.list`
of the zone), and the addresses the stack reserved or uses (`addresses.list` of the region: the
workers' egress address, one labelled with the stack, one a stack VM uses), each NAT gateway
found among those addresses' users. They are priced with the stack's table
(`pcp.core.costs`). The runs come from the stack document's recent ends with their archived
records: the estimated cost of every attempt, plus the keep-alive lease the run asked for.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import click

from pcp.cli.context import Context
from pcp.cli.errors import EXIT_USAGE, fail
from pcp.cli.options import console, context, echo_json, resources
from pcp.cli.views import load_run, load_state
from pcp.core import costs
from pcp.core.errors import PermanentError
from pcp.core.names import LABEL_STACK, Names
from pcp.core.state import StackState


class InventoryError(Exception):
    """Compute Engine could not be read; the message says why in one line."""


class ComputeInventory:
    """`instances.list`, `disks.list` and `addresses.list` over Compute Engine's REST API (the
    CLI carries no Compute client library), following `nextPageToken`. `session` is a
    requests-like session: google-auth's AuthorizedSession, or a plain one for the replica."""

    def __init__(self, session: Any, endpoint: str = "https://compute.googleapis.com") -> None:
        self.session = session
        self.endpoint = endpoint.rstrip("/")

    def _list(self, path: str, flt: str | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token = None
        for _ in range(100):  # 500 items a page: far more than a stack has
            params = {"maxResults": "500", **({"filter": flt} if flt else {}),
                      **({"pageToken": token} if token else {})}
            try:
                response = self.session.get(f"{self.endpoint}/compute/v1/{path}",
                                            params=params, timeout=30)
            except OSError as e:
                raise InventoryError(f"{path}: {e}") from None
            if response.status_code >= 400:
                try:
                    message = response.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = response.text[:200]
                raise InventoryError(f"{path}: HTTP {response.status_code}: {message}")
            body = response.json()
            items.extend(i for i in body.get("items", []) if isinstance(i, dict))
            token = body.get("nextPageToken")
            if not token:
                break
        return items

    def stack(self, project: str, zone: str, region: str,
              stack: str) -> tuple[list[costs.Disk], list[costs.Address], int]:
        """The stack's disks and addresses, and how many of its VMs there are."""
        vms = self._list(f"projects/{project}/zones/{zone}/instances",
                         f'labels.{LABEL_STACK} = "{stack}"')
        links = {str(v.get("selfLink", "")) for v in vms}
        names = {str(v.get("name", "")) for v in vms}
        disks = []
        for d in self._list(f"projects/{project}/zones/{zone}/disks"):
            users = tuple(str(u) for u in d.get("users", []))
            labelled = (d.get("labels") or {}).get(LABEL_STACK) == stack
            if not labelled and not any(u in links or u.rsplit("/", 1)[-1] in names
                                        for u in users):
                continue
            try:
                size = int(d.get("sizeGb", 0))
            except (TypeError, ValueError):
                size = 0
            disks.append(costs.Disk(str(d.get("name")), size,
                                    str(d.get("type", "")).rsplit("/", 1)[-1],
                                    tuple(u.rsplit("/", 1)[-1] for u in users)))
        egress = Names(stack).egress_address
        addresses = []
        for a in self._list(f"projects/{project}/regions/{region}/addresses"):
            users = tuple(str(u) for u in a.get("users", []))
            ours = (a.get("name") == egress or (a.get("labels") or {}).get(LABEL_STACK) == stack
                    or any(u in links for u in users))
            if ours:
                addresses.append(costs.Address(str(a.get("name")), str(a.get("status", "")),
                                               users))
        return disks, addresses, len(vms)


@dataclass(frozen=True)
class Report:
    stack: str
    standing: costs.Standing | None
    standing_error: str | None
    vms: int
    month: str
    runs: list[dict[str, Any]]
    table: dict[str, float]

    @property
    def runs_usd(self) -> float:
        return round(sum(r["cost_usd"] for r in self.runs), 4)

    def by_day(self) -> dict[str, dict[str, float]]:
        days: dict[str, dict[str, float]] = defaultdict(lambda: {"runs": 0, "cost_usd": 0.0})
        for r in self.runs:
            day = days[r["day"]]
            day["runs"] += 1
            day["cost_usd"] = round(day["cost_usd"] + r["cost_usd"], 4)
        return dict(sorted(days.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "stack": self.stack, "month": self.month,
            "standing": None if self.standing is None else self.standing.to_dict(),
            "standing_error": self.standing_error, "vms": self.vms,
            "prices": self.table, "prices_as_of": costs.PRICES_AS_OF,
            "runs": self.runs, "runs_usd": self.runs_usd,
            "by_day": self.by_day(), "by_stack": {self.stack: self.runs_usd},
        }


def price_table(ctx: Context) -> dict[str, float]:
    raw = ctx.config.prices if ctx.config is not None else None
    try:
        return costs.prices(raw, "the stack's prices (PCP_PRICES or the outputs' prices)")
    except PermanentError as e:
        fail(str(e), EXIT_USAGE)


def standing_cost(ctx: Context, table: dict[str, float]
                  ) -> tuple[costs.Standing | None, str | None, int]:
    """The standing cost, or why it could not be read."""
    config = ctx.config
    inventory = ctx.inventory
    if inventory is None or config is None:
        return None, "no Compute Engine in this context", 0
    if not config.zone:
        return None, "zone unknown: set PCP_ZONE or pass --outputs", 0
    region = config.region or config.zone.rsplit("-", 1)[0]
    try:
        disks, addresses, vms = inventory.stack(config.project, config.zone, region, ctx.stack)
    except InventoryError as e:
        return None, f"{e} (needs compute.instances.list, compute.disks.list and " \
                     "compute.addresses.list, e.g. roles/compute.viewer)", 0
    return costs.standing(disks, addresses, table), None, vms


def run_costs(state: StackState, load: Any, month: str,
              table: dict[str, float]) -> list[dict[str, Any]]:
    """The month's ended runs (by start day), each with its attempts' estimated cost plus the
    keep-alive lease it asked for (its full length, at `worker_hour` per worker VM)."""
    rows = []
    for line in state.recent:
        began = line.started_at or line.ended_at
        if began.strftime("%Y-%m") != month:
            continue
        record = load(line.run_id)
        lease_h = 0.0
        workers = 0
        if record is not None and record.keep_alive_until is not None:
            lease_h = costs.lease_hours(line.ended_at.timestamp(),
                                        record.keep_alive_until.timestamp())
            workers = sum(1 for n in record.nodes if n.name.startswith("worker-"))
        lease_usd = round(lease_h * workers * table["worker_hour"], 4)
        rows.append({"run_id": line.run_id, "day": began.strftime("%Y-%m-%d"),
                     "status": line.status.value, "reason": line.reason.value,
                     "run_usd": line.cost_usd or 0.0, "keep_alive_hours": round(lease_h, 3),
                     "keep_alive_usd": lease_usd,
                     "cost_usd": round((line.cost_usd or 0.0) + lease_usd, 4)})
    return sorted(rows, key=lambda r: (r["day"], r["run_id"]))


def report(ctx: Context, month: str) -> Report:
    table = price_table(ctx)
    standing, error, vms = standing_cost(ctx, table)
    state = load_state(ctx.store) or StackState()
    runs = run_costs(state, lambda rid: load_run(ctx.store, rid), month, table)
    return Report(ctx.stack, standing, error, vms, month, runs, table)


def usd(value: float) -> str:
    return f"${value:,.2f}" if value >= 0.01 or value == 0 else f"${value:.4f}"


@click.command("cost")
@resources
@click.option("--month", metavar="YYYY-MM", help="the month of the runs (default: this one)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def cost(month: str | None, as_json: bool) -> None:
    """The stack's standing cost (disks, addresses, NAT) and its runs' cost by day."""
    ctx = context()
    if month is not None:
        try:
            datetime.strptime(month, "%Y-%m")
        except ValueError:
            fail(f"--month {month!r}: use YYYY-MM, e.g. 2026-12", EXIT_USAGE)
    rep = report(ctx, month or ctx.clock().strftime("%Y-%m"))
    if as_json:
        echo_json(rep.to_dict())
        return
    from rich.table import Table

    out = console()
    if rep.standing is None:
        out.print(f"[bold]standing cost[/]: unknown ({rep.standing_error})")
    else:
        s = rep.standing
        out.print(f"[bold]standing cost of stack {rep.stack}[/] ({rep.vms} VMs, billed while "
                  f"stopped): {usd(s.daily_usd)}/day, {usd(s.monthly_usd)}/month "
                  f"[dim](prices as of {costs.PRICES_AS_OF})[/]")
        lines = Table(box=None, pad_edge=False)
        for col in ("kind", "name", "what", "per day", "per month"):
            lines.add_column(col)
        for line in s.lines:
            lines.add_row(line.kind, line.name, line.detail, usd(line.hourly_usd * 24),
                          usd(line.hourly_usd * costs.HOURS_PER_MONTH))
        out.print(lines)
        for what in s.unpriced:
            out.print(f"not priced (no price in the table): {what}")
    out.print(f"[bold]runs in {rep.month}[/]: {len(rep.runs)}, {usd(rep.runs_usd)} "
              "(estimated: node-hours at the stack's hourly prices, with keep-alive leases)")
    if rep.runs:
        days = Table(box=None, pad_edge=False)
        for col in ("day", "runs", "cost"):
            days.add_column(col)
        for day, d in rep.by_day().items():
            days.add_row(day, str(int(d["runs"])), usd(d["cost_usd"]))
        out.print(days)


def doctor_line(ctx: Context) -> tuple[str, str]:
    """`pcp doctor`'s standing-cost check: (status, text)."""
    table = costs.prices(ctx.config.prices if ctx.config is not None else None)
    standing, error, vms = standing_cost(ctx, table)
    if standing is None:
        return "skip", f"not read: {error}"
    state = load_state(ctx.store) or StackState()
    month = ctx.clock().strftime("%Y-%m")
    runs = run_costs(state, lambda rid: load_run(ctx.store, rid), month, table)
    total = sum(r["cost_usd"] for r in runs)
    return "ok", (f"{usd(standing.daily_usd)}/day, {usd(standing.monthly_usd)}/month while "
                  f"idle ({len(standing.lines)} billed items of {vms} VMs); runs this month "
                  f"{usd(total)} (pcp cost)")
