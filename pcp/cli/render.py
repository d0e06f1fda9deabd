"""How the CLI shows runs: rich tables on a terminal, plain lines in CI logs, Markdown for the
GitHub job summary. Every string that came from a request or a node goes through `escape`, so
a reason such as "[bold]" is printed as written, never interpreted as markup.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from pcp.cli.views import Overview, RunView, TrainingProgress
from pcp.core.state import NodePhase, NodeState, Run, StackState, Status
from pcp.core.timefmt import iso

PLAIN_WIDTH = 160  # CI logs have no terminal width; do not wrap tables at 80 columns
MARK = {"ok": "✓", "fail": "✗", "skip": "–"}
STYLE = {Status.SUCCEEDED: "green", Status.FAILED: "red", Status.CANCELLED: "yellow",
         Status.REJECTED: "red", Status.RUNNING: "cyan", Status.STARTING: "cyan",
         Status.QUEUED: "blue"}


def make_console(file: IO[str] | None = None) -> Console:
    """A console on the current stdout (so click's test runner captures it)."""
    file = file if file is not None else sys.stdout
    tty = file.isatty()
    return Console(file=file, highlight=False, width=None if tty else PLAIN_WIDTH,
                   force_terminal=None if tty else False, soft_wrap=not tty)


# ---------------------------------------------------------------- small formats


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(round(max(seconds, 0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def wandb_text(w: dict[str, Any]) -> str:
    """The wandb group's link, or (no entity known) where to find it."""
    if w.get("url"):
        return str(w["url"])
    return (f"project {w['project']}, group {w['group']} (the API key's default entity; "
            "name one with --wandb-entity for a link)")


def cost(usd: Any) -> str:
    """Dollars and cents; under a cent, the fraction of a cent (never a $0.00 that the JSON
    contradicts)."""
    if usd is None:
        return "-"
    usd = float(usd)
    if 0 < abs(usd) < 0.01:
        return f"${usd:.4f}"
    return f"${usd:.2f}"


def when(t: datetime | str | None) -> str:
    if t is None:
        return "-"
    text = t if isinstance(t, str) else iso(t)
    return text.replace("T", " ").split(".")[0].rstrip("Z") + "Z"


def node_state(node: NodeState) -> str:
    if node.phase is NodePhase.DONE:
        return f"signal {node.signal}" if node.signal else f"exit {node.exit_code}"
    return node.phase.value


def nodes_text(run: Run | None) -> str:
    if run is None or not run.nodes:
        return ""
    return " ".join(f"{n.name}={node_state(n)}" for n in run.nodes)


def styled(status: Status | str) -> str:
    status = Status(status)
    return f"[{STYLE.get(status, 'default')}]{status.value}[/]"


def outcome(view: RunView) -> str:
    """One line: `run X succeeded` or `run X failed (node_lost): worker-0 lost ...`."""
    why = f" ({view.reason})" if view.reason and view.reason != view.status.value else ""
    detail = f": {view.detail}" if view.detail else ""
    return f"run {view.run_id} {view.status.value}{why}{detail}"


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A loss curve in one line of block characters (the last `width` points, binned)."""
    if not values:
        return ""
    if len(values) > width:
        size = len(values) / width
        values = [sum(b) / len(b) for i in range(width)
                  if (b := values[int(i * size):int((i + 1) * size)] or [values[-1]])]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARKS[min(7, int((v - lo) / span * 7 + 0.5))] for v in values)


def failure_text(found: Iterable[Any], run_id: str, stack: str) -> str:
    """Plain lines for stderr: each failing node's exit, the end of its stderr, and the
    command that prints all of its output."""
    out = []
    for f in found:
        how = f"signal {f.signal}" if f.signal else f"exit code {f.exit_code}"
        out.append(f"{f.node} failed with {how}; the last lines of its stderr:")
        out += [f"  | {line}" for line in f.stderr_tail] or ["  (its stderr is empty)"]
        out.append(f"all of its output: pcp logs {run_id} --node {f.node} --stack {stack}")
    return "".join(line + "\n" for line in out)


# ---------------------------------------------------------------- progress


def progress_line(view: RunView | None, run_id: str, elapsed: float) -> str:
    """A plain line for logs: printed only when its text (elapsed aside) changes."""
    if view is None:
        return f"run {run_id}: waiting for the control plane to accept the request"
    parts = [f"run {run_id}: {view.status.value}"]
    if view.position is not None:
        parts.append(f"queue position {view.position}")
    run = view.run
    if run is not None and run.attempt > 1:
        parts.append(f"attempt {run.attempt}")
    if nodes_text(run) and not view.final:
        parts.append(nodes_text(run))
    if run is not None and run.deadline is not None and not view.final:
        parts.append(f"deadline {when(run.deadline)}{deadline_by(run)}")
    return ", ".join(parts)


class Progress:
    """Shows each poll of a run: a live table on a terminal, else a line per change (CI logs).

    A context manager, so the live display is torn down however the waiting ends.
    """

    def __init__(self, console: Console, run_id: str, monotonic: Callable[[], float], *,
                 quiet: bool = False) -> None:
        self.console = console
        self.run_id = run_id
        self.monotonic = monotonic
        self.quiet = quiet
        self.started = monotonic()
        self.last = ""
        self.view: RunView | None = None
        #: The latest line each node wrote to its log, shown under the node table.
        self.latest: dict[str, str] = {}
        self.training = TrainingProgress()
        #: What the wait cannot reach right now (shown under the view), or None.
        self.problem: str | None = None
        self.live = (Live(console=console, auto_refresh=False)
                     if console.is_terminal and not quiet else None)

    def __enter__(self) -> Progress:
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def __call__(self, view: RunView | None) -> None:
        if self.quiet:
            return
        self.view = view
        elapsed = self.monotonic() - self.started
        if self.live is not None:
            self.live.update(progress_table(view, self.run_id, elapsed, self.latest,
                                            self.training, self.problem), refresh=True)
            return
        line = progress_line(view, self.run_id, elapsed)
        if line != self.last:
            self.last = line
            self.console.print(f"[{int(elapsed):>5d}s] {line}", markup=False)


    def trouble(self, text: str | None) -> None:
        """Say the backend does not answer (None: it answers again), under the live view or
        as one line when it starts and when it ends."""
        if self.quiet or text == self.problem:
            return
        was, self.problem = self.problem, text
        if self.live is not None:
            self.tick()
            return
        elapsed = self.monotonic() - self.started
        if text is not None and was is None:
            self.console.print(f"[{int(elapsed):>5d}s] {text}", markup=False)
        elif text is None:
            self.console.print(f"[{int(elapsed):>5d}s] the backend answers again", markup=False)
            self.last = ""  # print the run's state afresh

    def tick(self) -> None:
        """Between polls: redraw the live display so its clock moves every second."""
        if self.live is not None and not self.quiet:
            elapsed = self.monotonic() - self.started
            self.live.update(progress_table(self.view, self.run_id, elapsed, self.latest,
                                            self.training, self.problem), refresh=True)


def progress_table(view: RunView | None, run_id: str, elapsed: float,
                   latest: dict[str, str] | None = None,
                   training: TrainingProgress | None = None,
                   problem: str | None = None) -> RenderableType:
    """The live display on a terminal, redrawn every second: the run, its nodes and the
    latest line each node wrote to its log (and, under it, what cannot be reached)."""
    if problem is not None:
        return Group(progress_table(view, run_id, elapsed, latest, training),
                     f"[yellow]{escape(problem)}[/]")
    head = Table.grid(padding=(0, 2))
    head.add_row("[bold]run[/]", escape(run_id), "[bold]elapsed[/]", duration(elapsed))
    if view is None:
        head.add_row("[bold]status[/]", "waiting for the control plane to accept the request")
        return head
    head.add_row("[bold]status[/]", styled(view.status), "[bold]deadline[/]",
                 when(view.run.deadline if view.run else None))
    if view.position is not None:
        head.add_row("[bold]queue[/]", f"position {view.position}")
    if view.run is None or not view.run.nodes:
        return head
    parts: list[RenderableType] = [head, nodes_table(view.run)]
    if training is not None and (training.step is not None or training.loss is not None):
        said = [f"step {training.step}" if training.step is not None else "",
                f"loss {training.loss:.4g}" if training.loss is not None else ""]
        line = "[bold]training[/]  " + "  ".join(x for x in said if x)
        if len(training.losses) > 1:
            line += f"  {sparkline(training.losses)}"
        parts.append(line)
    if latest:
        lines = Table(box=None, pad_edge=False, show_header=False)
        lines.add_column("node", style="bold", no_wrap=True)
        lines.add_column("latest line", overflow="ellipsis", no_wrap=True)
        for node in sorted(latest):
            lines.add_row(escape(node), escape(latest[node]))
        parts.append(lines)
    return Group(*parts)


def nodes_table(run: Run, gpus: dict[str, str] | None = None) -> Table:
    """The nodes of a run; with `gpus` (`views.gpu_usage`), a column of GPU utilization."""
    table = Table(box=None, pad_edge=False)
    for col in ("node", "state", "booted", "done", "duration", *(("gpu",) if gpus else ())):
        table.add_column(col)
    for n in run.nodes:
        gpu = (escape(gpus.get(n.name, "-")),) if gpus else ()
        table.add_row(n.name, node_state(n), when(n.booted_at), when(n.done_at),
                      duration(n.duration_s), *gpu)
    return table


# ---------------------------------------------------------------- one run


def run_renderable(view: RunView, stack: str,
                   gpus: dict[str, str] | None = None) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_row("[bold]run[/]", escape(view.run_id))
    grid.add_row("[bold]stack[/]", escape(stack))
    grid.add_row("[bold]status[/]", styled(view.status))
    if view.reason and view.reason != view.status.value:
        grid.add_row("[bold]reason[/]", escape(view.reason))
    if view.detail:
        grid.add_row("[bold]detail[/]", escape(view.detail))
    if view.position is not None:
        grid.add_row("[bold]queue position[/]", str(view.position))
    run = view.run
    if run is not None:
        if run.request.requested_by:
            grid.add_row("[bold]requested by[/]", escape(run.request.requested_by))
        grid.add_row("[bold]attempt[/]", str(run.attempt))
        grid.add_row("[bold]accepted[/]", when(run.accepted_at))
        if run.deadline is not None:
            grid.add_row("[bold]deadline[/]", when(run.deadline) + deadline_by(run))
        if run.max_cost_usd is not None:
            spent = f" (${run.cost_usd:g} accounted so far)" if run.cost_usd else ""
            grid.add_row("[bold]cost cap[/]", f"${run.max_cost_usd:g}{spent}")
        cap = next((e.reason.split("; ", 1)[-1] for e in run.history
                    if "capped to the stack limit" in (e.reason or "")), None)
        if cap:
            grid.add_row("[bold]note[/]", escape(cap))
    grid.add_row("[bold]started[/]", when(view.started_at))
    grid.add_row("[bold]ended[/]", when(view.ended_at))
    grid.add_row("[bold]duration[/]", duration(view.duration_s))
    grid.add_row("[bold]estimated cost[/]", cost(view.cost_usd))
    if view.wandb is not None:
        grid.add_row("[bold]wandb[/]", escape(wandb_text(view.wandb)))
    if view.lease is not None:
        grid.add_row("[bold]VMs kept alive until[/]", when(view.lease.until))
    parts: list[RenderableType] = [grid]
    if run is not None and run.nodes:
        parts.append(nodes_table(run, gpus))
    if view.metrics:
        parts.append(metrics_table(view.metrics))
    return Group(*parts)


def metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(title="metrics", box=None, pad_edge=False, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in sorted(metrics):
        table.add_row(escape(str(key)), escape(str(metrics[key])))
    return table


# ---------------------------------------------------------------- the stack


def overview_renderable(ov: Overview, now: datetime,
                        gpus: dict[str, str] | None = None) -> RenderableType:
    s = ov.state
    parts: list[RenderableType] = []
    if s.budget.hold is not None:
        hold = s.budget.hold
        parts.append(f"[bold red]budget hold[/] since {when(hold.since)}: {escape(hold.text)}; "
                     f"every VM is stopped, queued runs wait and new starts are refused. "
                     f"Lift it: pcp budget resume --stack {escape(ov.stack)}")
    if s.active is None:
        parts.append(f"[bold]stack {escape(ov.stack)}[/]: no active run")
    else:
        run = s.active
        elapsed = (now - run.started_at).total_seconds() if run.started_at else None
        parts.append(f"[bold]stack {escape(ov.stack)}[/]: run {escape(run.run_id)} "
                     f"{styled(run.status)}, attempt {run.attempt}, elapsed {duration(elapsed)}"
                     f", deadline {when(run.deadline)}{deadline_by(run)}")
        if run.nodes:
            parts.append(nodes_table(run, gpus))
    parts.append(queue_table(s, now))
    if s.lease is not None:
        parts.append(f"VMs of run {escape(s.lease.run_id)} kept alive until "
                     f"{when(s.lease.until)}: {escape(', '.join(s.lease.vms))}")
    if s.recent:
        table = Table(title="recent ends", box=None, pad_edge=False, title_justify="left")
        for col in ("run", "status", "ended", "detail"):
            table.add_column(col)
        for line in s.recent[:5]:
            table.add_row(escape(line.run_id), styled(line.status), when(line.ended_at),
                          escape(line.detail))
        parts.append(table)
    if ov.rejections:
        table = Table(title="recent rejections", box=None, pad_edge=False, title_justify="left")
        for col in ("at", "kind", "message", "detail"):
            table.add_column(col)
        for r in ov.rejections:
            table.add_row(when(r.get("at")), escape(str(r.get("kind") or "-")),
                          escape(str(r.get("message_id") or "-")),
                          escape(str(r.get("detail") or "-")))
        parts.append(table)
    return Group(*parts)


def deadline_by(run: Any) -> str:
    """` (set by the cost cap $5)` when the run's dollar cap set its deadline."""
    if getattr(run, "deadline_by", None) == "max_cost_usd" and run.max_cost_usd is not None:
        return f" (set by the cost cap ${run.max_cost_usd:g})"
    return ""


def queue_table(state: StackState, now: datetime) -> RenderableType:
    if not state.queue:
        return "queue: empty"
    table = Table(title="queue", box=None, pad_edge=False, title_justify="left")
    for col in ("#", "run", "requested by", "accepted", "waiting", "attempt"):
        table.add_column(col)
    for i, run in enumerate(state.queue, 1):
        table.add_row(str(i), escape(run.run_id), escape(run.request.requested_by or "-"),
                      when(run.accepted_at), duration((now - run.accepted_at).total_seconds()),
                      str(run.attempt))
    return table


def runs_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    table.add_column("run", no_wrap=True)  # an id is what a person copies: never folded
    for col in ("status", "reason", "started", "duration", "est. cost", "config", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r["run_id"]), styled(r["status"]), escape(r["reason"] or "-"),
                      when(r["started_at"]), duration(r["duration_s"]),
                      cost(r["estimated_cost_usd"]), escape(r.get("training_config") or "-"),
                      escape(r["detail"] or ""))
    costs = [float(r["estimated_cost_usd"]) for r in rows
             if r["estimated_cost_usd"] is not None]
    durations = [float(r["duration_s"]) for r in rows if r["duration_s"] is not None]
    if len(rows) > 1 and (costs or durations):
        table.add_section()
        table.add_row(f"total ({len(rows)} runs)", "", "", "",
                      duration(sum(durations)) if durations else "-",
                      cost(sum(costs)) if costs else "-", "", "")
    return table


# ---------------------------------------------------------------- Markdown


def _md(text: Any) -> str:
    """A table cell: pipes and newlines would break the row."""
    return str(text).replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def mermaid_loss(losses: list[float], points: int = 100) -> list[str]:
    """The loss curve as a Mermaid chart (GitHub draws it in a job summary)."""
    if len(losses) > points:  # every k-th point, and always the last
        k = -(-len(losses) // points)
        losses = losses[::k] if (len(losses) - 1) % k == 0 else [*losses[::k], losses[-1]]
    return ["", "```mermaid", "xychart-beta", '    title "loss"',
            f'    x-axis "report" 1 --> {len(losses)}',
            "    line [" + ", ".join(f"{v:.6g}" for v in losses) + "]", "```"]


def markdown(view: RunView, stack: str, losses: list[float] | None = None) -> str:
    """The GitHub job summary: status, durations, cost, nodes, final metrics and (from the
    binary's `pcp-progress` lines) the loss curve."""
    icon = {Status.SUCCEEDED: "✅", Status.FAILED: "❌", Status.CANCELLED: "⚠️",
            Status.REJECTED: "⛔"}.get(view.status, "⏳")
    lines = [f"### {icon} Training run `{_md(view.run_id)}` on stack `{_md(stack)}`: "
             f"{view.status.value}", "",
             "| | |", "|---|---|",
             f"| status | {view.status.value} |"]
    if view.reason and view.reason != view.status.value:
        lines.append(f"| reason | {_md(view.reason)} |")
    if view.detail:
        lines.append(f"| detail | {_md(view.detail)} |")
    if view.run is not None and view.run.request.requested_by:
        lines.append(f"| requested by | {_md(view.run.request.requested_by)} |")
    lines += [f"| started | {when(view.started_at)} |", f"| ended | {when(view.ended_at)} |",
              f"| duration | {duration(view.duration_s)} |",
              f"| estimated cost | {cost(view.cost_usd)} |"]
    if view.wandb is not None:
        w = view.wandb
        lines.append(f"| wandb | [{_md(w['project'])} / {_md(w['group'])}]({w['url']}) |"
                     if w.get("url") else f"| wandb | {_md(wandb_text(w))} |")
    if view.run is not None and view.run.nodes:
        lines += ["", "| node | state | duration |", "|---|---|---|"]
        for n in view.run.nodes:
            lines.append(f"| {n.name} | {node_state(n)} | {duration(n.duration_s)} |")
    if view.metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        for key in sorted(view.metrics):
            lines.append(f"| {_md(key)} | {_md(view.metrics[key])} |")
    else:
        lines += ["", "_no final metrics (runs/<id>/shepherd/metrics.json) were written_"]
    if losses is not None and len(losses) > 1:
        lines += mermaid_loss(losses)
    return "\n".join(lines) + "\n"
