"""`pcp budget status` and `pcp budget resume`: the stack's budget kill switch.

The hold is set by the budget function when the stack's Cloud Billing budget passes its
threshold, and lives in control/stack.json. The CLI never changes state itself: `resume`
publishes a request on the stop topic and the stop function lifts the hold under the same
generation precondition as every other change (docs/reliability.md).
"""

from __future__ import annotations

from typing import Any

import click

from pcp.cli.context import requested_by
from pcp.cli.errors import EXIT_WAIT_TIMEOUT, fail
from pcp.cli.options import context, echo_json, resources
from pcp.cli.views import load_state
from pcp.core.messages import BudgetResume
from pcp.core.state import BudgetState, StackState
from pcp.core.timefmt import iso


def describe(budget: BudgetState, stack: str) -> str:
    if budget.hold is not None:
        hold = budget.hold
        return (f"stack {stack} is on budget hold since {iso(hold.since)}: {hold.text}. Every "
                f"VM is stopped, queued runs wait, new starts are refused. Lift it with "
                f"`pcp budget resume --stack {stack}`.")
    text = f"stack {stack}: no budget hold"
    if budget.period is not None:
        text += f"; newest budget period seen starts {iso(budget.period)}"
    if budget.lifted_at is not None:
        by = f" by {budget.lifted_by}" if budget.lifted_by else ""
        text += (f"; last lifted {iso(budget.lifted_at)}{by} (the period from "
                 f"{iso(budget.lifted) if budget.lifted else '?'} trips it no more)")
    return text


@click.group()
def budget() -> None:
    """The stack's budget kill switch: show it, lift it."""


@budget.command("status")
@resources
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def budget_status(as_json: bool) -> None:
    """Whether the stack is on budget hold, since when and why."""
    ctx = context()
    state = load_state(ctx.store) or StackState()
    if as_json:
        echo_json({"stack": ctx.stack, "held": state.budget.hold is not None,
                   **state.budget.to_dict()})
        return
    click.echo(describe(state.budget, ctx.stack))


@budget.command("resume")
@resources
@click.option("--timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              metavar="SECONDS", help="how long to wait for the hold to be lifted (0: do not)")
def budget_resume(timeout: float) -> None:
    """Lift the budget hold: runs may start again, queued runs first.

    Notifications of the budget period that tripped the hold trip it no more; the next
    period's do. Raise pcp:monthly_budget_usd (pulumi up) to keep a guard this month.
    """
    ctx = context()
    state = load_state(ctx.store) or StackState()
    if state.budget.hold is None:
        click.echo(describe(state.budget, ctx.stack) + "; nothing to resume")
        return
    message_id = ctx.bus.publish("stop", BudgetResume(requested_by()).to_json(),
                                 {"op": "budget_resume"})
    click.echo(f"resume requested on stack {ctx.stack} (message {message_id})", err=True)
    if timeout <= 0:
        return
    started = ctx.monotonic()
    while True:
        now: Any = load_state(ctx.store) or StackState()
        if now.budget.hold is None:
            click.echo(describe(now.budget, ctx.stack))
            return
        if ctx.monotonic() - started >= timeout:
            fail(f"the hold is not lifted after {timeout:g} s: is the stop function up? "
                 f"(`pcp doctor --stack {ctx.stack}`)", EXIT_WAIT_TIMEOUT)
        ctx.sleep(min(2.0, timeout))
