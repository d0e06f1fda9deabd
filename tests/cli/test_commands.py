"""Every command over the in-memory twins: human output, --json, exit codes, what is published.

The Context is injected (`obj=`), so these run the real click commands, the real control
plane (`pcp.service.Service`) and the real state documents, with no cloud and no emulator.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import timedelta

import pytest

from pcp.core.messages import StartRequest, StopRequest, SweepTick
from pcp.core.state import Status

pytestmark = pytest.mark.cli

RUN_ID_STYLE = re.compile(r"^r-\d{8}-\d{6}-[0-9a-f]{4}$")


def one_line_error(result) -> str:
    """The error output of a failed command: exactly one line, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    assert lines[0].startswith("pcp: error: ")
    return lines[0]


# ---------------------------------------------------------------- run


def test_run_publishes_a_valid_start_request(stack, invoke) -> None:
    result = invoke(["run", "--stack", "tiny", "--config", "--lr 0.1 --name 'a b'",
                     "--keep-vm-alive", "--max-hours", "2", "--max-restarts", "1",
                     "--binary", "github:example/trainer#train"],
                    obj=stack.context, env={"GITHUB_ACTOR": "octocat"})
    assert result.exit_code == 0, result.output
    run_id = result.stdout.strip()
    assert RUN_ID_STYLE.match(run_id)
    [data] = stack.published("start")
    request = StartRequest.from_json(data)
    assert request.run_id == run_id
    assert request.training_args == ("--lr", "0.1", "--name", "a b")
    assert request.keep_vm_alive and request.max_hours == 2.0 and request.max_restarts == 1
    assert request.binary == "github:example/trainer#train"
    assert request.requested_by == "octocat" and request.stack == "tiny"
    assert f"pcp watch {run_id}" in result.stderr


def test_run_json_with_fixed_id_and_platform_map(stack, invoke) -> None:
    binary = '{"x86_64-linux": "/nix/store/a-train", "aarch64-darwin": "/nix/store/b-train"}'
    result = invoke(["run", "--run-id", "gh-42-1", "--binary", binary, "--json"],
                    obj=stack.context)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["run_id"] == "gh-42-1" and out["stack"] == "tiny" and out["message_id"] == "1"
    request = StartRequest.from_json(stack.published("start")[0])
    assert request.binary == json.loads(binary)
    assert out["request"] == request.to_dict()


@pytest.mark.parametrize("args, message", [
    (["--config", "--name 'unbalanced"], "training_config has unbalanced quotes"),
    (["--max-restarts", "99"], "max_restarts must be between 0 and 10"),
    (["--run-id", "Bad_Id"], "run_id 'Bad_Id' is invalid"),
    (["--max-hours", "-1"], "max_hours must be positive"),
    (["--binary", "{not json"], "--binary looks like a JSON platform map"),
])
def test_invalid_run_is_one_line_and_publishes_nothing(stack, invoke, args,
                                                       message) -> None:
    result = invoke(["run", *args], obj=stack.context)
    assert result.exit_code == 2
    assert message in one_line_error(result)
    assert stack.bus.messages == []


def test_unknown_stack_is_one_line(stack, invoke) -> None:
    result = invoke(["run", "--stack", "medium"], obj=stack.context)
    assert result.exit_code == 1
    assert "unknown stack 'medium'" in one_line_error(result)
    assert stack.bus.messages == []


def test_run_wait_success(stack, invoke, control_plane) -> None:
    # Half a second in each state: the wait must see the run starting even on a busy machine.
    control_plane(stack.store, stack.bus, {}, delay=0.5)
    result = invoke(["run", "--run-id", "r-ok", "--wait", "--poll", "0.01", "--timeout", "20"],
                    obj=stack.context)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[0] == "r-ok"
    # Plain line-per-change progress (not a terminal), then the final summary.
    assert "run r-ok: starting" in out or "run r-ok: running" in out
    assert "run r-ok: succeeded" in out
    assert "succeeded" in out and "shepherd" in out and "exit 0" in out
    assert "loss" in out and "0.125" in out  # final metrics from summary.json
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == len(set(line.split("] ", 1)[1] for line in lines))  # only changes


def test_run_wait_failure_exits_1_with_the_reason(stack, invoke, control_plane) -> None:
    control_plane(stack.store, stack.bus, {"worker-0": 3})
    result = invoke(["run", "--run-id", "r-bad", "--wait", "--poll", "0.01", "--timeout", "20"],
                    obj=stack.context)
    assert result.exit_code == 1, result.output
    assert "worker-0 exited with code 3" in one_line_error(result)
    assert "exit 3" in result.stdout  # the summary's node table


@pytest.mark.parametrize("end, status, reason", [
    ("reject", "rejected", "no binary: pass one in the request"),
    ("cancel", "cancelled", "removed from the queue: changed my mind"),
])
def test_run_wait_rejected_or_cancelled_exits_1(stack, invoke, end, status,
                                                reason) -> None:
    stack.start("r-first")  # holds the stack, so the next run waits in the queue

    def control_plane() -> None:
        while not stack.published("start"):
            time.sleep(0.005)
        if end == "reject":
            stack.service.reject("r-end", "no binary: pass one in the request", stack.t0)
        else:
            stack.service.handle(StartRequest.from_json(stack.published("start")[0]), stack.t0)
            time.sleep(0.05)
            stack.service.handle(StopRequest("r-end", "changed my mind"), stack.t0)

    thread = threading.Thread(target=control_plane, daemon=True)
    thread.start()
    result = invoke(["run", "--run-id", "r-end", "--wait", "--poll", "0.01", "--timeout", "20"],
                    obj=stack.context)
    thread.join(10)
    assert result.exit_code == 1, result.output
    error = one_line_error(result)
    assert f"run r-end {status}" in error and reason in error
    if end == "cancel":
        assert "queue position 1" in result.stdout


def test_run_wait_json(stack, invoke, control_plane) -> None:
    control_plane(stack.store, stack.bus, {})
    result = invoke(["run", "--run-id", "r-js", "--wait", "--json", "--poll", "0.01"],
                    obj=stack.context)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "succeeded" and out["final"] and out["message_id"] == "1"
    assert out["summary"]["metrics"] == {"loss": 0.125, "steps": 100}


def test_run_wait_timeout_leaves_the_run_alone(stack, invoke) -> None:
    def accept(seconds: float) -> None:  # the control plane takes the request, nodes are slow
        for data in stack.published("start"):
            stack.service.handle(StartRequest.from_json(data), stack.t0)
        time.sleep(0.005)

    stack.context.sleep = accept
    result = invoke(["run", "--run-id", "r-slow", "--wait", "--poll", "0.01", "--timeout",
                     "0.05"], obj=stack.context)
    assert result.exit_code == 3
    error = one_line_error(result)
    assert "gave up waiting for run r-slow" in error and "pcp status r-slow" in error
    assert "the run goes on" in error
    assert [StartRequest.from_json(d).run_id for d in stack.published("start")] == ["r-slow"]
    assert stack.published("stop") == []


def test_run_wait_timeout_never_says_an_unaccepted_run_goes_on(stack, invoke) -> None:
    result = invoke(["run", "--run-id", "r-lost", "--wait", "--poll", "0.01", "--timeout",
                     "0.05"], obj=stack.context)
    assert result.exit_code == 3
    error = one_line_error(result)
    assert "no control plane accepted the request for run r-lost" in error
    assert "pcp doctor" in error and "goes on" not in error
    assert "waiting for the control plane to accept the request" in result.stdout


def test_run_wait_ctrl_c_does_not_stop_the_run(stack, invoke) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    stack.context.sleep = interrupt
    result = invoke(["run", "--run-id", "r-int", "--wait"], obj=stack.context)
    assert result.exit_code == 130
    assert "run r-int goes on" in result.stderr
    assert "pcp stop r-int --stack tiny" in result.stderr
    assert stack.published("stop") == []


# ---------------------------------------------------------------- status, runs, queue


def test_status_overview(stack, invoke) -> None:
    stack.start("r-done")
    stack.finish("r-done", {})
    stack.start("r-live", requested_by="alice")
    stack.start("r-next", requested_by="bob")
    stack.store.put("control/rejected/2026-11-29T12:00:00.000Z-stop-77.json", json.dumps(
        {"kind": "stop", "message_id": "77", "detail": "stop request must name a run_id",
         "at": "2026-11-29T12:00:00.000Z"}).encode())
    result = invoke(["status"], obj=stack.context)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "run r-live starting" in out
    assert "r-next" in out and "bob" in out  # the queue
    assert "r-done" in out and "succeeded" in out  # recent ends
    assert "stop request must name a run_id" in out  # recent rejections
    data = json.loads(invoke(["status", "--json"], obj=stack.context).stdout)
    assert data["active"]["run_id"] == "r-live"
    assert [r["run_id"] for r in data["queue"]] == ["r-next"]
    assert data["recent"][0]["run_id"] == "r-done"
    assert data["rejections"][0]["message_id"] == "77"


def test_status_of_one_run_in_every_format(stack, invoke) -> None:
    stack.start("r-one", requested_by="alice")
    stack.finish("r-one", {})
    human = invoke(["status", "r-one"], obj=stack.context)
    assert human.exit_code == 0, human.output
    for text in ("r-one", "succeeded", "alice", "30m00s", "$0.75", "worker-0", "loss"):
        assert text in human.stdout
    data = json.loads(invoke(["status", "r-one", "--json"], obj=stack.context).stdout)
    assert data["status"] == "succeeded" and data["duration_s"] == 1800.0
    assert data["estimated_cost_usd"] == pytest.approx(0.75)
    assert data["run"]["nodes"][1]["exit_code"] == 0
    md = invoke(["status", "r-one", "--format", "markdown"], obj=stack.context).stdout
    assert md.startswith("### ✅ Training run `r-one` on stack `tiny`: succeeded")
    assert "| duration | 30m00s |" in md and "| estimated cost | $0.75 |" in md
    assert "| loss | 0.125 |" in md and "| worker-0 | exit 0 | 30m00s |" in md


def test_status_of_a_queued_run_shows_its_position(stack, invoke) -> None:
    stack.start("r-a")
    stack.start("r-b")
    data = json.loads(invoke(["status", "r-b", "--json"], obj=stack.context).stdout)
    assert data["status"] == "queued" and data["queue_position"] == 1 and not data["final"]


def test_status_markdown_escapes_table_breakers(stack, invoke) -> None:
    stack.start("r-md")
    stack.store.put("runs/r-md/shepherd/metrics.json", b'{"a|b": "x|y"}')
    stack.marker("r-md", "shepherd", "booted", stack.t0)
    stack.marker("r-md", "worker-0", "done", stack.t0, exit_code=1)
    md = invoke(["status", "r-md", "--format", "markdown"], obj=stack.context).stdout
    assert "### ❌" in md and "| a\\|b | x\\|y |" in md


def test_status_unknown_run(stack, invoke) -> None:
    result = invoke(["status", "r-nope"], obj=stack.context)
    assert result.exit_code == 1
    assert "unknown run 'r-nope' on stack tiny" in one_line_error(result)


def test_status_markdown_needs_a_run(stack, invoke) -> None:
    result = invoke(["status", "--format", "markdown"], obj=stack.context)
    assert result.exit_code == 2
    one_line_error(result)


def test_runs(stack, invoke) -> None:
    assert "no runs on stack tiny yet" in invoke(["runs"], obj=stack.context).stdout
    stack.start("r-1")
    stack.finish("r-1", {"shepherd": 2})
    stack.start("r-2")
    result = invoke(["runs"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "r-1" in result.stdout and "failed" in result.stdout and "r-2" in result.stdout
    rows = json.loads(invoke(["runs", "--json"], obj=stack.context).stdout)["runs"]
    assert [(r["run_id"], r["status"]) for r in rows] == [("r-2", "starting"), ("r-1", "failed")]
    assert rows[1]["reason"] == "failed" and rows[1]["duration_s"] == 1800.0
    assert rows[1]["estimated_cost_usd"] == pytest.approx(0.75)
    assert "shepherd exited with code 2" in rows[1]["detail"]
    limited = json.loads(invoke(["runs", "--json", "--limit", "1"], obj=stack.context).stdout)
    assert len(limited["runs"]) == 1


def test_queue(stack, invoke) -> None:
    assert "queue: empty" in invoke(["queue"], obj=stack.context).stdout
    for run_id in ("r-a", "r-b", "r-c"):
        stack.start(run_id, requested_by="carol")
    human = invoke(["queue"], obj=stack.context).stdout
    assert "active: r-a starting" in human
    assert human.index("r-b") < human.index("r-c") and "carol" in human
    data = json.loads(invoke(["queue", "--json"], obj=stack.context).stdout)
    assert data["active"]["run_id"] == "r-a"
    assert [(r["run_id"], r["position"]) for r in data["queue"]] == [("r-b", 1), ("r-c", 2)]


# ---------------------------------------------------------------- logs and results


def test_logs(stack, invoke) -> None:
    stack.start("r-log")
    stack.finish("r-log", {})
    stack.store.put("runs/r-log/worker-0/stderr.log", b"warning: slow disk\n")
    result = invoke(["logs", "r-log"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "==> shepherd/stdout.log <==\nshepherd: step 1\n" in result.stdout
    assert "==> worker-0/stderr.log <==\nwarning: slow disk\n" in result.stdout
    only = invoke(["logs", "r-log", "--node", "worker-0"], obj=stack.context).stdout
    assert "shepherd: step 1" not in only and "worker-0: step 1" in only


def test_logs_follow_prints_new_bytes_until_the_run_ends(stack, invoke) -> None:
    stack.start("r-f")
    stack.store.put("runs/r-f/worker-0/stdout.log", b"line 1\n")
    polls = []

    def tick(seconds: float) -> None:  # each poll, the node writes more; the third ends it
        polls.append(seconds)
        if len(polls) == 1:
            stack.store.put("runs/r-f/worker-0/stdout.log", b"line 1\nline 2\n")
        if len(polls) == 2:
            stack.finish("r-f", {}, logs=False)
            stack.store.put("runs/r-f/worker-0/stdout.log", b"line 1\nline 2\nline 3\n")

    stack.context.sleep = tick
    result = invoke(["logs", "r-f", "--follow", "--node", "worker-0", "--poll", "0.5"],
                    obj=stack.context)
    assert result.exit_code == 0, result.output
    assert result.stdout == "==> worker-0/stdout.log <==\nline 1\nline 2\nline 3\n"
    assert polls == [0.5, 0.5]


def test_logs_errors(stack, invoke) -> None:
    assert "unknown run 'r-x'" in one_line_error(invoke(["logs", "r-x"], obj=stack.context))
    bad = invoke(["logs", "r-x", "--node", "../etc"], obj=stack.context)
    assert bad.exit_code == 2 and "--node '../etc'" in one_line_error(bad)
    stack.start("r-quiet")
    result = invoke(["logs", "r-quiet"], obj=stack.context)
    assert result.exit_code == 0 and "no logs yet for run r-quiet" in result.stderr


def test_results_downloads_the_run(stack, invoke, tmp_path) -> None:
    stack.start("r-res")
    stack.finish("r-res", {})
    stack.store.put("runs/r-res/worker-0/ckpt/step-100.pt", b"\x00weights")
    dest = tmp_path / "out" / "r-res"  # DEST/RUN_ID/: one run never overwrites another's
    result = invoke(["results", "r-res", "--dest", str(tmp_path / "out")], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert (dest / "worker-0" / "ckpt" / "step-100.pt").read_bytes() == b"\x00weights"
    assert json.loads((dest / "summary.json").read_text())["status"] == "succeeded"
    assert json.loads((dest / "shepherd" / "metrics.json").read_text())["loss"] == 0.125
    assert "downloaded" in result.stdout and "succeeded" in result.stdout
    data = json.loads(invoke(["results", "r-res", "--dest", str(tmp_path / "j"), "--json"],
                             obj=stack.context).stdout)
    names = {f["object"] for f in data["files"]}
    assert {"runs/r-res/run.json", "runs/r-res/summary.json",
            "runs/r-res/worker-0/ckpt/step-100.pt"} <= names
    assert data["run"]["status"] == "succeeded"


def test_results_never_write_outside_dest(stack, invoke, tmp_path) -> None:
    stack.start("r-evil")
    stack.store.put("runs/r-evil/../../escape.txt", b"no")
    result = invoke(["results", "r-evil", "--dest", str(tmp_path / "d")], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "escape.txt").exists()
    assert not any(p.name == "escape.txt" for p in tmp_path.rglob("*"))


def test_results_into_an_unwritable_place_is_one_line(stack, invoke, tmp_path) -> None:
    stack.start("r-w")
    (tmp_path / "file").write_text("in the way")
    result = invoke(["results", "r-w", "--dest", str(tmp_path / "file" / "sub")],
                    obj=stack.context)
    assert result.exit_code == 1
    assert str(tmp_path / "file") in one_line_error(result)


def test_results_unknown_run(stack, invoke, tmp_path) -> None:
    result = invoke(["results", "r-zz", "--dest", str(tmp_path)], obj=stack.context)
    assert result.exit_code == 1 and "unknown run 'r-zz'" in one_line_error(result)


# ---------------------------------------------------------------- stop and sweep


def test_stop_unknown_run_is_a_clear_error(stack, invoke) -> None:
    result = invoke(["stop", "r-ghost"], obj=stack.context)
    assert result.exit_code == 1
    assert "unknown run 'r-ghost' on stack tiny" in one_line_error(result)
    assert stack.published("stop") == []
    ok = invoke(["stop", "r-ghost", "--missing-ok"], obj=stack.context)
    assert ok.exit_code == 0 and "nothing to stop" in ok.stdout
    assert stack.published("stop") == []


def test_stop_active_run_publishes_a_stop_request(stack, invoke) -> None:
    stack.start("r-stop")
    result = invoke(["stop", "r-stop", "--reason", "workflow cancelled"], obj=stack.context,
                    env={"GITHUB_ACTOR": "octocat"})
    assert result.exit_code == 0, result.output
    assert "stop requested for run r-stop (starting)" in result.stdout
    [data] = stack.published("stop")
    assert StopRequest.from_json(data) == StopRequest("r-stop", "workflow cancelled", "octocat")
    # The control plane acts on it: the run ends cancelled.
    stack.service.handle(StopRequest.from_json(data), stack.t0 + timedelta(minutes=1))
    assert json.loads(invoke(["status", "r-stop", "--json"], obj=stack.context).stdout)[
        "status"] == Status.CANCELLED.value


def test_stop_queued_and_ended_runs(stack, invoke) -> None:
    stack.start("r-a")
    stack.start("r-b")
    queued = invoke(["stop", "r-b"], obj=stack.context)
    assert "queued at position 1" in queued.stdout
    stack.finish("r-a", {})
    ended = invoke(["stop", "r-a"], obj=stack.context)
    assert ended.exit_code == 0 and "already ended (succeeded); nothing to stop" in ended.stdout
    assert [StopRequest.from_json(d).run_id for d in stack.published("stop")] == ["r-b"]


def test_stop_ends_a_keep_alive_lease(stack, invoke) -> None:
    stack.start("r-keep", keep_vm_alive=True)
    stack.finish("r-keep", {})
    result = invoke(["stop", "r-keep"], obj=stack.context)
    assert "its kept-alive VMs" in result.stdout
    assert [StopRequest.from_json(d).run_id for d in stack.published("stop")] == ["r-keep"]


def test_stop_grace_waits_for_a_run_just_requested(stack, invoke) -> None:
    clock = [0.0]

    def later(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 4:
            stack.start("r-late")

    stack.context.sleep = later
    stack.context.monotonic = lambda: clock[0]
    result = invoke(["stop", "r-late", "--grace", "60"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert clock[0] == 4.0
    assert [StopRequest.from_json(d).run_id for d in stack.published("stop")] == ["r-late"]


def test_sweep_without_scheduler_publishes_a_tick(stack, invoke) -> None:
    result = invoke(["sweep"], obj=stack.context, env={"GITHUB_ACTOR": "octocat"})
    assert result.exit_code == 0, result.output
    assert "published a sweep tick to pcp-tiny-sweep directly" in result.stdout
    [data] = stack.published("sweep")
    assert SweepTick.from_json(data) == SweepTick("octocat")


# ---------------------------------------------------------------- doctor


def test_doctor_over_memory(stack, invoke) -> None:
    result = invoke(["doctor"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "✓ credentials" in result.stdout and "✓ bucket" in result.stdout
    assert "– topics" in result.stdout and "– scheduler job" in result.stdout
    data = json.loads(invoke(["doctor", "--json"], obj=stack.context).stdout)
    assert data["ok"] is True
    assert {c["name"]: c["state"] for c in data["checks"]}["stack state"] == "ok"


def test_doctor_fails_on_a_corrupt_stack_document(stack, invoke) -> None:
    stack.store.put("control/stack.json", b"{not json")
    result = invoke(["doctor"], obj=stack.context)
    assert result.exit_code == 1
    assert "✗ stack state" in result.stdout
    # Every read command reports it as one line, not a traceback.
    status = invoke(["status"], obj=stack.context)
    assert "control/stack.json cannot be read" in one_line_error(status)
