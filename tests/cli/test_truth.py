"""The CLI says what is true: a reused run id, a request it changed or refuses, a run state
its nodes contradict, why a run failed, and which run a short name means."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
from rich.console import Console

from pcp.cli.render import Progress, runs_table
from pcp.cli.views import WaitTimeout, find_run, follow, last_lines
from pcp.core.names import run_doc
from tests.cli.conftest import POLICY, T0

pytestmark = pytest.mark.cli

USAGE = ("usage: train [-h] [--lr LR] [--steps STEPS]\n"
         "train: error: unrecognized arguments: --lrr 0.1\n")


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.output
    assert lines and lines[-1].startswith("pcp: error: "), result.output
    return lines[-1]


def fail_with_usage(stack, run_id: str) -> None:
    """A run whose worker exits 2 after printing the trainer's usage error on stderr."""
    stack.start(run_id, training_config="--lrr 0.1")
    for node in POLICY.node_names:
        stack.marker(run_id, node, "booted", T0 + timedelta(minutes=1))
    stack.store.put(f"runs/{run_id}/worker-0/stderr.log", USAGE.encode())
    stack.store.put(f"runs/{run_id}/worker-0/stdout.log", b"loading data\n")
    stack.marker(run_id, "worker-0", "done", T0 + timedelta(minutes=2), exit_code=2,
                 duration_s=60.0)
    stack.marker(run_id, "shepherd", "done", T0 + timedelta(minutes=2), exit_code=0,
                 duration_s=60.0)


# ---------------------------------------------------------------- 1: a reused run id


def test_reused_run_id_with_another_request_is_refused(stack, invoke) -> None:
    stack.start("myexp", training_config="--lr 0.1")
    stack.finish("myexp", {})
    result = invoke(["run", "--run-id", "myexp", "--config", "--lr 0.5", "--wait",
                     "--poll", "0.01"], obj=stack.context)
    assert result.exit_code == 2, result.output
    assert "run id 'myexp' is already used" in error_line(result)
    assert "succeeded" not in result.stdout and "0.125" not in result.stdout
    assert stack.published("start") == []


def test_reused_run_id_with_the_same_request_is_the_same_run(stack, invoke) -> None:
    stack.start("myexp", training_config="--lr 0.1")
    stack.finish("myexp", {})
    result = invoke(["run", "--run-id", "myexp", "--config", "--lr 0.1", "--wait",
                     "--poll", "0.01"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "this is the same run, not a new one" in result.stderr
    assert stack.published("start") == []


# ---------------------------------------------------------------- 4: no contradicting frame


def test_an_ended_run_is_never_shown_with_pending_nodes(stack, invoke) -> None:
    stack.start("r-x")
    at_start = stack.store.get(run_doc("r-x")).data  # archived when the run started
    stack.finish("r-x", {})
    stack.store.put(run_doc("r-x"), at_start)  # the final record not yet archived
    out = invoke(["status", "r-x"], obj=stack.context).stdout
    assert "succeeded" in out and "pending" not in out
    data = json.loads(invoke(["status", "r-x", "--json"], obj=stack.context).stdout)
    assert data["status"] == "succeeded" and data["run"] is None


# ---------------------------------------------------------------- 5: no silent changes


@pytest.mark.parametrize("args, message", [
    (["--poll", "0"], "'--poll': 0.0 is not in the range"),
    (["--timeout", "60"], "--timeout only applies with --wait"),
    (["--binary", "not a ref"], "--binary 'not a ref' is not a flake reference"),
    (["--binary", '{"x86_64-linux": "a b"}'], "--binary for x86_64-linux 'a b'"),
])
def test_a_request_that_would_be_changed_or_fail_later_is_refused(stack, invoke, args,
                                                                  message) -> None:
    result = invoke(["run", *args], obj=stack.context)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert stack.bus.messages == []


def test_max_hours_capped_by_the_stack_is_said(stack, invoke, control_plane) -> None:
    control_plane(stack.store, stack.bus, {})
    result = invoke(["run", "--run-id", "r-long", "--max-hours", "999", "--wait",
                     "--poll", "0.01", "--timeout", "20"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "max_hours 999 capped to the stack limit 6" in result.stderr


# ---------------------------------------------------------------- 7: a failure says why


def test_failed_run_prints_the_exit_the_stderr_and_the_logs_command(stack, invoke) -> None:
    fail_with_usage(stack, "r-typo")
    result = invoke(["status", "r-typo"], obj=stack.context)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "worker-0 failed with exit code 2" in out
    assert "unrecognized arguments: --lrr 0.1" in out  # the trainer's own usage error
    assert "pcp logs r-typo --node worker-0 --stack tiny" in out


def test_watch_of_a_failed_run_says_why_and_exits_1(stack, invoke) -> None:
    fail_with_usage(stack, "r-typo")
    result = invoke(["watch", "r-typo", "--poll", "0.01"], obj=stack.context)
    assert result.exit_code == 1, result.output
    assert "unrecognized arguments: --lrr 0.1" in result.stdout
    assert "pcp logs r-typo --node worker-0" in result.stdout
    assert "worker-0 exited with code 2" in error_line(result)


def test_logs_can_print_one_stream(stack, invoke) -> None:
    fail_with_usage(stack, "r-typo")
    out = invoke(["logs", "r-typo", "--node", "worker-0", "--stream", "stderr"],
                 obj=stack.context).stdout
    assert "unrecognized arguments" in out and "loading data" not in out


# ---------------------------------------------------------------- 8: re-attach and refer


def test_watch_and_status_w_follow_a_run_to_its_end(stack, invoke) -> None:
    stack.start("r-20261129-120000-abcd")
    stack.finish("r-20261129-120000-abcd", {})
    for args in (["watch", "r-20261129-120000-abcd"], ["status", "-w", "latest"]):
        result = invoke([*args, "--poll", "0.01"], obj=stack.context)
        assert result.exit_code == 0, result.output
        assert "succeeded" in result.stdout and "0.125" in result.stdout


def test_latest_and_unique_prefixes_name_a_run(stack, invoke) -> None:
    stack.start("r-20261129-120000-abcd")
    stack.finish("r-20261129-120000-abcd", {})
    stack.start("r-20261129-130000-ef01", now=T0 + timedelta(hours=1))
    data = json.loads(invoke(["status", "latest", "--json"], obj=stack.context).stdout)
    assert data["run_id"] == "r-20261129-130000-ef01"
    data = json.loads(invoke(["status", "r-20261129-12", "--json"], obj=stack.context).stdout)
    assert data["run_id"] == "r-20261129-120000-abcd"
    out = invoke(["logs", "r-20261129-12", "--node", "worker-0"], obj=stack.context).stdout
    assert "worker-0: step 1" in out
    result = invoke(["status", "r-2026"], obj=stack.context)
    assert result.exit_code == 1
    assert "'r-2026' names 2 runs" in error_line(result)


def test_runs_shows_the_config_and_never_folds_an_id_at_80_columns(stack, invoke) -> None:
    run_id = "gh-12345678-run-with-a-long-name-1"
    stack.start(run_id, training_config="--lr 0.1 --steps 100")
    stack.finish(run_id, {"worker-0": 1})
    out = invoke(["runs"], obj=stack.context).stdout
    assert "--lr 0.1 --steps 100" in out
    buf = io.StringIO()
    Console(file=buf, width=80).print(runs_table(
        [dict(row, detail="x" * 60) for row in _rows(invoke, stack)]))
    assert run_id in buf.getvalue()


def _rows(invoke, stack) -> list[dict]:
    return json.loads(invoke(["runs", "--json"], obj=stack.context).stdout)["runs"]



# ---------------------------------------------------------------- 6: a live view


def test_the_live_clock_moves_every_second_between_polls(stack) -> None:
    stack.start("r-t")
    clock, ticks = [0.0], []
    with pytest.raises(WaitTimeout):
        follow(stack.store, "r-t", on_view=lambda v: None,
               sleep=lambda s: clock.__setitem__(0, clock[0] + s),
               monotonic=lambda: clock[0], poll=5, timeout=10,
               on_tick=lambda: ticks.append(clock[0]))
    assert ticks == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def test_the_live_view_shows_each_nodes_latest_line_and_a_ticking_clock(stack) -> None:
    stack.start("r-live")
    stack.marker("r-live", "worker-0", "booted", T0 + timedelta(minutes=1))
    view = find_run(stack.store, "r-live")
    buf, clock = io.StringIO(), [0.0]
    terminal = Console(file=buf, force_terminal=True, width=100, color_system=None)
    with Progress(terminal, "r-live", lambda: clock[0]) as show:
        show.latest.update({"worker-0": "step 40/100 loss 0.3125"})
        show(view)
        for _ in range(3):
            clock[0] += 1
            show.tick()
    out = buf.getvalue()
    assert "step 40/100 loss 0.3125" in out
    assert all(f"{s}s" in out for s in (1, 2, 3))  # redrawn every second, not every poll


def test_last_lines_keeps_each_nodes_latest_line() -> None:
    latest = last_lines([("worker-0/stdout.log", b"step 1\nstep 2\n\n"),
                         ("shepherd/stdout.log", b"loss 0.5")], {})
    assert latest == {"worker-0": "step 2", "shepherd": "loss 0.5"}


# ---------------------------------------------------------------- --help


def test_top_level_help_lists_every_command_whole_at_80_columns(invoke) -> None:
    from pcp.cli import cli

    result = invoke(["--help"], env={"COLUMNS": "80"})
    lines = result.stdout.splitlines()
    commands = lines[lines.index("Commands:") + 1:]
    assert {line.split()[0] for line in commands if line.strip()} == set(cli.commands)
    assert all(len(line) <= 80 and not line.endswith("...") for line in commands)


# ---------------------------------------------------------------- 11: costs


def test_costs_in_text_match_the_json_and_runs_has_totals(stack, invoke) -> None:
    from pcp.cli.render import cost

    assert cost(0.004) == "$0.0040" and cost(0.05) == "$0.05" and cost(0) == "$0.00"
    for run_id in ("r-a", "r-b"):
        stack.start(run_id)
        stack.finish(run_id, {})
    rows = _rows(invoke, stack)
    out = invoke(["runs"], obj=stack.context).stdout
    total = sum(r["estimated_cost_usd"] for r in rows)
    assert "total (2 runs)" in out and f"${total:.2f}" in out and "1h00m00s" in out


# ---------------------------------------------------------------- 9: results


def test_results_go_into_run_dirs_under_the_current_directory(stack, invoke, tmp_path,
                                                               monkeypatch) -> None:
    for run_id in ("r-one", "r-two"):
        stack.start(run_id)
        stack.finish(run_id, {})
    monkeypatch.chdir(tmp_path)
    for run_id in ("r-one", "r-two"):
        result = invoke(["results", run_id], obj=stack.context)
        assert result.exit_code == 0, result.output
    for run_id in ("r-one", "r-two"):
        summary = json.loads((tmp_path / run_id / "summary.json").read_text())
        assert summary["run_id"] == run_id


# ---------------------------------------------------------------- 2: a dead backend


def test_a_replica_that_dies_during_wait_is_said_in_one_line(stack, invoke) -> None:
    from pcp.cli.context import ReplicaDown

    polls = []

    def gone() -> None:
        polls.append(1)
        if len(polls) > 2:
            raise ReplicaDown("the local replica of stack tiny is not running (nothing "
                              "answers at http://127.0.0.1:1): run `pcp local up --stack tiny`")

    stack.context.check_backend = gone  # type: ignore[method-assign]
    stack.start("r-dead")
    result = invoke(["run", "--run-id", "r-dead2", "--wait", "--poll", "0.01", "--timeout",
                     "5"], obj=stack.context)
    assert result.exit_code == 1, result.output
    assert "the local replica of stack tiny is not running" in error_line(result)
    assert len(polls) == 3


def test_the_replica_check_fails_in_seconds_when_nothing_answers() -> None:
    import socket
    import time as _time

    from pcp.cli.config import Config
    from pcp.cli.context import CloudContext, ReplicaDown

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = CloudContext(Config("tiny", "pcp-local", "pcp-tiny-pcp-local", local=True,
                              storage_endpoint=f"http://127.0.0.1:{port}",
                              pubsub_host=f"127.0.0.1:{port}"))
    started = _time.monotonic()
    with pytest.raises(ReplicaDown, match="pcp local up --stack tiny"):
        ctx.check_backend()
    assert _time.monotonic() - started < 5


def test_the_live_view_shows_the_trainings_step_loss_and_curve(stack) -> None:
    from pcp.cli.render import sparkline
    from pcp.cli.views import TrainingProgress

    chunks = [("shepherd/stdout.log", b"".join(
        f"pcp-progress step={i} loss={1 / i:.4f}\n".encode() for i in range(1, 11))),
        ("worker-0/stdout.log", b"pcp-progress step=99 loss=9\n"),  # counted once: one node
        ("shepherd/stdout.log", b"pcp-progress step=x loss=oops\nnot progress\n")]
    training = TrainingProgress().read(chunks)
    assert (training.step, training.loss, len(training.losses)) == (10, 0.1, 10)
    curve = sparkline(training.losses)
    assert len(curve) == 10 and curve[0] == "█" and curve[-1] == "▁"
    stack.start("r-tr")
    stack.marker("r-tr", "worker-0", "booted", T0 + timedelta(minutes=1))
    buf = io.StringIO()
    terminal = Console(file=buf, force_terminal=True, width=100, color_system=None)
    with Progress(terminal, "r-tr", lambda: 0.0) as show:
        show.training.read(chunks)
        show(find_run(stack.store, "r-tr"))
    out = buf.getvalue()
    assert "step 10" in out and "loss 0.1" in out and curve in out


def test_the_job_summary_draws_the_loss_curve_as_a_mermaid_chart(stack, invoke) -> None:
    stack.start("r-md")
    stack.finish("r-md", {})
    stack.store.put("runs/r-md/shepherd/stdout.log", b"".join(
        f"pcp-progress step={i} loss={1 / i:.3f}\n".encode() for i in range(1, 301)))
    out = invoke(["status", "r-md", "--format", "markdown"], obj=stack.context).stdout
    chart = out[out.index("```mermaid"):]
    assert "xychart-beta" in chart and "line [1, 0.25," in chart and "0.003]" in chart
    assert len(chart.split("line [")[1].split(",")) <= 101


# ---------------------------------------------------------------- 10: from any directory


def test_the_replica_is_found_from_any_directory_of_the_checkout(tmp_path) -> None:
    from pcp.cli.config import local_dir

    checkout = tmp_path / "pcp"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "docs" / "deep").mkdir(parents=True)
    assert local_dir({}, checkout / "docs" / "deep") == checkout.resolve() / ".pcp-local"
    (checkout / ".pcp-local").mkdir()
    assert local_dir({}, checkout / "docs") == checkout.resolve() / ".pcp-local"
    assert local_dir({"PCP_LOCAL_DIR": "/x"}, checkout) == Path("/x")


def test_status_says_when_the_stack_capped_max_hours(stack, invoke) -> None:
    stack.start("r-cap", max_hours=999)
    out = invoke(["status", "r-cap"], obj=stack.context).stdout
    assert "max_hours 999 capped to the stack limit 6" in out
