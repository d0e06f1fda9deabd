"""The seeded, randomised fault campaign: many short schedules, one table of outcomes.

Each schedule draws a stack size, a handful of start and stop requests, a random subset of
fault kinds with their rates, and world faults (preemptions, maintenance and preemption
notices, a dying shepherd, a deleted stack document) from its own seed, then plays them
through pcp/faults/world.py. The invariants are
checked during and after the schedule; a schedule that breaks one is reported with its seed and
its trace, and `python -m pcp_dev.faults --replay SEED` plays it again, step by step.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from pcp.core.messages import BudgetNotification, StartRequest
from pcp.core.policy import Policy
from pcp_dev.faults.world import Plan, Report, World
from pcp_dev.faults.wrappers import Fault, FaultService

# Rates for the faults drawn per call or per event; each schedule enables a random subset.
# Storage and Compute rates are what is left after the client libraries' own retries.
RATES: dict[Fault, float] = {
    Fault.DUPLICATE: 0.2,
    Fault.DELAY: 0.1,
    Fault.REORDER: 0.3,
    Fault.DROP_MARKER: 0.2,
    Fault.CRASH: 0.08,
    Fault.CRASH_MID: 0.08,
    Fault.STORE_5XX: 0.02,
    Fault.STORE_TIMEOUT: 0.02,
    Fault.FLEET_5XX: 0.05,
    Fault.FLEET_TIMEOUT: 0.05,
    Fault.FLEET_PARTIAL: 0.2,
    Fault.BUS_5XX: 0.05,
    Fault.BUS_TIMEOUT: 0.05,
    Fault.CAPACITY: 0.1,
    Fault.AGENT_HUNG: 0.05,
    Fault.NODE_FAILS: 0.05,
}
ENABLE = 0.4  # chance that a schedule enables a given fault kind
WORKER_COUNTS = (1, 1, 2, 2, 3, 4, 7)
VIOLATIONS = ("double_start", "stray_vm", "past_deadline", "vm_left_running",
              "run_not_terminal", "terminal_changed", "terminal_mismatch", "not_quiet",
              "held_run_active", "held_vm_running", "budget_tripped_wrongly", "cap_exceeded")
BUDGET = 0.25  # chance that a schedule's stack has a budget that gets notifications
BUDGET_ID, BILLING_ACCOUNT = "camp-budget", "000000-000000-000000"
#: The budget periods notifications name: this month's, and last month's (stale).
PERIOD = datetime(2026, 11, 1, 7, 0, tzinfo=UTC)
LAST_PERIOD = datetime(2026, 10, 1, 7, 0, tzinfo=UTC)


def draw_budget(rng: random.Random) -> list[tuple[float, BudgetNotification, Fault]]:
    """Several notifications a few hours apart, as Cloud Billing sends them: spend under the
    budget, then maybe over it; some of last month (late), some of another budget."""
    out = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice((Fault.BUDGET_UNDER, Fault.BUDGET_OVER, Fault.BUDGET_OVER,
                           Fault.BUDGET_STALE, Fault.BUDGET_FOREIGN))
        cost = rng.uniform(101.0, 300.0) if kind is not Fault.BUDGET_UNDER else \
            rng.uniform(0.0, 99.0)
        n = BudgetNotification(
            BILLING_ACCOUNT, "other-budget" if kind is Fault.BUDGET_FOREIGN else BUDGET_ID,
            round(cost, 2), 100.0, LAST_PERIOD if kind is Fault.BUDGET_STALE else PERIOD, "USD",
            "pcp-camp", "SPECIFIED_AMOUNT", 1.0 if cost >= 100 else None)
        out.append((rng.uniform(0.0, 170.0), n, kind))
    return sorted(out, key=lambda item: item[0])


def schedule_seed(campaign_seed: int, index: int) -> int:
    """The seed of schedule `index`: printed on failure, accepted by --replay."""
    return campaign_seed * 1_000_000 + index


def draw_plan(rng: random.Random) -> Plan:
    """One schedule: short runs on a small stack, with faults in the first three hours."""
    policy = Policy(stack="camp", worker_count=rng.choice(WORKER_COUNTS),
                    shepherd_host="shepherd.invalid", max_run_hours=1.0,
                    boot_timeout_minutes=10.0, keep_alive_hours=0.5, sweep_interval_minutes=5.0,
                    default_binary="github:example/trainer#train", worker_hourly_usd=1.0,
                    budget_id=BUDGET_ID, billing_account=BILLING_ACCOUNT)
    rates = {f: r for f, r in RATES.items() if rng.random() < ENABLE}
    ids = [f"run-{i}" for i in range(rng.randint(1, 4))]
    requests = []
    for run_id in ids:
        request = StartRequest(run_id=run_id, keep_vm_alive=rng.random() < 0.2,
                               max_restarts=rng.choice((0, 0, 1, 2)),
                               max_hours=rng.choice((None, None, 0.5, 2.0)),
                               stack="elsewhere" if rng.random() < 0.05 else None)
        requests.append((rng.uniform(0.0, 120.0), request, 2 if rng.random() < 0.2 else 1))
    plan = Plan(policy=policy, rates=rates, requests=requests, first_tick=rng.uniform(0.0, 5.0),
                deadman=rng.random() >= 0.4)
    if rng.random() < 0.15:
        plan.invalid.append((rng.uniform(0.0, 120.0), "bad-request"))
    if rng.random() < 0.25:
        plan.stops.append((rng.uniform(0.0, 150.0), rng.choice([*ids, "ghost"])))
    if rng.random() < ENABLE:
        plan.preemptions = [rng.uniform(0.0, 180.0) for _ in range(rng.randint(1, 2))]
    if rng.random() < ENABLE:
        plan.notices = [(rng.uniform(0.0, 180.0), rng.choice(("maintenance", "preempted")))
                        for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.3:
        plan.shepherd_deaths.append((rng.uniform(0.0, 150.0), rng.uniform(5.0, 90.0)))
    if rng.random() < 0.1:
        plan.doc_deletions.append(rng.uniform(5.0, 150.0))
    if rng.random() < BUDGET:
        plan.budget = draw_budget(rng)
    if rng.random() < 0.3:  # dollar caps (at $1/h per worker: minutes to an hour)
        plan.requests = [(m, replace(r, max_cost_usd=rng.choice((0.1, 0.3, 1.0, 2.5))), n)
                         for m, r, n in plan.requests]
    return plan


def run_schedule(seed: int, *,
                 service: Callable[..., FaultService] = FaultService) -> Report:
    """Draw schedule `seed` and play it. `service` swaps the service class (mutation tests).

    The plan and the world draw from separate generators, both derived from the seed.
    """
    return World(draw_plan(plan_rng(seed)), seed, service=service).run()


def plan_rng(seed: int) -> random.Random:
    return random.Random(f"plan-{seed}")


@dataclass
class Tally:
    schedules: int = 0
    seconds: float = 0.0
    sim_hours: float = 0.0
    faults: Counter[str] = field(default_factory=Counter)
    fault_schedules: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    heals: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    failed: list[Report] = field(default_factory=list)

    def add(self, report: Report) -> None:
        self.schedules += 1
        self.sim_hours += report.sim_minutes / 60
        self.faults.update(report.faults)
        self.fault_schedules.update({k: 1 for k, n in report.faults.items() if n})
        self.outcomes.update(report.outcomes)
        self.heals.update(report.heals)
        self.violations.update(v.split(":", 1)[0] for v in report.violations)
        if report.violations:
            self.failed.append(report)

    @property
    def total_violations(self) -> int:
        return sum(self.violations.values())


def run_campaign(schedules: int, seed: int,
                 progress: Callable[[int], None] | None = None) -> Tally:
    tally = Tally()
    started = time.perf_counter()
    for i in range(schedules):
        tally.add(run_schedule(schedule_seed(seed, i)))
        if progress is not None:
            progress(i + 1)
    tally.seconds = time.perf_counter() - started
    return tally


def table(tally: Tally, seed: int) -> str:
    """Faults injected against outcomes, as plain aligned text."""
    per = tally.seconds / max(tally.schedules, 1)
    out = [f"pcp fault campaign: {tally.schedules} schedules, seed {seed}, "
           f"{tally.seconds:.1f} s wall ({per * 1000:.1f} ms per schedule), "
           f"{tally.sim_hours:.0f} simulated hours", ""]

    def section(title: str, head: str, rows: list[tuple[str, str]]) -> None:
        out.append(f"{title:<44}{head}")
        out.append("-" * (44 + len(head)))
        out.extend(f"{name:<44}{value}" for name, value in rows)
        out.append("")

    section("fault injected", f"{'count':>10}{'schedules':>11}",
            [(f.value, f"{tally.faults[f.value]:>10}{tally.fault_schedules[f.value]:>11}")
             for f in Fault])
    section("run outcome", f"{'runs':>10}",
            [(k, f"{n:>10}") for k, n in sorted(tally.outcomes.items())])
    section("healing", f"{'count':>10}",
            [(k, f"{n:>10}") for k, n in sorted(tally.heals.items())])
    rows = [(k, f"{tally.violations[k]:>10}") for k in VIOLATIONS]
    rows.append(("total (must be 0)", f"{tally.total_violations:>10}"))
    section("invariant violations", f"{'count':>10}", rows)
    return "\n".join(out)


def failure_text(report: Report, lines: int = 400) -> str:
    head = [f"schedule seed {report.seed} broke {len(report.violations)} invariant(s):",
            *(f"  {v}" for v in report.violations),
            f"replay: python -m pcp_dev.faults --replay {report.seed}", "trace:"]
    trace = report.trace if len(report.trace) <= lines else \
        ["  ...", *report.trace[-lines:]]
    return "\n".join([*head, *(f"  {t}" for t in trace)])
