"""`pcp run`: publish a start request and, with --wait, follow the run to its end."""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from datetime import datetime
from typing import Any

import click

from pcp.cli.context import Context, requested_by, utcnow
from pcp.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, EXIT_WAIT_TIMEOUT, fail
from pcp.cli.options import FLAGS, console, context, echo_json, resources
from pcp.cli.views import WaitTimeout, follow
from pcp.core.errors import PermanentError
from pcp.core.messages import LAYOUTS, StartRequest
from pcp.core.state import Status


def new_run_id(now: datetime) -> str:
    """r-YYYYMMDD-HHMMSS-xxxx: sortable by time, unique enough for one team."""
    return f"r-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _binary(ref: str) -> Any:
    if not ref.lstrip().startswith("{"):
        return ref
    try:
        return json.loads(ref)
    except ValueError as e:
        fail(f"--binary looks like a JSON platform map but is not JSON: {e}", EXIT_USAGE)


@click.command()
@resources
@click.option("--keep-vm-alive", is_flag=True, help="leave the VMs running after the run "
                                                    "(a lease of keep_alive_hours)")
@click.option("--config", "training_config", metavar="ARGS",
              help="extra arguments for the binary, split like a shell would (none runs)")
@click.option("--binary", metavar="REF", help="flake reference or store path, or a JSON map "
                                              "platform -> store path")
@click.option("--max-hours", type=float, help="deadline in hours (capped by the stack)")
@click.option("--max-restarts", type=int, help="restarts after a lost node or boot timeout")
@click.option("--layout", type=click.Choice(LAYOUTS), help="rank layout (docs/agent.md); "
                                                          "default: the stack's")
@click.option("--run-id", help="fix the run id (default r-YYYYMMDD-HHMMSS-xxxx)")
@click.option("--wait", is_flag=True, help="follow the run until it ends; exit 0 on success")
@click.option("--timeout", type=float, metavar="SECONDS", help="with --wait: stop waiting "
                                                                "after this long (exit 3)")
@click.option("--poll", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="with --wait: how often to read the state")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def run(keep_vm_alive: bool, training_config: str | None, binary: str | None,
        max_hours: float | None, max_restarts: int | None, layout: str | None,
        run_id: str | None, wait: bool, timeout: float | None, poll: float,
        as_json: bool) -> None:
    """Request a training run; print its id (and with --wait, follow it to the end)."""
    flags = click.get_current_context().meta.get(FLAGS, {})
    body: dict[str, Any] = {"run_id": run_id or new_run_id(utcnow()),
                            "keep_vm_alive": keep_vm_alive, "requested_by": requested_by()}
    if training_config is not None:
        body["training_config"] = training_config
    if binary is not None:
        body["binary"] = _binary(binary)
    if max_hours is not None:
        body["max_hours"] = max_hours
    if max_restarts is not None:
        body["max_restarts"] = max_restarts
    if layout is not None:
        body["layout"] = layout
    if flags.get("stack"):
        body["stack"] = flags["stack"]
    try:  # the control plane's own parser: what fails here would be rejected there
        request = StartRequest.from_dict(body)
    except PermanentError as e:
        fail(str(e), EXIT_USAGE)
    ctx = context()
    if request.stack is None:
        request = replace(request, stack=ctx.stack)
    message_id = ctx.bus.publish("start", request.to_json(), {"run_id": request.run_id})
    if not wait:
        if as_json:
            echo_json({"run_id": request.run_id, "stack": ctx.stack, "message_id": message_id,
                       "request": request.to_dict()})
            return
        click.echo(request.run_id)
        click.echo(f"requested on stack {ctx.stack} (message {message_id}); follow it with "
                   f"`pcp status {request.run_id} --stack {ctx.stack}`", err=True)
        return
    if not as_json:
        click.echo(request.run_id)
    view = wait_for(ctx, request.run_id, timeout=timeout, poll=poll, quiet=as_json)
    if as_json:
        echo_json({**view.to_dict(), "message_id": message_id})
    else:
        from pcp.cli.render import run_renderable

        console().print(run_renderable(view, ctx.stack))
    if view.status is not Status.SUCCEEDED:
        from pcp.cli.render import outcome

        fail(outcome(view))


def wait_for(ctx: Context, run_id: str, *, timeout: float | None, poll: float,
             quiet: bool) -> Any:
    """Follow a run to its end. Interrupting or timing out stops the waiting, not the run."""
    from pcp.cli.render import Progress

    try:
        with Progress(console(), run_id, ctx.monotonic, quiet=quiet) as show:
            return follow(ctx.store, run_id, on_view=show, sleep=ctx.sleep,
                          monotonic=ctx.monotonic, poll=poll, timeout=timeout)
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; run {run_id} goes on. To stop it: "
                   f"pcp stop {run_id} --stack {ctx.stack}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except WaitTimeout as e:
        fail(f"{e}; the run goes on: `pcp status {run_id} --stack {ctx.stack}`",
             EXIT_WAIT_TIMEOUT)
