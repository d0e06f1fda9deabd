"""`pcp run`: publish a start request and, with --wait, follow the run to its end."""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from datetime import datetime
from typing import Any

import click

from pcp.cli.context import Context, requested_by, unreachable, utcnow
from pcp.cli.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    fail,
    one_line,
)
from pcp.cli.options import FLAGS, console, context, echo_json, resources
from pcp.cli.views import (
    ACCEPT_WITHIN_S,
    LogTail,
    NotAccepted,
    Unreachable,
    WaitTimeout,
    failures,
    find_run,
    follow,
    last_lines,
)
from pcp.core.errors import PermanentError
from pcp.core.messages import LAYOUTS, TORCHRUN_PREFIX, GpuIdle, StartRequest
from pcp.core.names import POLICY_DOC
from pcp.core.policy import Policy
from pcp.core.state import Status


def new_run_id(now: datetime) -> str:
    """r-YYYYMMDD-HHMMSS-xxxx: sortable by time, unique enough for one team."""
    return f"r-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _check_ref(ref: Any, what: str) -> None:
    """A flake reference or a store path is one word: `not a ref` would only fail on the
    nodes, later, with exit 127."""
    if isinstance(ref, str) and (not ref or any(c.isspace() for c in ref)):
        fail(f"{what} {ref!r} is not a flake reference or a store path (no spaces: e.g. "
             "github:owner/repo#train, .#train or /nix/store/...-train)", EXIT_USAGE)


def _binary(ref: str) -> Any:
    if ref.startswith(TORCHRUN_PREFIX):
        return ref  # the core's parser checks it, with the forms in its message
    if not ref.lstrip().startswith("{"):
        _check_ref(ref, "--binary")
        return ref
    try:
        mapping = json.loads(ref)
    except ValueError as e:
        fail(f"--binary looks like a JSON platform map but is not JSON: {e}", EXIT_USAGE)
    if isinstance(mapping, dict):
        for platform, value in mapping.items():
            _check_ref(value, f"--binary for {platform}")
    return mapping


#: What a request asks for; `requested_by` and `stack` say who and where, not what.
SAME_REQUEST = ("keep_vm_alive", "training_config", "binary", "image", "max_hours",
                "max_restarts", "max_cost_usd")


def _reused(ctx: Context, request: StartRequest) -> Any:
    """The run that already has this id, or None. A different request under a used id is
    refused: the control plane would drop it as a duplicate and the old run would be
    reported as its result."""
    view = find_run(ctx.store, request.run_id)
    if view is None:
        return None
    old = view.run.request.to_dict() if view.run is not None else None
    new = request.to_dict()
    if old is None or any(old.get(k) != new.get(k) for k in SAME_REQUEST):
        fail(f"run id {request.run_id!r} is already used on stack {ctx.stack} by a run "
             f"({view.status.value}) with a different request: choose another --run-id "
             f"(see `pcp status {request.run_id}`)", EXIT_USAGE)
    return view


def deadline_preview(ctx: Context, request: StartRequest) -> str | None:
    """What the run's deadline will be, and which limit sets it, from the stack's published
    limits and prices (control/policy.json); None when the stack publishes none. A cap the
    stack cannot turn into a deadline (no prices) is refused here, as the control plane would."""
    blob = ctx.store.get(POLICY_DOC)
    if blob is None:
        return None
    try:
        policy = Policy.from_doc(blob.data)
    except PermanentError:
        return None
    cap = policy.run_cap(request.max_cost_usd)
    if cap is not None and policy.hourly_usd <= 0:
        fail(f"max_cost_usd {cap:g} cannot become a deadline: stack {policy.stack} has no "
             "hourly prices (set pcp:worker_hourly_usd)", EXIT_USAGE)
    limit = policy.run_limit(utcnow(), request.max_hours, cap)
    hours = policy.run_hours(request.max_hours)
    if limit.by == "max_cost_usd":
        assert cap is not None
        default = "" if request.max_cost_usd else " (the stack's default)"
        why = (f"set by the cost cap ${cap:g}{default}"
               f" at ${policy.hourly_usd:g}/h ({policy.worker_count} worker(s) at "
               f"${policy.worker_hourly_usd:g}/h + the shepherd at "
               f"${policy.shepherd_hourly_usd:g}/h), before max_hours {hours:g}")
    else:
        why = f"set by max_hours {hours:g}"
        if cap is not None:
            why += f" (the cost cap ${cap:g} would allow {cap / policy.hourly_usd:.3g} h)"
    return (f"deadline {_hours(limit.hours)} after the run starts, {why}; restarts share "
            f"{'the cap' if cap is not None else 'no cap'}")


def _hours(hours: float) -> str:
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.3g} h"


def capped(view: Any) -> str | None:
    """`max_hours 999 capped to the stack limit 6` when the stack shortened the request."""
    run = view.run if view is not None else None
    if run is None or run.request.max_hours is None:
        return None
    for entry in run.history:
        text = entry.reason or ""
        if "capped to the stack limit" in text:
            return text.split("; ", 1)[-1]
    if run.deadline is not None and run.started_at is not None:
        hours = (run.deadline - run.started_at).total_seconds() / 3600
        if hours < run.request.max_hours - 1e-6:
            return f"max_hours {run.request.max_hours:g} capped to the stack limit {hours:g}"
    return None


@click.command()
@resources
@click.option("--keep-vm-alive", is_flag=True, help="leave the VMs running after the run "
                                                    "(a lease of keep_alive_hours)")
@click.option("--config", "training_config", metavar="ARGS",
              help="extra arguments for the binary, split like a shell would (none runs)")
@click.option("--binary", metavar="REF", help="flake reference or store path, or a JSON map "
                                              "platform -> store path")
@click.option("--image", metavar="REF", help="OCI image to run instead of a binary, "
              "REGISTRY/REPO[:TAG][@sha256:...] (a tag is pinned to its digest at start; "
              "with --binary too, the shepherd runs the binary)")
@click.option("--torchrun", "torchrun_target", metavar="TARGET",
              help="run a stock torchrun script (/abs/train.py), module (pkg.train) or Nix "
                   "REF!PROGRAM under torchrun on the workers; same as --binary "
                   "torchrun:TARGET (docs/trainers.md)")
@click.option("--max-hours", type=float, help="deadline in hours (capped by the stack)")
@click.option("--max-restarts", type=int, help="restarts after a lost node or boot timeout")
@click.option("--max-cost", "max_cost", type=float, metavar="USD",
              help="dollar cap: the run ends when its nodes at the stack's hourly prices reach "
                   "it (restarts included); default: the stack's pcp:max_cost_usd")
@click.option("--layout", type=click.Choice(LAYOUTS), help="rank layout (docs/agent.md); "
                                                          "default: the stack's")
@click.option("--gpu-idle", metavar="P%:WINDOW[:GRACE]",
              help="end the run (reason gpu_idle) if every GPU of a node stays below P%% for "
                   "WINDOW after the first GRACE, e.g. 5%%:15m:10m (docs/agent.md); default: "
                   "the stack's (PCP_GPU_IDLE), if any")
@click.option("--wandb-project", metavar="PROJECT",
              help="wandb project the nodes log to (default: the stack's pcp:wandb_project)")
@click.option("--wandb-entity", metavar="ENTITY",
              help="wandb user or team (default: the stack's pcp:wandb_entity)")
@click.option("--run-id", help="fix the run id (default r-YYYYMMDD-HHMMSS-xxxx)")
@click.option("--wait", is_flag=True, help="follow the run until it ends; exit 0 on success")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              metavar="SECONDS",
              help="with --wait: stop waiting after this long (exit 3)")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, metavar="SECONDS", help="with --wait: how often to poll")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def run(keep_vm_alive: bool, training_config: str | None, binary: str | None,
        torchrun_target: str | None, image: str | None, max_hours: float | None,
        max_restarts: int | None,
        max_cost: float | None, layout: str | None, gpu_idle: str | None, run_id: str | None,
        wandb_project: str | None, wandb_entity: str | None, wait: bool,
        timeout: float | None, poll: float, as_json: bool) -> None:
    """Request a training run; print its id (and with --wait, follow it to the end)."""
    flags = click.get_current_context().meta.get(FLAGS, {})
    if timeout is not None and not wait:
        fail("--timeout only applies with --wait (without it, pcp run returns at once)",
             EXIT_USAGE)
    body: dict[str, Any] = {"run_id": run_id or new_run_id(utcnow()),
                            "keep_vm_alive": keep_vm_alive, "requested_by": requested_by()}
    if training_config is not None:
        body["training_config"] = training_config
    if torchrun_target is not None:
        if binary is not None:
            fail("--torchrun and --binary both name what runs: give one", EXIT_USAGE)
        binary = TORCHRUN_PREFIX + torchrun_target
    if binary is not None:
        body["binary"] = _binary(binary)
    if image is not None:
        body["image"] = image
    if max_hours is not None:
        body["max_hours"] = max_hours
    if max_restarts is not None:
        body["max_restarts"] = max_restarts
    if max_cost is not None:
        body["max_cost_usd"] = max_cost
    if layout is not None:
        body["layout"] = layout
    if gpu_idle is not None:
        try:
            body["gpu_idle"] = GpuIdle.parse(gpu_idle).to_dict()
        except PermanentError as e:
            fail(str(e), EXIT_USAGE)
    if wandb_project is not None:
        body["wandb_project"] = wandb_project
    if wandb_entity is not None:
        body["wandb_entity"] = wandb_entity
    if flags.get("stack"):
        body["stack"] = flags["stack"]
    try:  # the control plane's own parser: what fails here would be rejected there
        request = StartRequest.from_dict(body)
    except PermanentError as e:
        fail(str(e), EXIT_USAGE)
    ctx = context()
    if request.stack is None:
        request = replace(request, stack=ctx.stack)
    existing = _reused(ctx, request) if run_id is not None else None
    limit = deadline_preview(ctx, request)
    if limit is not None and not as_json:
        click.echo(f"pcp: {limit}", err=True)
    if existing is not None:
        click.echo(f"run {request.run_id} already exists with the same request "
                   f"({existing.status.value}): this is the same run, not a new one", err=True)
        message_id = None
    else:
        message_id = ctx.bus.publish("start", request.to_json(), {"run_id": request.run_id})
    if not wait:
        if as_json:
            echo_json({"run_id": request.run_id, "stack": ctx.stack, "message_id": message_id,
                       "request": request.to_dict()})
            return
        click.echo(request.run_id)
        if message_id is not None:
            click.echo(f"requested on stack {ctx.stack} (message {message_id}); follow it "
                       f"with `pcp watch {request.run_id} --stack {ctx.stack}`", err=True)
        return
    if not as_json:
        click.echo(request.run_id)
    view = wait_for(ctx, request.run_id, timeout=timeout, poll=poll, quiet=as_json)
    if as_json:
        echo_json({**view.to_dict(), "message_id": message_id})
    else:
        from pcp.cli.render import run_renderable

        console().print(run_renderable(view, ctx.stack))
    finish(ctx, view, quiet=as_json)


def finish(ctx: Context, view: Any, *, quiet: bool) -> None:
    """Exit 0 on success; else say why (the failing nodes' exits and stderr) and fail."""
    if view.status is Status.SUCCEEDED:
        return
    from pcp.cli.render import failure_text, outcome

    if not quiet:
        text = failure_text(failures(ctx.store, view), view.run_id, ctx.stack)
        if text:
            click.echo(text, nl=False)  # the run's report; the error stays one line
    fail(outcome(view))


def wait_for(ctx: Context, run_id: str, *, timeout: float | None, poll: float,
             quiet: bool, accept_within: float | None = ACCEPT_WITHIN_S) -> Any:
    """Follow a run to its end. Interrupting or timing out stops the waiting, not the run."""
    from pcp.cli.render import Progress

    said: list[str] = []

    store = ctx.watch_store
    tail = LogTail(store, run_id, stream="stdout")

    def trouble(error: BaseException | None, count: int) -> None:
        if quiet:
            return
        show.trouble(None if error is None else
                     f"cannot reach {ctx.backend} (last error: {type(error).__name__}: "
                     f"{one_line(error)[:160]}), retrying ({count} in a row); see "
                     f"`pcp doctor --stack {ctx.stack}`")

    def show_and_note(view: Any) -> None:
        if view is not None and not quiet and show.live is not None:
            chunks = tail.poll()
            last_lines(chunks, show.latest)
            show.training.read(chunks)
        show(view)
        note = capped(view)
        if note and not said and not quiet:
            said.append(note)
            click.echo(f"pcp: note: {note} (the run ends at its deadline "
                       f"{view.run.deadline:%Y-%m-%d %H:%M:%SZ})", err=True)

    try:
        with Progress(console(), run_id, ctx.monotonic, quiet=quiet) as show:
            return follow(store, run_id, on_view=show_and_note, sleep=ctx.sleep,
                          monotonic=ctx.monotonic, poll=poll, timeout=timeout,
                          accept_within=accept_within, on_tick=show.tick,
                          check=ctx.check_backend, unreachable=unreachable,
                          on_trouble=trouble)
    except NotAccepted as e:
        fail(str(e), EXIT_WAIT_TIMEOUT)
    except Unreachable as e:
        fail(f"cannot reach {ctx.backend}: {e}; stopped waiting (a run that was accepted "
             f"goes on under its deadline): check with `pcp doctor --stack {ctx.stack}`",
             EXIT_WAIT_TIMEOUT if e.timed_out else EXIT_FAILED)
    except KeyboardInterrupt:
        click.echo(f"\nstopped waiting; run {run_id} goes on. To stop it: "
                   f"pcp stop {run_id} --stack {ctx.stack}", err=True)
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    except WaitTimeout as e:
        fail(f"{e}; the run goes on: `pcp status {run_id} --stack {ctx.stack}`",
             EXIT_WAIT_TIMEOUT)
