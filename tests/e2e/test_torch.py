"""PyTorch through the binary contract: examples/torch-ddp on the small stack's replica.

DistributedDataParallel with gloo on CPU (the CPU build of torch, a test-only requirement),
three workers and the shepherd, in each rank layout, plus a run where one rank raises. A few
steps each, so the tier stays small.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pcp.cli.views import RunView
from pcp_dev.local.replica import Replica
from tests.conftest import require_emulator
from tests.e2e.helpers import metrics, start, view, wait_final, wait_for, wait_no_processes

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

TRAINER = Path(__file__).resolve().parents[2] / "examples" / "torch-ddp" / "train.py"
BINARY = f"python:{TRAINER}"
NODES = ("shepherd", "worker-0", "worker-1", "worker-2")


@pytest.fixture(autouse=True)
def _torch() -> None:
    if importlib.util.find_spec("torch") is None:
        require_emulator("PyTorch (pip install torch==2.13.0)",
                         ModuleNotFoundError("No module named 'torch'"))


def exit_codes(replica: Replica, run_id: str) -> dict[str, int | None]:
    done = wait_final(replica, run_id, timeout=120)
    assert done.summary is not None
    return {n["name"]: n["exit_code"] for n in done.summary["nodes"]}


def test_ddp_all_nodes_layout(small_replica: Replica) -> None:
    run_id = "e2e-torch-all-nodes"
    start(small_replica, run_id, "--steps 4", binary=BINARY, layout="all-nodes")
    assert exit_codes(small_replica, run_id) == dict.fromkeys(NODES, 0)
    ranks = {n: metrics(small_replica, run_id, n) for n in NODES}
    assert [ranks[n]["rank"] for n in NODES] == [0, 1, 2, 3]
    assert {m["world_size"] for m in ranks.values()} == {4}
    assert {m["local_rank"] for m in ranks.values()} == {0}
    # DDP keeps the replicas in step: every rank saw the same averaged losses.
    assert len({tuple(m["loss"]) for m in ranks.values()}) == 1
    assert ranks["shepherd"]["steps_completed"] == 4
    files = set(small_replica.store().list(f"runs/{run_id}/"))
    assert f"runs/{run_id}/shepherd/checkpoint.pt" in files
    wait_no_processes(run_id)


def test_ddp_workers_only_layout(small_replica: Replica) -> None:
    run_id = "e2e-torch-workers-only"
    start(small_replica, run_id, "--steps 4", binary=BINARY, layout="workers-only")
    assert exit_codes(small_replica, run_id) == dict.fromkeys(NODES, 0)
    ranks = {f"worker-{i}": metrics(small_replica, run_id, f"worker-{i}") for i in range(3)}
    assert [ranks[f"worker-{i}"]["rank"] for i in range(3)] == [0, 1, 2]
    assert {m["world_size"] for m in ranks.values()} == {3}
    shepherd = metrics(small_replica, run_id, "shepherd")
    assert shepherd["hosted_store"] is True and shepherd["world_size"] == 3
    assert shepherd["loss"] == ranks["worker-0"]["loss"]
    done = wait_final(small_replica, run_id)
    assert done.summary is not None and done.summary["metrics_node"] == "worker-0"
    assert done.summary["metrics"]["rank"] == 0 and done.summary["metrics"]["world_size"] == 3
    files = set(small_replica.store().list(f"runs/{run_id}/"))
    assert f"runs/{run_id}/worker-0/checkpoint.pt" in files
    assert f"runs/{run_id}/shepherd/checkpoint.pt" not in files
    wait_no_processes(run_id)


def test_a_rank_that_raises_fails_the_run(small_replica: Replica) -> None:
    run_id = "e2e-torch-raises"
    start(small_replica, run_id, "--steps 4 --raise-on-rank 1 --raise-at-step 2 --timeout 60",
          binary=BINARY, layout="workers-only")
    done = wait_final(small_replica, run_id, timeout=120)
    assert done.status.value == "failed", done.detail
    # Fail fast ends the run at the first non-zero exit: the raising rank, or a peer whose
    # collective broke a moment earlier (gloo), so either worker may be named.
    assert "worker-" in (done.detail or "") and "exited with code" in (done.detail or "")
    # The nodes stopped after the end write done late: `pcp status` (this view) shows their
    # exit codes, and the outcome stays.
    def every_node_done() -> RunView | None:
        v = view(small_replica, run_id)
        return v if v is not None and v.run is not None and all(
            n.phase.value == "done" for n in v.run.nodes) else None

    try:
        late = wait_for("every node's exit code in the ended run's record", every_node_done, 60)
    except BaseException:
        v = view(small_replica, run_id)
        print("nodes:", v and v.run and [(n.name, n.phase.value, n.exit_code) for n in v.run.nodes],
              "markers:", sorted(small_replica.store().list(f"markers/{run_id}/")))
        raise
    assert late.status.value == "failed" and late.detail == done.detail
    assert late.summary is not None and all(
        n["exit_code"] is not None or n["signal"] is not None for n in late.summary["nodes"])
    wait_no_processes(run_id)


def test_the_stock_script_runs_under_the_torchrun_launcher(small_replica: Replica) -> None:
    """`torchrun:SCRIPT`: torchrun on each worker, the c10d rendezvous at the shepherd."""
    run_id = "e2e-torch-torchrun"
    start(small_replica, run_id, "--steps 3 --timeout 60", binary=f"torchrun:{TRAINER}")
    assert exit_codes(small_replica, run_id) == dict.fromkeys(NODES, 0)
    ranks = {f"worker-{i}": metrics(small_replica, run_id, f"worker-{i}") for i in range(3)}
    # torchrun numbers the ranks (its rendezvous decides which node is group rank 0).
    assert sorted(m["rank"] for m in ranks.values()) == [0, 1, 2]
    assert {m["world_size"] for m in ranks.values()} == {3}
    assert {m["local_rank"] for m in ranks.values()} == {0}
    assert len({tuple(m["loss"]) for m in ranks.values()}) == 1
    done = wait_final(small_replica, run_id)
    assert done.summary is not None and done.summary["metrics_node"] == "worker-0"
    assert done.summary["metrics"]["steps_completed"] == 3
    files = set(small_replica.store().list(f"runs/{run_id}/"))
    first = next(n for n, m in ranks.items() if m["rank"] == 0)
    assert f"runs/{run_id}/{first}/checkpoint.pt" in files
    assert f"runs/{run_id}/shepherd/metrics.json" not in files  # the shepherd is no rank
    shepherd_log = small_replica.store().get(f"runs/{run_id}/shepherd/stdout.log")
    assert shepherd_log is not None and b"c10d store listening" in shepherd_log.data
    wait_no_processes(run_id)


def test_the_same_script_runs_unchanged_under_torchrun(tmp_path: Path) -> None:
    """A stock torchrun launch: two processes on one node, LOCAL_RANK 0 and 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PCP_", "MASTER_"))}
    env["PCP_OUTPUT_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(TRAINER), "--steps", "3", "--timeout", "60"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads((tmp_path / "metrics.json").read_text())
    assert found["world_size"] == 2 and found["steps_completed"] == 3
    assert json.loads((tmp_path / "metrics-rank1.json").read_text())["local_rank"] == 1
    assert (tmp_path / "checkpoint.pt").is_file()
