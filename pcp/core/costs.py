"""What a stack costs while it runs nothing, and what its runs cost: pure arithmetic.

A stopped VM bills no machine or GPU time, but it keeps billing its persistent disks; a
reserved static address bills by the hour, in use or not; a Cloud NAT gateway bills per VM
that uses it (running VMs only, so nothing for a stopped fleet) plus its data. The disks and
addresses are read from Compute Engine (`pcp cost`, `pcp doctor`); the prices come from a
table with defaults (`DEFAULT_PRICES`, list prices in us-central1 as of `PRICES_AS_OF`) that
a stack overrides key by key (`pcp:prices` in Pulumi.<stack>.yaml, or `PCP_PRICES` as JSON).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from pcp.core.errors import PermanentError

HOURS_PER_MONTH = 730.0  # how Google Cloud prices a month
PRICES_AS_OF = "2025-06, us-central1 list prices"
#: USD. Disks per GB-month by type; addresses and NAT gateways per hour; `worker_hour` (one
#: worker VM's hourly price, for the keep-alive lease) comes from the stack's own price.
DEFAULT_PRICES: dict[str, float] = {
    "pd-standard": 0.04,
    "pd-balanced": 0.10,
    "pd-ssd": 0.17,
    "pd-extreme": 0.125,
    "hyperdisk-balanced": 0.08,
    "static_address_hour": 0.01,  # a reserved external IPv4 address not in use
    "static_address_in_use_hour": 0.005,  # one in use (by a running VM or a NAT gateway)
    "nat_gateway_hour": 0.0,  # per VM-hour of running VMs only: none while the fleet is idle
    "worker_hour": 0.0,
}
DISK_TYPES = tuple(k for k in DEFAULT_PRICES if k.startswith(("pd-", "hyperdisk-")))


def prices(overrides: Mapping[str, object] | str | None = None,
           what: str = "prices") -> dict[str, float]:
    """The default table with `overrides` (a mapping, or its JSON text) applied strictly:
    an unknown key or a negative or non-numeric price is a PermanentError."""
    if overrides is None or overrides == "":
        return dict(DEFAULT_PRICES)
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except ValueError as e:
            raise PermanentError(f"{what} is not a JSON object: {e}") from None
    if not isinstance(overrides, Mapping):
        raise PermanentError(f"{what} must be an object of prices, got "
                             f"{type(overrides).__name__}")
    out = dict(DEFAULT_PRICES)
    for key, value in overrides.items():
        if key not in DEFAULT_PRICES:
            raise PermanentError(f"{what}: unknown price {key!r}; known: "
                                 f"{', '.join(DEFAULT_PRICES)}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise PermanentError(f"{what}: {key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 \
                or value == float("inf"):
            raise PermanentError(f"{what}: {key} must be a number >= 0, got {value!r}")
        out[str(key)] = float(value)
    return out


@dataclass(frozen=True)
class Disk:
    name: str
    size_gb: int
    type: str  # the last part of the disk's type URL: pd-balanced, ...
    users: tuple[str, ...] = ()  # the instances it is attached to (their names)


@dataclass(frozen=True)
class Address:
    name: str
    status: str  # RESERVED, IN_USE (RESERVING while created)
    users: tuple[str, ...] = ()  # what uses it: an instance or a router (NAT), by URL


@dataclass(frozen=True)
class Line:
    kind: str  # disk, address, nat
    name: str
    detail: str
    hourly_usd: float

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "detail": self.detail,
                "hourly_usd": round(self.hourly_usd, 6),
                "daily_usd": round(self.hourly_usd * 24, 4),
                "monthly_usd": round(self.hourly_usd * HOURS_PER_MONTH, 2)}


@dataclass(frozen=True)
class Standing:
    """The stack's standing cost: one line per billed thing."""

    lines: tuple[Line, ...] = ()
    unpriced: tuple[str, ...] = field(default=())  # disk types with no price in the table

    @property
    def hourly_usd(self) -> float:
        return sum(line.hourly_usd for line in self.lines)

    @property
    def daily_usd(self) -> float:
        return self.hourly_usd * 24

    @property
    def monthly_usd(self) -> float:
        return self.hourly_usd * HOURS_PER_MONTH

    def to_dict(self) -> dict[str, object]:
        return {"hourly_usd": round(self.hourly_usd, 6), "daily_usd": round(self.daily_usd, 4),
                "monthly_usd": round(self.monthly_usd, 2),
                "lines": [line.to_dict() for line in self.lines],
                "unpriced": list(self.unpriced)}


def standing(disks: Iterable[Disk], addresses: Iterable[Address],
             table: Mapping[str, float]) -> Standing:
    """Disks by GB-month of their type; addresses by hour (in use or reserved); one NAT
    gateway per router that uses one of the addresses, at `nat_gateway_hour`."""
    lines: list[Line] = []
    unpriced: list[str] = []
    for d in sorted(disks, key=lambda d: d.name):
        price = table.get(d.type)
        if price is None:
            unpriced.append(f"disk {d.name} ({d.type})")
            continue
        lines.append(Line("disk", d.name, f"{d.size_gb} GB {d.type}",
                          d.size_gb * price / HOURS_PER_MONTH))
    routers: set[str] = set()
    for a in sorted(addresses, key=lambda a: a.name):
        in_use = a.status == "IN_USE"
        key = "static_address_in_use_hour" if in_use else "static_address_hour"
        routers.update(u for u in a.users if "/routers/" in u)
        lines.append(Line("address", a.name, "in use" if in_use else "reserved, not in use",
                          table[key]))
    for r in sorted(routers):
        lines.append(Line("nat", r.rsplit("/", 1)[-1], "Cloud NAT gateway",
                          table["nat_gateway_hour"]))
    return Standing(tuple(lines), tuple(unpriced))


def lease_hours(ended_at: float | None, keep_alive_until: float | None) -> float:
    """The keep-alive lease a run asked for, in hours (epoch seconds in): counted in the run."""
    if ended_at is None or keep_alive_until is None:
        return 0.0
    return max(keep_alive_until - ended_at, 0.0) / 3600.0
