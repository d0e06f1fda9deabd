"""The read side: `pcp status`, `runs`, `queue`, `logs` and `results`. Nothing here publishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pcp.cli.context import Context
from pcp.cli.errors import EXIT_INTERRUPTED, EXIT_USAGE, fail
from pcp.cli.options import console, context, echo_json, resources, run_arg, unknown_run
from pcp.cli.views import (
    LogTail,
    TrainingProgress,
    download,
    failures,
    find_run,
    gpu_usage,
    loss_curve,
    overview,
    recent_runs,
)
from pcp.core.names import NODE_RE
from pcp.core.state import StackState, Status


@click.command()
@resources
@click.argument("run_id", required=False)
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]),
              default="text", show_default=True, help="markdown: a GitHub job summary")
@click.option("--json", "as_json", is_flag=True, help="same as --format json")
@click.option("--watch", "-w", "watch_it", is_flag=True, help="follow RUN_ID live (pcp watch)")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, metavar="SECONDS", help="with --watch: how often to poll")
def status(run_id: str | None, fmt: str, as_json: bool, watch_it: bool, poll: float) -> None:
    """A run's status; without RUN_ID the stack's active run, queue, lease and recent ends."""
    from pcp.cli.render import failure_text, markdown, overview_renderable, run_renderable

    fmt = "json" if as_json else fmt
    ctx = context()
    if run_id is None:
        if watch_it:
            fail("--watch needs a RUN_ID (or `latest`)", EXIT_USAGE)
        if fmt == "markdown":
            fail("--format markdown needs a RUN_ID", EXIT_USAGE)
        ov = overview(ctx.store, ctx.stack)
        usage = gpu_usage(ctx.store, ov.state.active)
        if fmt == "json":
            echo_json({**ov.to_dict(), **({"gpus": usage} if usage else {})})
        else:
            console().print(overview_renderable(ov, ctx.clock(), usage))
        return
    run_id = run_arg(ctx, run_id)
    if watch_it:
        watch_run(ctx, run_id, poll=poll)
        return
    view = find_run(ctx.store, run_id)
    if view is None:
        unknown_run(ctx, run_id)
    usage = gpu_usage(ctx.store, view.run) if fmt != "markdown" else {}
    if fmt == "json":
        echo_json({**view.to_dict(), **({"gpus": usage} if usage else {})})
    elif fmt == "markdown":
        losses = TrainingProgress().read(LogTail(ctx.store, run_id, stream="stdout").poll())
        click.echo(markdown(view, ctx.stack, losses.losses), nl=False)
    else:
        console().print(run_renderable(view, ctx.stack, usage))
        if view.status is Status.FAILED:
            click.echo(failure_text(failures(ctx.store, view), run_id, ctx.stack), nl=False)


def watch_run(ctx: Context, run_id: str, *, poll: float) -> None:
    """The live view of `pcp run --wait`, for a run requested earlier (after Ctrl-C)."""
    from pcp.cli.render import run_renderable
    from pcp.cli.submit import finish, wait_for

    if find_run(ctx.store, run_id) is None:
        unknown_run(ctx, run_id)
    view = wait_for(ctx, run_id, timeout=None, poll=poll, quiet=False)
    console().print(run_renderable(view, ctx.stack))
    finish(ctx, view, quiet=False)


@click.command()
@resources
@click.argument("run_id")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, metavar="SECONDS", help="how often to read the state")
def watch(run_id: str, poll: float) -> None:
    """Follow a run live until it ends (re-attach after Ctrl-C); exit 0 on success."""
    ctx = context()
    watch_run(ctx, run_arg(ctx, run_id), poll=poll)


@click.command()
@resources
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def runs(limit: int, as_json: bool) -> None:
    """Recent runs: status, reason, duration and estimated cost."""
    from pcp.cli.render import runs_table

    ctx = context()
    rows = recent_runs(ctx.store, limit)
    if as_json:
        echo_json({"stack": ctx.stack, "runs": rows})
    elif not rows:
        click.echo(f"no runs on stack {ctx.stack} yet")
    else:
        console().print(runs_table(rows))


@click.command()
@resources
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def queue(as_json: bool) -> None:
    """The active run and the runs waiting behind it, in order."""
    from pcp.cli.render import queue_table, styled
    from pcp.cli.views import load_state, public

    ctx = context()
    state = load_state(ctx.store) or StackState()
    if as_json:
        echo_json({"stack": ctx.stack,
                   "active": None if state.active is None else public(state.active),
                   "queue": [dict(public(r), position=i)
                             for i, r in enumerate(state.queue, 1)]})
        return
    out = console()
    if state.active is None:
        out.print(f"active: none on stack {ctx.stack}")
    else:
        out.print(f"active: {state.active.run_id} {styled(state.active.status)}")
    out.print(queue_table(state, ctx.clock()))


@click.command()
@resources
@click.argument("run_id")
@click.option("--node", help="only this node (shepherd, worker-0, ...)")
@click.option("--follow", "-f", "keep", is_flag=True, help="print new output until the run ends")
@click.option("--stream", type=click.Choice(["both", "stdout", "stderr"]), default="both",
              show_default=True, help="which of the node's outputs to print")
@click.option("--timestamps", "-t", is_flag=True,
              help="start each line with the time its node wrote it (UTC)")
@click.option("--poll", type=click.FloatRange(min=0, min_open=True), default=3.0,
              show_default=True, metavar="SECONDS")
def logs(run_id: str, node: str | None, stream: str, timestamps: bool, keep: bool,
         poll: float) -> None:
    """Print a run's stdout.log and stderr.log (runs/RUN_ID/NODE/), every node's, merged in
    the order they were written."""
    from pcp.cli.logtimes import Line, Merger, in_time_order, read_index

    if node is not None and not NODE_RE.match(node):
        fail(f"--node {node!r}: use shepherd or worker-<n>", EXIT_USAGE)
    ctx = context()
    run_id = run_arg(ctx, run_id)
    tail = LogTail(ctx.store, run_id, node, None if stream == "both" else stream)
    merger = Merger()
    current: list[str] = []

    def show(lines: list[Line]) -> None:
        for line in lines:
            if not current or current[-1] != line.log:
                click.echo(f"==> {line.log} <==")
                current.append(line.log)
            stamp = ""
            if timestamps:
                stamp = (f"{line.at:%H:%M:%S}.{line.at.microsecond // 1000:03d} "
                         if line.at is not None else "-            ")
            click.echo(f"{stamp}{line.text}")

    def show_new(final: bool = False) -> bool:
        chunks = tail.poll()
        nodes = {name.split("/", 1)[0] for name, _ in chunks}
        indexes = {n: read_index(ctx.store, run_id, n) for n in sorted(nodes)}
        lines: list[Line] = []
        for name, data in chunks:
            lines += merger.lines(name, tail.starts.get(name, 0), data,
                                  indexes[name.split("/", 1)[0]])
        show(in_time_order(lines))
        if final:
            show(merger.flush())
        return bool(chunks)

    view = find_run(ctx.store, run_id)
    if not show_new(final=not keep) and view is None:
        unknown_run(ctx, run_id)
    if not keep:
        if not tail.seen:
            click.echo(f"no logs yet for run {run_id}", err=True)
        return
    try:
        while view is None or not view.final:
            ctx.sleep(poll)
            show_new()
            view = find_run(ctx.store, run_id)
        show_new(final=True)  # what the nodes wrote just before the end
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


#: The loss curve `pcp results` draws next to a run's files (never over one of them).
LOSS_CURVE = "loss-curve.png"


def write_loss_curve(root: Path, files: list[dict[str, Any]],
                     prefer: str | None) -> dict[str, Any] | None:
    """Draw the run's loss curve (its `pcp-progress` lines) into ROOT/loss-curve.png."""
    from pcp.cli.plot import loss_png

    if any(f["object"].endswith(f"/{LOSS_CURVE}") and f["object"].count("/") == 2
           for f in files):
        return None  # the run wrote one itself
    logs = {}
    for f in files:
        parts = f["object"].split("/")
        if len(parts) == 4 and parts[3] == "stdout.log":
            logs[parts[2]] = Path(f["path"]).read_bytes()
    losses = loss_curve(logs, prefer if isinstance(prefer, str) else None)
    if len(losses) < 2:
        return None
    data = loss_png(losses, title=f"loss of run {root.name}")
    path = root / LOSS_CURVE
    path.write_bytes(data)
    return {"object": None, "path": str(path), "bytes": len(data),
            "made_by": "pcp results: the loss from the pcp-progress lines"}


@click.command()
@resources
@click.argument("run_id")
@click.option("--dest", default=".", show_default=True, type=click.Path(file_okay=False),
              help="where to put the run's directory: files land in DEST/RUN_ID/")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def results(run_id: str, dest: str, as_json: bool) -> None:
    """Download everything under runs/RUN_ID/ into DEST/RUN_ID/ (so one run never
    overwrites another's files) and print the files and the summary."""
    from pcp.cli.render import run_renderable

    ctx = context()
    run_id = run_arg(ctx, run_id)
    view = find_run(ctx.store, run_id)
    if view is None:
        unknown_run(ctx, run_id)
    root = Path(dest) / run_id
    files = download(ctx.store, run_id, root)
    picture = write_loss_curve(root, files, (view.summary or {}).get("metrics_node"))
    if picture is not None:
        files.append(picture)
    if as_json:
        echo_json({"run_id": run_id, "dest": str(root), "files": files, "run": view.to_dict()})
        return
    click.echo(f"downloaded {len(files)} file(s) of run {run_id} into {root}")
    for f in files:
        click.echo(f"  {f['path']}  ({f['bytes']} bytes)")
    console().print(run_renderable(view, ctx.stack))
