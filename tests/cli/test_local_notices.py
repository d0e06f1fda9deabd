"""`pcp local maintenance` / `pcp local preempt`: post a notice on a local VM's metadata server
(found through the replica's state file), as Compute Engine posts one before it stops a VM."""

from __future__ import annotations

import json
from pathlib import Path

from pcp_dev.local.metadata import MetadataServer


def test_notices_reach_the_vms_metadata_server(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    with MetadataServer(dict, "pcp-tiny-worker-0") as server:
        (tmp_path / "tiny.json").write_text(json.dumps(
            {"stack": "tiny", "metadata_hosts": {"pcp-tiny-worker-0": server.host}}))
        env = {"PCP_LOCAL_DIR": str(tmp_path)}
        result = invoke(["local", "maintenance", "worker-0", "--migrate"], env=env)
        assert result.exit_code == 0, result.output
        assert server.notice("maintenance-event") == "MIGRATE_ON_HOST_MAINTENANCE"
        result = invoke(["local", "preempt", "pcp-tiny-worker-0"], env=env)
        assert result.exit_code == 0 and "instance/preempted is TRUE" in result.output
        assert server.notice("preempted") == "TRUE"
        result = invoke(["local", "preempt", "worker-3"], env=env)
        assert result.exit_code == 1 and "has no VM pcp-tiny-worker-3" in result.output
        assert invoke(["local", "preempt", "shepherd"], env=env).exit_code == 1


def test_without_a_replica_it_says_so(invoke, tmp_path: Path) -> None:  # noqa: ANN001
    result = invoke(["local", "preempt", "worker-0"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "no local replica of stack tiny" in result.output
