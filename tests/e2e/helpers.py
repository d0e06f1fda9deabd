"""What the end-to-end tests do to a running replica and read back from it.

Everything goes through the production surfaces: start and stop requests are published to
the stack's topics, results are read from the bucket, VM states from the local Compute
endpoint, and the processes of a run are found by the PCP_RUN_ID the agent exports to the
binary.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pcp.cli.views import RunView, find_run, load_json
from pcp.core.messages import StartRequest, StopRequest
from pcp.core.names import run_doc
from pcp.core.state import Run
from pcp_dev.local.replica import Replica

# Small and quick: the whole e2e tier must fit in five minutes on two cores.
QUICK = "--steps 8 --step-sleep 0.05 --samples 512"


def wait_for(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.25) -> Any:
    """Poll until `probe` returns something truthy; fail naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def start(replica: Replica, run_id: str, config: str = QUICK, **fields: Any) -> str:
    """Publish a start request as `pcp run` does (checked by the core's own parser first)."""
    body = {"run_id": run_id, "training_config": config, "requested_by": "e2e", **fields}
    request = StartRequest.from_json(json.dumps(body))
    return replica.publish("start", request.to_json(), {"run_id": run_id})


def stop(replica: Replica, run_id: str, reason: str = "stopped by the e2e test") -> str:
    return replica.publish("stop", StopRequest(run_id, reason).to_json(), {"run_id": run_id})


def view(replica: Replica, run_id: str) -> RunView | None:
    return find_run(replica.store(), run_id)


def wait_status(replica: Replica, run_id: str, status: str, timeout: float = 60) -> RunView:
    found: RunView = wait_for(f"run {run_id} to be {status}",
                              lambda: (v := view(replica, run_id)) is not None
                              and v.status.value == status and v, timeout)
    return found


def wait_final(replica: Replica, run_id: str, timeout: float = 90) -> RunView:
    """The run's final view, once its summary is in the bucket."""
    found: RunView = wait_for(f"run {run_id} to end",
                              lambda: (v := view(replica, run_id)) is not None and v.final
                              and v.summary is not None and v, timeout)
    return found


def archived(replica: Replica, run_id: str) -> Run:
    blob = replica.store().get(run_doc(run_id))
    assert blob is not None, f"runs/{run_id}/run.json is missing"
    return Run.from_json(blob.data)


def vm_states(replica: Replica) -> dict[str, str]:
    assert replica.compute is not None
    return {vm: replica.compute.vm(vm).status for vm in replica.vms}


def wait_all_terminated(replica: Replica, timeout: float = 30) -> dict[str, str]:
    states: dict[str, str] = wait_for(
        "every worker VM to be TERMINATED",
        lambda: (s := vm_states(replica)) and all(v == "TERMINATED" for v in s.values()) and s,
        timeout)
    return states


def run_processes(run_id: str) -> list[int]:
    """Processes running a binary of `run_id` (the agent exports PCP_RUN_ID to it)."""
    proc = Path("/proc")
    if not proc.is_dir():
        pytest.skip("finding a run's processes needs /proc (Linux)")
    needle = f"PCP_RUN_ID={run_id}".encode()
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def wait_no_processes(run_id: str, timeout: float = 30) -> None:
    wait_for(f"every process of run {run_id} to exit",
             lambda: not run_processes(run_id), timeout)


def markers(replica: Replica, run_id: str) -> list[str]:
    return list(replica.store().list(f"markers/{run_id}/"))


def metrics(replica: Replica, run_id: str, node: str) -> dict[str, Any]:
    found = load_json(replica.store(), f"runs/{run_id}/{node}/metrics.json")
    assert found is not None, f"runs/{run_id}/{node}/metrics.json is missing"
    return found


def settle(replica: Replica, timeout: float = 60) -> None:
    """Between tests: no active or queued run, no lease, every VM down."""
    def idle() -> bool:
        from pcp.cli.views import load_state

        state = load_state(replica.store())
        if state is None:
            return True
        for run in ([state.active] if state.active else []) + list(state.queue):
            stop(replica, run.run_id, "e2e cleanup")
        if state.lease is not None:
            stop(replica, state.lease.run_id, "e2e cleanup")
        return state.active is None and not state.queue and state.lease is None
    wait_for("the stack to be idle", idle, timeout, every=1.0)
    wait_all_terminated(replica, timeout)
