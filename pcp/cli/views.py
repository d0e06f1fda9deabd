"""What the CLI reads from the stack bucket, shaped for people and for `--json`.

The stack document (control/stack.json) is the authority while a run is queued or live; once
a run has ended its archived record (runs/<id>/run.json) and summary (runs/<id>/summary.json)
say how. Only reads: the CLI never writes state, it publishes requests.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from pcp.core.errors import PermanentError
from pcp.core.messages import decode_json, validate_wandb
from pcp.core.names import (
    REJECTED,
    STACK_DOC,
    node_file,
    run_doc,
    run_prefix,
    summary_doc,
    wandb_group_url,
)
from pcp.core.ports import BlobStore
from pcp.core.state import Lease, Phase, RecentRun, Run, StackState, Status
from pcp.core.timefmt import iso, opt_iso
from pcp.progress import observe

FINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.REJECTED})


def public(run: Run) -> dict[str, Any]:
    """A run as the CLI prints it: without its secret (only its nodes get that)."""
    out = run.to_dict()
    out.pop("secret", None)
    return out


def load_state(store: BlobStore) -> StackState | None:
    """The stack document with its active run's node phases from the markers (the one
    derivation, `pcp.progress.observe`), or None before the first request. A corrupt one
    raises."""
    blob = store.get(STACK_DOC)
    return None if blob is None else observe(store, StackState.from_json(blob.data))[0]


def _wandb_of(raw: object, run_id: str) -> dict[str, Any] | None:
    """A wandb block read from the bucket, re-validated; the link is rebuilt, never read."""
    if not isinstance(raw, dict):
        return None
    try:
        project = validate_wandb(raw.get("project"), "wandb_project", "wandb")
        entity = validate_wandb(raw.get("entity"), "wandb_entity", "wandb")
    except PermanentError:
        return None
    if project is None:
        return None
    return {"project": project, "entity": entity, "group": run_id,
            "url": wandb_group_url(entity, project, run_id)}


def load_json(store: BlobStore, name: str) -> dict[str, Any] | None:
    blob = store.get(name)
    if blob is None:
        return None
    try:
        obj = decode_json(blob.data, name, limit=None)
    except PermanentError:
        return None
    return obj if isinstance(obj, dict) else None


def load_run(store: BlobStore, run_id: str) -> Run | None:
    blob = store.get(run_doc(run_id))
    return None if blob is None else Run.from_json(blob.data)


@dataclass(frozen=True)
class RunView:
    """One run as the CLI shows it: status, where it waits, its record and summary."""

    run_id: str
    status: Status
    run: Run | None = None
    recent: RecentRun | None = None
    position: int | None = None
    lease: Lease | None = None
    summary: dict[str, Any] | None = None
    #: `wandb` of the run record (runs/<id>/run.json): the project the service resolved.
    wandb_record: dict[str, Any] | None = None

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def reason(self) -> str | None:
        if self.recent is not None:
            return self.recent.reason.value
        if self.run is not None and self.run.reason is not None:
            return self.run.reason.value
        return None

    @property
    def detail(self) -> str:
        if self.recent is not None and self.recent.detail:
            return self.recent.detail
        return self.run.detail if self.run is not None else ""

    @property
    def started_at(self) -> datetime | None:
        if self.run is not None and self.run.started_at is not None:
            return self.run.started_at
        return self.recent.started_at if self.recent is not None else None

    @property
    def ended_at(self) -> datetime | None:
        if self.recent is not None:
            return self.recent.ended_at
        return self.run.ended_at if self.run is not None else None

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    @property
    def cost_usd(self) -> float | None:
        if self.summary is not None and self.summary.get("estimated_cost_usd") is not None:
            return float(self.summary["estimated_cost_usd"])
        if self.recent is not None and self.recent.cost_usd is not None:
            return self.recent.cost_usd
        return self.run.cost_usd if self.run is not None else None

    @property
    def wandb(self) -> dict[str, Any] | None:
        """{project, entity, group, url} of the run's wandb group, if it logs to wandb."""
        request = self.run.request if self.run is not None else None
        for source in ((self.summary or {}).get("wandb"), self.wandb_record,
                       None if request is None else
                       {"project": request.wandb_project, "entity": request.wandb_entity}):
            found = _wandb_of(source, self.run_id)
            if found is not None:
                return found
        return None

    @property
    def metrics(self) -> dict[str, Any]:
        raw = (self.summary or {}).get("metrics")
        return raw if isinstance(raw, dict) else {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status.value,
            "final": self.final,
            "reason": self.reason,
            "detail": self.detail,
            "queue_position": self.position,
            "started_at": opt_iso(self.started_at),
            "ended_at": opt_iso(self.ended_at),
            "duration_s": self.duration_s,
            "estimated_cost_usd": self.cost_usd,
            "keep_alive_until": None if self.lease is None else iso(self.lease.until),
            "run": None if self.run is None else public(self.run),
            "summary": self.summary,
            "wandb": self.wandb,
        }


def find_run(store: BlobStore, run_id: str, state: StackState | None = None) -> RunView | None:
    """Where `run_id` stands, or None when the stack has never heard of it."""
    state = load_state(store) if state is None else state
    lease = None
    if state is not None:
        lease = state.lease if state.lease is not None and state.lease.run_id == run_id else None
        if state.active is not None and state.active.run_id == run_id:
            record = load_json(store, run_doc(run_id)) or {}
            return RunView(run_id, state.active.status, run=state.active, lease=lease,
                           wandb_record=record.get("wandb") if isinstance(record, dict) else None)
        position = state.queue_position(run_id)
        if position is not None:
            queued = state.queue[position - 1]
            return RunView(run_id, queued.status, run=queued, position=position, lease=lease)
    recent = None if state is None else next(
        (r for r in state.recent if r.run_id == run_id), None)
    run = load_run(store, run_id)
    if recent is not None and run is not None and run.phase is not Phase.ENDED:
        # The record archived at the start, not yet replaced by the final one: its nodes
        # still say pending, which the ended run contradicts. Show the end without them.
        run = None
    if recent is not None:
        status = recent.status
    elif run is None:
        return None
    elif run.phase is not Phase.ENDED:
        # Archived at start, but the stack document no longer holds it (lost or replaced).
        return RunView(run_id, run.status, run=run, lease=lease)
    else:
        status = run.status
    return RunView(run_id, status, run=run, recent=recent, lease=lease,
                   summary=load_json(store, summary_doc(run_id)))


@dataclass(frozen=True)
class Overview:
    """`pcp status` without a run id: the stack at a glance."""

    stack: str
    state: StackState
    rejections: tuple[dict[str, Any], ...]

    def to_dict(self, recent: int = 5) -> dict[str, Any]:
        s = self.state
        return {
            "stack": self.stack,
            "active": None if s.active is None else public(s.active),
            "queue": [public(r) for r in s.queue],
            "lease": None if s.lease is None else s.lease.to_dict(),
            "recent": [r.to_dict() for r in s.recent[:recent]],
            "rejections": list(self.rejections),
            "budget": s.budget.to_dict(),
        }


def overview(store: BlobStore, stack: str, rejections: int = 5) -> Overview:
    state = load_state(store) or StackState()
    names = store.list(REJECTED)[-rejections:] if rejections else []
    found = []
    for name in reversed(names):
        obj = load_json(store, name) or {}
        found.append({"object": name, "at": obj.get("at"), "kind": obj.get("kind"),
                      "message_id": obj.get("message_id"), "detail": obj.get("detail")})
    return Overview(stack, state, tuple(found))


def recent_runs(store: BlobStore, limit: int) -> list[dict[str, Any]]:
    """Live, queued and recently ended runs, newest first, with duration and cost."""
    state = load_state(store) or StackState()
    rows: list[dict[str, Any]] = []
    live = ([state.active] if state.active is not None else []) + list(state.queue)
    for run in live:
        rows.append({"run_id": run.run_id, "status": run.status.value, "reason": None,
                     "detail": "", "started_at": opt_iso(run.started_at), "ended_at": None,
                     "duration_s": None, "estimated_cost_usd": None,
                     "requested_by": run.request.requested_by,
                     "training_config": shlex.join(run.request.training_args)})
    for line in state.recent:
        if len(rows) >= limit:
            break
        cost = line.cost_usd
        if cost is None:
            summary = load_json(store, summary_doc(line.run_id)) or {}
            cost = summary.get("estimated_cost_usd")
        duration = None
        if line.started_at is not None:
            duration = (line.ended_at - line.started_at).total_seconds()
        archived = load_run(store, line.run_id)
        request = archived.request if archived is not None else None
        rows.append({"run_id": line.run_id, "status": line.status.value,
                     "reason": line.reason.value, "detail": line.detail,
                     "started_at": opt_iso(line.started_at), "ended_at": iso(line.ended_at),
                     "duration_s": duration, "estimated_cost_usd": cost,
                     "requested_by": None if request is None else request.requested_by,
                     "training_config": None if request is None
                     else shlex.join(request.training_args)})
    return rows[:limit]


def download(store: BlobStore, run_id: str, dest: Path) -> list[dict[str, Any]]:
    """Copy runs/<id>/ into `dest`; an object name never writes outside it."""
    prefix = run_prefix(run_id)
    files = []
    for name in store.list(prefix):
        rel = PurePosixPath(name.removeprefix(prefix))
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            continue
        blob = store.get(name)
        if blob is None:
            continue  # deleted since the listing
        path = dest.joinpath(*rel.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob.data)
        files.append({"object": name, "path": str(path), "bytes": len(blob.data)})
    return files


class LogTail:
    """New bytes of runs/<id>/<node>/stdout.log and stderr.log since the last poll.

    Agents rewrite a log object as it grows, so each poll reads the whole object and keeps
    what is past the previous length; a shorter object was started afresh (a new attempt).
    """

    def __init__(self, store: BlobStore, run_id: str, node: str | None = None,
                 stream: str | None = None) -> None:
        self.store = store
        self.prefix = run_prefix(run_id)
        self.node = node
        self.stream = stream  # "stdout" or "stderr" for one of them; None for both
        self.offsets: dict[str, int] = {}
        #: Where in its log each chunk of the last poll begins (0: from the start).
        self.starts: dict[str, int] = {}

    @property
    def seen(self) -> bool:
        return bool(self.offsets)

    def poll(self) -> list[tuple[str, bytes]]:
        """(name under runs/<id>/, new bytes) for every log that grew."""
        chunks = []
        for name in self.store.list(self.prefix):
            if not name.endswith(("/stdout.log", "/stderr.log")) or name.count("/") != 3:
                continue
            if self.node is not None and name.split("/")[2] != self.node:
                continue
            if self.stream is not None and not name.endswith(f"/{self.stream}.log"):
                continue
            blob = self.store.get(name)
            if blob is None:
                continue
            start = self.offsets.get(name, 0)
            if len(blob.data) < start:
                start = 0
            if len(blob.data) > start:
                chunks.append((name.removeprefix(self.prefix), blob.data[start:]))
                self.starts[name.removeprefix(self.prefix)] = start
            self.offsets[name] = len(blob.data)
        return chunks


class WaitTimeout(Exception):
    """`--timeout` passed before the run ended; the run itself goes on."""


class NotAccepted(Exception):
    """No control plane took the request within the time allowed: nothing runs."""


#: How long a request may stay unaccepted before `follow` gives up (a function takes a
#: request off Pub/Sub within seconds; minutes mean none is listening).
ACCEPT_WITHIN_S = 120.0


def resolve_run_id(store: BlobStore, text: str) -> str:
    """`latest`, a unique prefix of a known run id, or the id itself.

    Known runs are the active one, the queue, the recent ends and the archive (runs/).
    A text that matches nothing is returned as written (the caller says it is unknown).
    """
    state = load_state(store) or StackState()
    live = ([state.active] if state.active is not None else []) + list(state.queue)
    known = [r.run_id for r in live] + [r.run_id for r in state.recent]
    if text == "latest":
        if state.active is not None:
            return state.active.run_id
        if state.recent:
            return max(state.recent, key=lambda r: r.ended_at).run_id
        if state.queue:
            return state.queue[-1].run_id
        raise LookupError("no run on this stack yet: `latest` names nothing")
    if text in known:
        return text
    archived = {name.split("/")[1] for name in store.list("runs/")
                if name.count("/") >= 2 and name.split("/")[1].startswith(text)}
    matches = sorted({k for k in known if k.startswith(text)} | archived)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise LookupError(f"{text!r} names {len(matches)} runs ({shown}): give more of the id")
    return text


@dataclass(frozen=True)
class NodeFailure:
    """Why a failed run failed, from one node: its exit and the end of its stderr."""

    node: str
    exit_code: int | None
    signal: str | None
    stderr_tail: tuple[str, ...]


def failures(store: BlobStore, view: RunView, lines: int = 10) -> list[NodeFailure]:
    """The nodes of an ended run that exited non-zero (or by a signal), with the last
    `lines` lines of their stderr.log."""
    if view.run is None:
        return []
    out = []
    for n in view.run.nodes:
        if n.exit_code in (None, 0) and not n.signal:
            continue
        blob = store.get(f"{run_prefix(view.run_id)}{n.name}/stderr.log")
        text = b"" if blob is None else blob.data[-64 * 1024:]
        tail = text.decode("utf-8", errors="replace").rstrip("\n").splitlines()[-lines:]
        out.append(NodeFailure(n.name, n.exit_code, n.signal or None, tuple(tail)))
    return out


class Unreachable(Exception):
    """The backend did not answer for `UNREACHABLE_GIVE_UP_S` in a row while waiting (or
    until `--timeout` passed, `timed_out`)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


#: How long a wait keeps retrying a backend that does not answer before it gives up.
UNREACHABLE_GIVE_UP_S = 600.0


def follow(store: BlobStore, run_id: str, *, on_view: Callable[[RunView | None], None],
           sleep: Callable[[float], None], monotonic: Callable[[], float],
           poll: float, timeout: float | None, settle: float = 15.0,
           accept_within: float | None = ACCEPT_WITHIN_S,
           on_tick: Callable[[], None] | None = None,
           check: Callable[[], None] | None = None,
           unreachable: Callable[[BaseException], bool] | None = None,
           on_trouble: Callable[[BaseException | None, int], None] | None = None,
           give_up: float = UNREACHABLE_GIVE_UP_S) -> RunView:
    """Poll until the run ends; `on_view` sees every poll (None: not accepted yet).

    The end is saved in the stack document a moment before the summary is archived, so an
    ended run is polled up to `settle` seconds more for its summary (metrics, cost).
    A request still unaccepted after `accept_within` seconds raises `NotAccepted`; one
    unaccepted when `timeout` passes raises it too (there is no run that goes on).
    Between polls `on_tick` is called every second (a live clock need not wait for a poll);
    before each poll `check` may raise when the backend is gone.
    A poll that fails with an error `unreachable` accepts (the backend did not answer) is
    retried at the next poll; `on_trouble(error, failures in a row)` hears of each, and of
    the recovery (`None, 0`). After `give_up` seconds without an answer, `Unreachable`.
    Time without an answer does not count towards `accept_within`.
    """
    started = monotonic()
    ended_at: float | None = None
    seen = False
    failures, down_since, blind = 0, 0.0, 0.0
    while True:
        try:
            if check is not None:
                check()
            view = find_run(store, run_id)
            on_view(view)
        except Exception as e:
            if unreachable is None or not unreachable(e):
                raise
            if failures == 0:
                down_since = monotonic()
            failures += 1
            if on_trouble is not None:
                on_trouble(e, failures)
            if monotonic() - down_since >= give_up:
                raise Unreachable(f"no answer for {monotonic() - down_since:.0f} s (last "
                                  f"error: {type(e).__name__}: {_first_line(e)})") from e
            if timeout is not None and monotonic() - started >= timeout:
                raise Unreachable(f"no answer for {monotonic() - down_since:.0f} s when "
                                  f"--timeout {timeout:g} s passed (last error: "
                                  f"{type(e).__name__}: {_first_line(e)})",
                                  timed_out=True) from e
            _pause(min(poll, 2.0), sleep, on_tick)
            continue
        if failures:
            blind += monotonic() - down_since
            failures = 0
            if on_trouble is not None:
                on_trouble(None, 0)
        seen = seen or view is not None
        waited = monotonic() - started
        if view is not None and view.final:
            ended_at = monotonic() if ended_at is None else ended_at
            if view.summary is not None or monotonic() - ended_at >= settle:
                return view
        elif not seen and (accept_within is not None and waited - blind >= accept_within or
                           timeout is not None and waited >= timeout):
            raise NotAccepted(f"no control plane accepted the request for run {run_id} "
                              f"within {waited:.0f} s, so nothing runs: check the stack with "
                              f"`pcp doctor` and the start function's logs")
        elif timeout is not None and waited >= timeout:
            raise WaitTimeout(f"gave up waiting for run {run_id} after {timeout:g} s")
        _pause(poll, sleep, on_tick)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


def _pause(seconds: float, sleep: Callable[[float], None],
           on_tick: Callable[[], None] | None) -> None:
    if on_tick is None:
        sleep(seconds)
        return
    left = seconds
    while left > 1e-9:
        step = min(1.0, left)
        sleep(step)
        left -= step
        on_tick()


#: A binary reports its progress as stdout lines `pcp-progress step=N loss=X [key=value ...]`
#: (the binary contract, docs/agent.md); the live view shows the latest and a loss curve.
PROGRESS_PREFIX = "pcp-progress "


@dataclass
class TrainingProgress:
    """What the binaries said of their training: the latest step and loss, and the losses."""

    step: int | None = None
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    #: The one node whose lines count (the first to report; every rank may print the same).
    node: str | None = None
    #: How many losses to keep (the live view's sparkline needs only the recent ones).
    keep: int = 500

    def read(self, chunks: list[tuple[str, bytes]]) -> TrainingProgress:
        for name, data in chunks:
            text = data.decode("utf-8", errors="replace")
            node = name.split("/", 1)[0]
            if self.node is None and PROGRESS_PREFIX in text:
                self.node = node
            if node != self.node:
                continue
            for line in text.splitlines():
                if not line.startswith(PROGRESS_PREFIX):
                    continue
                fields = dict(p.split("=", 1) for p in line.split()[1:] if "=" in p)
                try:
                    step = int(fields["step"]) if "step" in fields else None
                    loss = float(fields["loss"]) if "loss" in fields else None
                except ValueError:
                    continue
                if loss is not None and loss != loss:  # NaN: nothing to draw
                    loss = None
                if step is not None and (self.step is None or step >= self.step):
                    self.step = step
                if loss is not None:
                    self.loss = loss
                    self.losses.append(loss)
                    del self.losses[:-self.keep]
        return self


def loss_curve(logs: dict[str, bytes], prefer: str | None = None) -> list[float]:
    """Every loss the binaries reported in their stdout logs (node -> stdout.log bytes): the
    `prefer`red node's (the run's metrics node) when it reported any, else the first node's
    to report."""
    chunks = [(f"{node}/stdout.log", data) for node, data in sorted(logs.items())]
    if prefer is not None and prefer in logs:
        mine = TrainingProgress(node=prefer, keep=1_000_000).read(chunks)
        if len(mine.losses) > 1:
            return mine.losses
    return TrainingProgress(keep=1_000_000).read(chunks).losses


def last_lines(chunks: list[tuple[str, bytes]], into: dict[str, str]) -> dict[str, str]:
    """Keep the latest non-empty line each node wrote (`LogTail.poll` chunks), by node."""
    for name, data in chunks:
        lines = [ln for ln in data.decode("utf-8", errors="replace").splitlines() if ln.strip()]
        if lines:
            into[name.split("/", 1)[0]] = lines[-1][-200:]
    return into


def gpu_usage(store: BlobStore, run: Run | None) -> dict[str, str]:
    """Each node's GPU utilization from its last heartbeat (runs/<run>/<node>/heartbeat.json,
    written by the agent from nvidia-smi, docs/agent.md), as `pcp status` shows it: `87% 10240
    MiB` per GPU, `n/a` for a value the GPU does not report, or why the sample failed. Nodes
    without GPUs (no `gpus` in the heartbeat) and heartbeats of another attempt are left out."""
    out: dict[str, str] = {}
    if run is None:
        return out
    for node in run.nodes:
        beat = load_json(store, node_file(run.run_id, node.name, "heartbeat.json"))
        if beat is None or beat.get("attempt") != run.attempt:
            continue
        gpus, error = beat.get("gpus"), beat.get("gpu_error")
        if isinstance(gpus, list) and gpus:
            out[node.name] = ", ".join(_gpu_text(g) for g in gpus[:16])
        elif isinstance(error, str) and error:
            out[node.name] = f"unavailable: {error[:80]}"
    return out


def _gpu_text(g: object) -> str:
    if not isinstance(g, dict):
        return "?"
    util, mem = g.get("utilization_percent"), g.get("memory_used_mib")
    u = f"{util:g}%" if isinstance(util, int | float) and not isinstance(util, bool) else "n/a"
    m = f"{mem:g} MiB" if isinstance(mem, int | float) and not isinstance(mem, bool) else "n/a"
    return f"{u} {m}"
