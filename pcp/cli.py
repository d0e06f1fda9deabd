"""The `pcp` command: request runs, follow them, read their state, logs and results.

The CLI never changes state itself. It publishes requests (start, stop, sweep) and reads the
stack bucket, so it works the same against Google Cloud, the local replica and, in tests, the
in-memory twins handed in as a `Context` (`CliRunner().invoke(cli, args, obj=context)`).
Errors a person can fix are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from pcp import __version__
from pcp.cli_config import STACKS, resolve_from
from pcp.cli_context import CloudContext, Context, requested_by, utcnow
from pcp.cli_errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    EXIT_WAIT_TIMEOUT,
    CliError,
    PcpGroup,
    fail,
)
from pcp.cli_local import local
from pcp.cli_views import (
    LogTail,
    WaitTimeout,
    download,
    find_run,
    follow,
    overview,
    recent_runs,
)
from pcp.core.errors import PermanentError
from pcp.core.messages import NODE_RE, StartRequest, StopRequest, SweepTick
from pcp.core.state import StackState, Status

FLAGS = "pcp.flags"


# ---------------------------------------------------------------- resource options


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        if param.name == "stack" and value not in STACKS:
            raise CliError(f"unknown stack {value!r}: use one of {', '.join(STACKS)}")
        ctx.meta.setdefault(FLAGS, {})[param.name] = value
    return value


def resources(f: Any) -> Any:
    """--stack, --project, --bucket, --region, --outputs: where the stack's resources are.

    They are kept in the click context rather than passed to each command, which reads them
    through `context()`.
    """
    options = [
        ("--stack", "tiny, small, large or huge [env PCP_STACK; default tiny]", None),
        ("--project", "Google Cloud project [env PCP_PROJECT]", None),
        ("--bucket", "the stack bucket [env PCP_BUCKET; default pcp-STACK-PROJECT]", None),
        ("--region", "the scheduler job's region [env PCP_REGION]", None),
        ("--outputs", "`pulumi stack output --json` of the stack [env PCP_OUTPUTS]",
         click.Path(dir_okay=False)),
    ]
    for flag, text, kind in reversed(options):
        f = click.option(flag, help=text, type=kind, callback=_remember,
                         expose_value=False)(f)
    return f


def context() -> Context:
    """The injected Context (tests), or one built from flags, environment and files."""
    click_ctx = click.get_current_context()
    found = click_ctx.find_object(Context)
    if found is not None:
        return found
    config = resolve_from(click_ctx.meta.get(FLAGS, {}), os.environ)
    built = CloudContext(config)
    click_ctx.find_root().obj = built
    return built


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def console() -> Any:
    from pcp.cli_render import make_console

    return make_console()


# ---------------------------------------------------------------- the group


@click.group(cls=PcpGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcp")
def cli() -> None:
    """Run distributed training on a pcp stack and follow it.

    Resource names come from flags, then PCP_* variables, then a Pulumi outputs file, then
    the local replica (`pcp local up`).
    """


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


@cli.command()
@resources
@click.option("--keep-vm-alive", is_flag=True, help="leave the VMs running after the run "
                                                    "(a lease of keep_alive_hours)")
@click.option("--config", "training_config", metavar="ARGS",
              help="extra arguments for the binary, split like a shell would (none runs)")
@click.option("--binary", metavar="REF", help="flake reference or store path, or a JSON map "
                                              "platform -> store path")
@click.option("--max-hours", type=float, help="deadline in hours (capped by the stack)")
@click.option("--max-restarts", type=int, help="restarts after a lost node or boot timeout")
@click.option("--run-id", help="fix the run id (default r-YYYYMMDD-HHMMSS-xxxx)")
@click.option("--wait", is_flag=True, help="follow the run until it ends; exit 0 on success")
@click.option("--timeout", type=float, metavar="SECONDS", help="with --wait: stop waiting "
                                                                "after this long (exit 3)")
@click.option("--poll", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="with --wait: how often to read the state")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def run(keep_vm_alive: bool, training_config: str | None, binary: str | None,
        max_hours: float | None, max_restarts: int | None, run_id: str | None, wait: bool,
        timeout: float | None, poll: float, as_json: bool) -> None:
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
    if flags.get("stack"):
        body["stack"] = flags["stack"]
    try:  # the control plane's own parser: what fails here would be rejected there
        request = StartRequest.from_json(json.dumps(body))
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
        from pcp.cli_render import run_renderable

        console().print(run_renderable(view, ctx.stack))
    if view.status is not Status.SUCCEEDED:
        from pcp.cli_render import outcome

        fail(outcome(view))


def wait_for(ctx: Context, run_id: str, *, timeout: float | None, poll: float,
             quiet: bool) -> Any:
    """Follow a run to its end. Interrupting or timing out stops the waiting, not the run."""
    from pcp.cli_render import Progress

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


def _unknown(ctx: Context, run_id: str) -> NoReturn:
    fail(f"unknown run {run_id!r} on stack {ctx.stack}: not active, queued, recent or "
         f"archived in {ctx.bucket} (see `pcp runs`)")


@cli.command()
@resources
@click.argument("run_id", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True, help="markdown: a GitHub job summary")
@click.option("--json", "as_json", is_flag=True, help="same as --format json")
def status(run_id: str | None, fmt: str, as_json: bool) -> None:
    """A run's status; without RUN_ID the stack's active run, queue, lease and recent ends."""
    from pcp.cli_render import markdown, overview_renderable, run_renderable

    fmt = "json" if as_json else fmt
    ctx = context()
    if run_id is None:
        if fmt == "markdown":
            fail("--format markdown needs a RUN_ID", EXIT_USAGE)
        ov = overview(ctx.store, ctx.stack)
        if fmt == "json":
            echo_json(ov.to_dict())
        else:
            console().print(overview_renderable(ov, ctx.clock()))
        return
    view = find_run(ctx.store, run_id)
    if view is None:
        _unknown(ctx, run_id)
    if fmt == "json":
        echo_json(view.to_dict())
    elif fmt == "markdown":
        click.echo(markdown(view, ctx.stack), nl=False)
    else:
        console().print(run_renderable(view, ctx.stack))


@cli.command()
@resources
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def runs(limit: int, as_json: bool) -> None:
    """Recent runs: status, reason, duration and estimated cost."""
    from pcp.cli_render import runs_table

    ctx = context()
    rows = recent_runs(ctx.store, limit)
    if as_json:
        echo_json({"stack": ctx.stack, "runs": rows})
    elif not rows:
        click.echo(f"no runs on stack {ctx.stack} yet")
    else:
        console().print(runs_table(rows))


@cli.command()
@resources
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def queue(as_json: bool) -> None:
    """The active run and the runs waiting behind it, in order."""
    from pcp.cli_render import queue_table, styled
    from pcp.cli_views import load_state

    ctx = context()
    state = load_state(ctx.store) or StackState()
    if as_json:
        echo_json({"stack": ctx.stack,
                   "active": None if state.active is None else state.active.to_dict(),
                   "queue": [dict(r.to_dict(), position=i)
                             for i, r in enumerate(state.queue, 1)]})
        return
    out = console()
    if state.active is None:
        out.print(f"active: none on stack {ctx.stack}")
    else:
        out.print(f"active: {state.active.run_id} {styled(state.active.status)}")
    out.print(queue_table(state, ctx.clock()))


@cli.command()
@resources
@click.argument("run_id")
@click.option("--node", help="only this node (shepherd, worker-0, ...)")
@click.option("--follow", "-f", "keep", is_flag=True, help="print new output until the run ends")
@click.option("--poll", type=float, default=3.0, show_default=True, metavar="SECONDS")
def logs(run_id: str, node: str | None, keep: bool, poll: float) -> None:
    """Print a run's stdout.log and stderr.log (runs/RUN_ID/NODE/)."""
    if node is not None and not NODE_RE.match(node):
        fail(f"--node {node!r}: use shepherd or worker-<n>", EXIT_USAGE)
    ctx = context()
    tail = LogTail(ctx.store, run_id, node)
    current: list[str] = []

    def show_new() -> bool:
        chunks = tail.poll()
        for name, data in chunks:
            if not current or current[-1] != name:
                click.echo(f"==> {name} <==")
                current.append(name)
            click.echo(data.decode("utf-8", errors="replace"), nl=False)
        return bool(chunks)

    view = find_run(ctx.store, run_id)
    if not show_new() and view is None:
        _unknown(ctx, run_id)
    if not keep:
        if not tail.seen:
            click.echo(f"no logs yet for run {run_id}", err=True)
        return
    try:
        while view is None or not view.final:
            ctx.sleep(poll)
            show_new()
            view = find_run(ctx.store, run_id)
        show_new()  # what the nodes wrote just before the end
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@cli.command()
@resources
@click.argument("run_id")
@click.option("--dest", required=True, type=click.Path(file_okay=False),
              help="directory to download runs/RUN_ID/ into")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def results(run_id: str, dest: str, as_json: bool) -> None:
    """Download everything under runs/RUN_ID/ and print the files and the summary."""
    from pcp.cli_render import run_renderable

    ctx = context()
    view = find_run(ctx.store, run_id)
    if view is None:
        _unknown(ctx, run_id)
    root = Path(dest)
    files = download(ctx.store, run_id, root)
    if as_json:
        echo_json({"run_id": run_id, "dest": str(root), "files": files, "run": view.to_dict()})
        return
    click.echo(f"downloaded {len(files)} file(s) of run {run_id} into {root}")
    for f in files:
        click.echo(f"  {f['path']}  ({f['bytes']} bytes)")
    console().print(run_renderable(view, ctx.stack))


@cli.command()
@resources
@click.argument("run_id")
@click.option("--reason", default="stop requested", show_default=True)
@click.option("--grace", type=float, default=0.0, show_default=True, metavar="SECONDS",
              help="keep looking this long for a run that was just requested")
@click.option("--missing-ok", is_flag=True, help="an unknown run is not an error")
def stop(run_id: str, reason: str, grace: float, missing_ok: bool) -> None:
    """Stop a run (or remove it from the queue, or end its keep-alive lease)."""
    try:
        request = StopRequest.from_json(json.dumps(
            {"run_id": run_id, "reason": reason, "requested_by": requested_by()}))
    except PermanentError as e:
        fail(str(e), EXIT_USAGE)
    ctx = context()
    started = ctx.monotonic()
    view = find_run(ctx.store, run_id)
    while view is None and ctx.monotonic() - started < grace:
        ctx.sleep(min(2.0, grace))
        view = find_run(ctx.store, run_id)
    if view is None:
        if missing_ok:
            click.echo(f"run {run_id} is unknown on stack {ctx.stack}; nothing to stop")
            return
        _unknown(ctx, run_id)
    if view.final and view.lease is None:
        click.echo(f"run {run_id} already ended ({view.status.value}); nothing to stop")
        return
    what = ("its kept-alive VMs" if view.final else
            f"queued at position {view.position}" if view.position else view.status.value)
    message_id = ctx.bus.publish("stop", request.to_json(), {"run_id": run_id})
    click.echo(f"stop requested for run {run_id} ({what}) on stack {ctx.stack} "
               f"(message {message_id})")


@cli.command()
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


@cli.command()
@resources
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def doctor(as_json: bool) -> None:
    """Check credentials, bucket, topics and that the scheduler job (safety net) is armed."""
    from pcp.cli_doctor import run_checks
    from pcp.cli_render import MARK

    ctx = context()
    checks = run_checks(ctx)
    failed = any(c.state == "fail" for c in checks)
    if as_json:
        echo_json({"stack": ctx.stack, "ok": not failed, "checks": [c.to_dict() for c in checks]})
    else:
        click.echo(f"pcp doctor: stack {ctx.stack} ({ctx.bucket})")
        for c in checks:
            click.echo(f"  {MARK[c.state]} {c.name}: {c.detail}")
    if failed:
        raise click.exceptions.Exit(EXIT_FAILED)


cli.add_command(local)


def main() -> None:
    cli(prog_name="pcp")


if __name__ == "__main__":
    main()
