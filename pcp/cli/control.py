"""`pcp stop` and `pcp sweep`: requests that change what the control plane does."""

from __future__ import annotations

import json

import click

from pcp.cli.context import requested_by
from pcp.cli.errors import EXIT_USAGE, fail
from pcp.cli.options import context, resources, run_arg, unknown_run
from pcp.cli.views import find_run
from pcp.core.errors import PermanentError
from pcp.core.messages import StopRequest, SweepTick


@click.command()
@resources
@click.argument("run_id")
@click.option("--reason", default="stop requested", show_default=True)
@click.option("--grace", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="keep looking this long for a run that was just requested")
@click.option("--missing-ok", is_flag=True, help="an unknown run is not an error")
def stop(run_id: str, reason: str, grace: float, missing_ok: bool) -> None:
    """Stop a run (or remove it from the queue, or end its keep-alive lease)."""
    ctx = context()
    run_id = run_arg(ctx, run_id)
    try:
        request = StopRequest.from_json(json.dumps(
            {"run_id": run_id, "reason": reason, "requested_by": requested_by()}))
    except PermanentError as e:
        fail(str(e), EXIT_USAGE)
    started = ctx.monotonic()
    view = find_run(ctx.store, run_id)
    while view is None and ctx.monotonic() - started < grace:
        ctx.sleep(min(2.0, grace))
        view = find_run(ctx.store, run_id)
    if view is None:
        if missing_ok:
            click.echo(f"run {run_id} is unknown on stack {ctx.stack}; nothing to stop")
            return
        unknown_run(ctx, run_id)
    if view.final and view.lease is None:
        click.echo(f"run {run_id} already ended ({view.status.value}); nothing to stop")
        return
    what = ("its kept-alive VMs" if view.final else
            f"queued at position {view.position}" if view.position else view.status.value)
    message_id = ctx.bus.publish("stop", request.to_json(), {"run_id": run_id})
    click.echo(f"stop requested for run {run_id} ({what}) on stack {ctx.stack} "
               f"(message {message_id})")


@click.command()
@resources
def sweep() -> None:
    """Run the stack's sweeper now (the level-triggered safety net)."""
    ctx = context()
    if ctx.local:
        message_id = ctx.bus.publish("sweep", SweepTick(requested_by()).to_json())
        click.echo(f"no Cloud Scheduler in the local replica: published a sweep tick to "
                   f"{ctx.topic('sweep')} directly (message {message_id})")
        return
    job = ctx.job_name
    if job is None:
        fail("the sweep job's region is unknown: pass --region, set PCP_REGION or pass "
             "--outputs")
    from google.api_core.exceptions import NotFound

    try:
        ctx.scheduler.run_job(name=job)
    except NotFound:
        fail(f"the scheduler job {job} does not exist: run `pulumi up` for stack {ctx.stack}")
    click.echo(f"ran Cloud Scheduler job {job}; its sweep writes control/sweeps/ within seconds")
