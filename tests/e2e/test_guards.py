"""The node guards through the tiny replica: the GPU-idle watchdog ends a run that holds idle
GPUs; a host-maintenance notice and a Spot preemption end the attempt with their reason and
the run restarts as its next attempt.

The worker's GPU is the stand-in nvidia-smi (`Replica.set_gpus`); the notices are posted on
the VM's metadata server stand-in (`Replica.maintenance` / `preempt`, what `pcp local
maintenance` and `pcp local preempt` do), which the agent watches with wait_for_change.
"""

from __future__ import annotations

import json

import pytest

from pcp.core.names import node_file
from pcp_dev.local.replica import Replica
from tests.e2e.helpers import (
    archived,
    start,
    wait_all_terminated,
    wait_final,
    wait_for,
    wait_no_processes,
    wait_status,
)

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

VM = "pcp-tiny-worker-0"
LONG = "--steps 400 --step-sleep 0.05 --samples 512"


def test_idle_gpus_end_the_run_with_reason_gpu_idle(tiny: Replica) -> None:
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.context import Context

    run_id = "e2e-tiny-gpu-idle"
    tiny.set_gpus(VM, [(2, 1200)])  # below 5 %: idle
    # 2 "minutes" below 5 % after the first one; a minute lasts 1 s in this replica
    start(tiny, run_id, LONG, gpu_idle={"below_percent": 5, "minutes": 2, "after_minutes": 1})
    wait_status(tiny, run_id, "running")
    context = Context("tiny", store=tiny.store())

    def shown() -> str | None:
        out = CliRunner().invoke(cli, ["status", "--stack", "tiny"], obj=context,
                                 terminal_width=200).output
        return out if "2% 1200 MiB" in out else None
    table = wait_for("pcp status to show the worker's GPU", shown, 20)
    assert "gpu" in table
    done = wait_final(tiny, run_id)
    assert (done.status.value, done.reason) == ("failed", "gpu_idle"), done.detail
    assert "worker-0: every GPU stayed idle" in (done.detail or "")
    marker = json.loads(tiny.store().get(f"markers/{run_id}/worker-0/done.json").data)
    assert marker["end_reason"] == "gpu_idle" and marker["signal"] == "SIGTERM"
    beat = json.loads(tiny.store().get(node_file(run_id, "worker-0", "heartbeat.json")).data)
    assert beat["gpus"][0]["utilization_percent"] == 2
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)


@pytest.mark.parametrize(("notice", "reason"), [("maintenance", "maintenance"),
                                                ("preempt", "preempted")])
def test_a_notice_restarts_the_run_as_its_next_attempt(tiny: Replica, notice: str,
                                                       reason: str) -> None:
    run_id = f"e2e-tiny-{notice}"
    tiny.set_gpus(VM, [(95, 9000)])  # busy: the notice, not the watchdog, ends attempt 1
    start(tiny, run_id, "--steps 60 --step-sleep 0.1 --samples 512", max_restarts=1)
    wait_status(tiny, run_id, "running")
    wait_for("the worker's first heartbeat", lambda: tiny.store().get(
        node_file(run_id, "worker-0", "heartbeat.json")), 20)
    getattr(tiny, notice)(VM)
    done = wait_final(tiny, run_id, timeout=120)
    assert done.status.value == "succeeded", done.detail
    record = archived(tiny, run_id)
    assert record.attempt == 2
    restarts = [e.reason for e in record.history if "restart 2 of 2" in e.reason]
    assert restarts and f"after {reason}: worker-0:" in restarts[0], record.history
    first = json.loads(tiny.store().get(f"markers/{run_id}/worker-0/done.json").data)
    assert first["attempt"] == 2 and "end_reason" not in first  # attempt 2's own, clean
    assert wait_all_terminated(tiny) == {VM: "TERMINATED"}
    wait_no_processes(run_id)


def test_pcp_cost_reads_the_replicas_disks_and_runs(tiny: Replica) -> None:
    """The standing cost of the replica's fleet (its VMs' boot disks on the local Compute
    endpoint) and the module's runs, as `pcp cost --json` reports them."""
    import requests
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.config import Config
    from pcp.cli.context import Context
    from pcp.cli.cost import ComputeInventory

    assert tiny.compute is not None
    run_id = "e2e-tiny-cost"
    start(tiny, run_id)
    assert wait_final(tiny, run_id).status.value == "succeeded"
    o = tiny.options
    config = Config(stack="tiny", project=o.project, bucket=o.bucket, zone=o.zone,
                    region=tiny.compute.region)
    context = Context("tiny", store=tiny.store(), config=config,
                      inventory=ComputeInventory(requests.Session(), tiny.compute.endpoint))
    result = CliRunner().invoke(cli, ["cost", "--json"], obj=context)
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [(x["kind"], x["name"], x["detail"]) for x in out["standing"]["lines"]] == [
        ("disk", VM, "100 GB pd-balanced")]
    assert out["standing"]["monthly_usd"] == pytest.approx(10.0)
    assert run_id in {r["run_id"] for r in out["runs"]}
    wait_all_terminated(tiny)
