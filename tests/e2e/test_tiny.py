"""Whole runs on the tiny stack's replica: success, fail-fast, boot timeout, stop, queueing,
duplicates, keep-alive and a crashed function server.

Each test publishes to the stack's topics exactly as `pcp run` / `pcp stop` do and reads the
outcome where a person would: the bucket, the Compute endpoint and the process table.
"""

from __future__ import annotations

import json
import time

import pytest

from pcp.core.names import LABEL_KEEP_ALIVE
from pcp_dev.local.replica import Replica
from tests.e2e.helpers import (
    archived,
    markers,
    metrics,
    run_processes,
    start,
    stop,
    view,
    vm_states,
    wait_all_terminated,
    wait_final,
    wait_for,
    wait_no_processes,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

VM = "pcp-tiny-worker-0"


def test_tiny_run_succeeds_with_results_logs_and_metrics_in_the_bucket(tiny: Replica) -> None:
    run_id = "e2e-tiny-ok"
    start(tiny, run_id, "--steps 12 --step-sleep 0.05 --samples 512")
    done = wait_final(tiny, run_id)
    assert done.status.value == "succeeded", done.detail
    summary = done.summary
    assert summary is not None
    assert {n["name"]: (n["phase"], n["exit_code"]) for n in summary["nodes"]} == {
        "shepherd": ("done", 0), "worker-0": ("done", 0)}
    shepherd = metrics(tiny, run_id, "shepherd")
    assert shepherd["steps_completed"] == 12
    assert shepherd["final_loss"] < shepherd["initial_loss"]
    assert metrics(tiny, run_id, "worker-0")["status"] == "succeeded"
    files = set(tiny.store().list(f"runs/{run_id}/"))
    for name in ("summary.json", "run.json", "shepherd/stdout.log", "shepherd/checkpoint.npz",
                 "worker-0/stdout.log", "worker-0/stderr.log"):
        assert f"runs/{run_id}/{name}" in files, f"{name} missing from {sorted(files)}"
    assert set(markers(tiny, run_id)) == {f"markers/{run_id}/{n}/{k}.json"
                                          for n in ("shepherd", "worker-0")
                                          for k in ("booted", "done")}
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)


def test_worker_exiting_non_zero_fails_the_run_and_stops_every_node(tiny: Replica) -> None:
    run_id = "e2e-tiny-worker-fails"
    start(tiny, run_id, "--steps 400 --step-sleep 0.05 --samples 512 "
                        "--fail-at-step 3 --fail-node 1 --fail-exit-code 7")
    done = wait_final(tiny, run_id)
    assert (done.status.value, done.reason) == ("failed", "failed"), done.detail
    # The shepherd's trainer notices the lost worker at once but lingers (--peer-loss-grace)
    # so the worker's own exit reaches the control plane first and the reason names it.
    assert done.detail == "worker-0 exited with code 7", done.detail
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)  # the shepherd's binary too: it was stopped, not left training
    store = tiny.store()
    worker = wait_for("worker-0's done marker",
                      lambda: store.get(f"markers/{run_id}/worker-0/done.json"), 30)
    assert json.loads(worker.data)["exit_code"] == 7
    assert metrics(tiny, run_id, "worker-0")["status"] == "injected-failure"
    shepherd = wait_for("the shepherd's done marker",
                        lambda: store.get(f"markers/{run_id}/shepherd/done.json"), 30)
    assert json.loads(shepherd.data)["exit_code"] != 0  # it did not finish its 400 steps


def test_a_worker_that_never_boots_times_out_and_every_node_stops(tiny: Replica) -> None:
    run_id = "e2e-tiny-no-boot"
    tiny.hold_boot.add(VM)
    start(tiny, run_id)
    wait_for("the VM to be up without its agent", lambda: vm_states(tiny)[VM] == "RUNNING", 30)
    done = wait_final(tiny, run_id, timeout=60)
    assert (done.status.value, done.reason) == ("failed", "boot_timeout"), done.detail
    assert "worker-0" in done.detail
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)
    assert f"markers/{run_id}/worker-0/booted.json" not in markers(tiny, run_id)


def test_a_stop_request_mid_run_cancels_it_and_stops_every_node(tiny: Replica) -> None:
    run_id = "e2e-tiny-stopped"
    start(tiny, run_id, "--steps 2000 --step-sleep 0.05 --samples 512")
    wait_status(tiny, run_id, "running")
    wait_for("training to be under way", lambda: run_processes(run_id), 20)
    stop(tiny, run_id)
    done = wait_final(tiny, run_id)
    assert done.status.value == "cancelled", done.detail
    assert "stopped by the e2e test" in done.detail
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)


def test_three_requests_at_once_run_one_after_another_in_arrival_order(tiny: Replica) -> None:
    ids = [f"e2e-tiny-queue-{i}" for i in range(3)]
    for run_id in ids:
        start(tiny, run_id, "--steps 4 --step-sleep 0.02 --samples 256")
    views = [wait_final(tiny, run_id, timeout=120) for run_id in ids]
    assert [v.status.value for v in views] == ["succeeded"] * 3, [v.detail for v in views]
    runs = sorted((archived(tiny, run_id) for run_id in ids), key=lambda r: r.accepted_at)
    for before, after in zip(runs, runs[1:], strict=False):
        assert before.ended_at is not None and after.started_at is not None
        assert after.started_at >= before.ended_at, "two runs held the nodes at once"
    started = sorted(runs, key=lambda r: r.started_at or r.accepted_at)
    assert [r.run_id for r in started] == [r.run_id for r in runs], "not in arrival order"


def test_the_same_start_request_delivered_twice_makes_one_run(tiny: Replica) -> None:
    run_id = "e2e-tiny-twice"
    assert tiny.compute is not None
    starts_before = tiny.compute.vm(VM).starts
    start(tiny, run_id)
    start(tiny, run_id)
    done = wait_final(tiny, run_id)
    assert done.status.value == "succeeded", done.detail
    time.sleep(3)  # a late duplicate would have queued a second run by now
    record = archived(tiny, run_id)
    assert record.attempt == 1
    assert [h.change for h in record.history].count("queued -> starting") == 1
    assert tiny.compute.vm(VM).starts - starts_before == 1
    current = view(tiny, run_id)
    assert current is not None and current.status.value == "succeeded"


def test_keep_vm_alive_leaves_the_vm_up_until_the_lease_ends(tiny: Replica) -> None:
    run_id = "e2e-tiny-keep-alive"
    start(tiny, run_id, keep_vm_alive=True)
    done = wait_final(tiny, run_id)
    assert done.status.value == "succeeded", done.detail
    assert tiny.compute is not None
    compute = tiny.compute
    # The label is set by a command the ending decision emits, right after it is saved.
    wait_for("the keep-alive label", lambda: LABEL_KEEP_ALIVE in compute.vm(VM).labels, 10)
    until = compute.vm(VM).labels[LABEL_KEEP_ALIVE]
    assert until.isdigit()
    assert vm_states(tiny)[VM] == "RUNNING"
    time.sleep(3)  # more than one sweep tick: the lease holds, nothing stops the VM early
    assert vm_states(tiny)[VM] == "RUNNING"
    wait_all_terminated(tiny, timeout=40)
    assert time.time() >= int(until) - 1, "stopped before the lease ended"

    def lease_ended_by_sweep() -> bool:
        store = tiny.store()
        for name in reversed(store.list("control/sweeps/")):
            blob = store.get(name)
            record = json.loads(blob.data) if blob else {}
            if any(a.get("command") == "stop_nodes" and run_id in a.get("reason", "")
                   for a in record.get("actions", [])):
                return True
        return False
    wait_for("a sweep that ended the lease", lease_ended_by_sweep, 20)


def test_a_killed_function_server_heals_and_the_run_completes(tiny: Replica) -> None:
    run_id = "e2e-tiny-functions-crash"
    start(tiny, run_id, "--steps 40 --step-sleep 0.05 --samples 512")
    wait_status(tiny, run_id, "running")
    for kind in tiny.functions:
        tiny.kill_function(kind)
    # Both done markers land while no function serves: their events cannot be handled now.
    wait_for("both done markers", lambda: {f"markers/{run_id}/{n}/done.json"
                                           for n in ("shepherd", "worker-0")}
             <= set(markers(tiny, run_id)), 40)
    current = view(tiny, run_id)
    assert current is not None and current.status.value == "running"
    tiny.drop_backlog("marker")  # and their events are lost for good, not merely late
    for kind in tiny.functions:
        tiny.start_function(kind)
    done = wait_final(tiny, run_id, timeout=60)
    assert done.status.value == "succeeded", done.detail
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}

    def healed_by_a_sweep() -> bool:
        store = tiny.store()
        for name in store.list("control/sweeps/"):
            blob = store.get(name)
            record = json.loads(blob.data) if blob else {}
            if f"run {run_id} succeeded" in record.get("reason", ""):
                return True
        return False
    assert healed_by_a_sweep(), "the run did not end through the sweeper's reconciliation"


def test_pcp_events_shows_an_orphan_stop_and_a_dead_man_stop(tiny: Replica) -> None:
    """The run's worker powers itself off (dead-man switch); then its VM comes up again with
    no run (a person, or a lost stop) and the sweeper stops it. `pcp events`, reading only
    the replica's bucket, shows both."""
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.context import Context

    run_id = "e2e-tiny-events"
    start(tiny, run_id)
    assert wait_final(tiny, run_id).status.value == "succeeded"
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)
    assert tiny.compute is not None
    context = Context("tiny", store=tiny.store())

    def events(*args: str) -> list[dict]:
        result = CliRunner().invoke(cli, ["events", "--json", *args], obj=context)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["events"]

    def orphan_stops() -> list[dict]:
        return [r for r in events("--kind", "orphans_stopped") if VM in r["text"]]

    before = len(orphan_stops())
    tiny.compute.set_status(VM, "RUNNING")  # up again, no agent, no run: an orphan
    # A sweep every 5 s; each poll is a `pcp events` process, slow on a loaded machine.
    orphans = wait_for("the sweep audit of the orphan stop",
                       lambda: (o := orphan_stops()) and len(o) > before and o, 60)
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    assert orphans[-1]["source"] == "sweep" and orphans[-1]["heal"] == "orphans_stopped"
    ours = events("--run", run_id)
    kinds = [r["kind"] for r in ours]
    assert "run_ended" in kinds and "dead_man_power_off" in kinds, kinds
    dead = next(r for r in ours if r["kind"] == "dead_man_power_off")
    assert dead["text"].startswith("worker-0: ") and dead["source"] == "node"
    assert next(r for r in ours if r["kind"] == "run_ended")["text"].startswith("succeeded")
    assert orphans[-1]["at"] > dead["at"]


def test_a_dollar_cap_stops_the_run_at_its_deadline_and_pcp_status_says_why(
        tiny: Replica) -> None:
    """$0.0009 at the tiny stack's $0.54/h is 6 s of node time: the deadline the cap sets ends
    a run that would train for minutes, and `pcp status` names the cap."""
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.context import Context

    run_id = "e2e-tiny-capped"
    start(tiny, run_id, "--steps 4000 --step-sleep 0.05 --samples 512", max_cost_usd=0.0009)
    done = wait_final(tiny, run_id, timeout=60)
    assert (done.status.value, done.reason) == ("failed", "timed_out"), done.detail
    assert done.detail.startswith("cost cap $0.0009 reached"), done.detail
    run = archived(tiny, run_id)
    assert run.deadline_by == "max_cost_usd" and run.max_cost_usd == 0.0009
    assert run.started_at is not None and run.deadline is not None
    assert (run.deadline - run.started_at).total_seconds() == pytest.approx(6.0, abs=0.01)
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)
    shown = CliRunner().invoke(cli, ["status", run_id], obj=Context("tiny", store=tiny.store()))
    assert shown.exit_code == 0, shown.output
    assert "cost cap $0.0009 reached" in shown.output and "timed_out" in shown.output


def test_a_budget_notification_stops_the_stack_and_refuses_starts_until_resumed(
        tiny: Replica) -> None:
    """A Cloud Billing notification (documented format) on pcp-tiny-budget past the budget:
    the running run ends, its VM stops, a new start is refused with the reason, a queued one
    waits; `pcp budget resume` lifts the hold and the queued run goes on."""
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.context import Context
    from pcp.core.messages import BudgetResume

    context = Context("tiny", store=tiny.store())
    held, queued, refused = "e2e-tiny-budget-held", "e2e-tiny-budget-queued", "e2e-tiny-refused"
    start(tiny, held, "--steps 4000 --step-sleep 0.05 --samples 512")
    wait_status(tiny, held, "running")
    start(tiny, queued)
    wait_status(tiny, queued, "queued")
    try:
        tiny.publish_budget(cost=130.0, budget=100.0, alertThresholdExceeded=1.0)
        done = wait_final(tiny, held)
        assert (done.status.value, done.reason) == ("failed", "budget_exceeded"), done.detail
        assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
        wait_no_processes(held)
        start(tiny, refused)
        no = wait_final(tiny, refused, timeout=30)
        assert no.status.value == "rejected" and "budget hold" in no.detail, no.detail
        assert "pcp budget resume --stack tiny" in no.detail
        assert view(tiny, queued).status.value == "queued"  # type: ignore[union-attr]
        status = CliRunner().invoke(cli, ["status"], obj=context)
        assert "budget hold" in status.output, status.output
        shown = CliRunner().invoke(cli, ["budget", "status"], obj=context)
        assert "on budget hold since" in shown.output and "130.00 USD" in shown.output
    finally:
        tiny.publish("stop", BudgetResume("e2e").to_json())  # what `pcp budget resume` sends
    wait_for("the hold to be lifted", lambda: "no budget hold" in CliRunner().invoke(
        cli, ["budget", "status"], obj=context).output, 30)
    wait_status(tiny, queued, "running", timeout=60)


# ---------------------------------------------------------------- the CLI on the replica


def replica_dir(tiny: Replica, tmp_path) -> dict[str, str]:
    """A state file for the CLI (as `pcp local up` writes it) naming the shared replica."""
    (tmp_path / "tiny.json").write_text(json.dumps(tiny.info()))
    return {"PCP_LOCAL_DIR": str(tmp_path)}


def test_the_live_view_on_a_terminal_shows_the_training(tiny: Replica, tmp_path) -> None:
    """`pcp run --wait` in a real terminal (tmux, 80 columns): the reference trainer's
    pcp-progress lines become the step, the loss and a sparkline under the node table."""
    import os
    import shlex
    import shutil
    import subprocess
    import sys
    import uuid
    from pathlib import Path

    from tests.conftest import require_emulator

    tmux = shutil.which("tmux")
    if tmux is None:
        require_emulator("tmux", FileNotFoundError("tmux is not installed (apt-get install tmux)"))
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCP_")}
    env.update(replica_dir(tiny, tmp_path), TERM="xterm-256color", LANG="C.UTF-8")
    command = shlex.join([sys.executable, "-m", "pcp.cli", "run", "--stack", "tiny",
                          "--run-id", "e2e-live", "--config", "--steps 80 --step-sleep 0.1",
                          "--wait", "--poll", "1"])
    server = ["tmux", "-L", f"pcp-e2e-{uuid.uuid4().hex[:8]}"]
    subprocess.run([*server, "new-session", "-d", "-s", "live", "-x", "80", "-y", "40",
                    f"cd {shlex.quote(str(repo))} && {command}; echo EXIT=$?; sleep 120"],
                   env=env, check=True, timeout=30)
    frames: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not frames or "EXIT=" not in frames[-1]:
            assert time.monotonic() < deadline, "\n".join(frames[-1:])
            shot = subprocess.run([*server, "capture-pane", "-p", "-t", "live"], env=env,
                                  capture_output=True, text=True, timeout=10, check=True)
            frames.append(shot.stdout)
            time.sleep(0.3)
    finally:
        subprocess.run([*server, "kill-server"], env=env, timeout=10, check=False)
    assert "EXIT=0" in frames[-1], frames[-1]
    live = [f for f in frames if "training  step" in f and "EXIT=" not in f]
    assert live, "no frame showed the training:\n" + frames[-1]
    assert any(set(f) & set("▁▂▃▄▅▆▇█") for f in live), live[-1]
    assert any("shepherd  pcp-progress step=" in f for f in live), live[-1]
    assert all(len(line) <= 80 for f in frames for line in f.splitlines())


def test_a_typo_in_the_config_shows_the_trainers_usage_error_and_logs_merge(
        tiny: Replica, tmp_path) -> None:
    from click.testing import CliRunner

    from pcp.cli import cli

    env = replica_dir(tiny, tmp_path)
    run = CliRunner().invoke(cli, ["run", "--stack", "tiny", "--run-id", "e2e-typo", "--config",
                                   "--lrr 0.1", "--wait", "--poll", "0.5", "--timeout", "90"],
                             env=env)
    assert run.exit_code == 1, run.output
    assert "exited with code 2" in run.stderr
    assert "reference_trainer.py: error: unrecognized arguments: --lrr 0.1" in run.stdout
    assert "all of its output: pcp logs e2e-typo --node" in run.stdout
    assert tiny.store().get("runs/e2e-typo/shepherd/logtimes.txt") is not None
    logs = CliRunner().invoke(cli, ["logs", "e2e-typo", "--stack", "tiny", "--timestamps"],
                              env=env)
    assert logs.exit_code == 0, logs.output
    assert "==> shepherd/stderr.log <==" in logs.stdout
    usage = next(line for line in logs.stdout.splitlines() if "unrecognized arguments" in line)
    assert usage[2] == ":" and usage[5] == ":"  # HH:MM:SS.mmm, from logtimes.txt
