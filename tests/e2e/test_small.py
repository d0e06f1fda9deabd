"""A whole run on the small stack's replica: three workers and the shepherd."""

from __future__ import annotations

import pytest

from pcp_dev.local.replica import Replica
from tests.e2e.helpers import (
    markers,
    metrics,
    start,
    wait_all_terminated,
    wait_final,
    wait_no_processes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]


def test_small_run_with_three_workers_succeeds(small_replica: Replica) -> None:
    run_id = "e2e-small-ok"
    start(small_replica, run_id, "--steps 10 --step-sleep 0.05 --samples 768")
    done = wait_final(small_replica, run_id, timeout=120)
    assert done.status.value == "succeeded", done.detail
    nodes = ("shepherd", "worker-0", "worker-1", "worker-2")
    assert done.summary is not None
    assert {n["name"]: n["exit_code"] for n in done.summary["nodes"]} == dict.fromkeys(nodes, 0)
    shepherd = metrics(small_replica, run_id, "shepherd")
    assert shepherd["num_workers"] == 3
    assert shepherd["final_loss"] < shepherd["initial_loss"]
    shards = [metrics(small_replica, run_id, f"worker-{i}")["shard_size"] for i in range(3)]
    assert sum(shards) == 768 and all(s > 0 for s in shards)
    files = set(small_replica.store().list(f"runs/{run_id}/"))
    assert {f"runs/{run_id}/{n}/stdout.log" for n in nodes} <= files
    assert len(markers(small_replica, run_id)) == 2 * len(nodes)
    assert wait_all_terminated(small_replica) == {
        f"pcp-small-worker-{i}": "TERMINATED" for i in range(3)}
    wait_no_processes(run_id)
