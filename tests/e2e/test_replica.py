"""The replica as a background service: `pcp local up`, the CLI against it, `pcp local down`,
Ctrl-C, and a failed start. Whatever happens, no process it started may be left behind.

Each process the replica starts carries its token in PCP_REPLICA_TOKEN (inherited by the
agents' binaries), so "no orphan" is checked against the whole process table.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pcp.adapters.pubsub_bus import PubSubBus
from pcp.core.messages import StartRequest
from pcp_dev.local.daemon import down, up
from pcp_dev.local.emulators import EmulatorMissing, publisher
from pcp_dev.local.processes import token_pids
from pcp_dev.local.replica import Options, Replica, check_prerequisites
from tests.conftest import require_emulator
from tests.e2e.helpers import run_processes, wait_for, wait_no_processes

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

STATE_KEYS = {"stack", "project", "bucket", "storage_endpoint", "pubsub_host", "zone",
              "compute_endpoint"}
FAST = {"sweep_interval": 2.0, "grace": 3.0}


def refuses(address: str) -> bool:
    host, _, port = address.removeprefix("http://").rpartition(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port.rstrip("/")))) != 0


def gone(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def background(state_dir: Path, **options: Any) -> dict[str, Any]:
    if not Path("/proc").is_dir():
        pytest.skip("the orphan checks read /proc (Linux)")
    try:
        return up("tiny", state_dir, **FAST, **options)
    except EmulatorMissing as exc:
        require_emulator("the local replica's emulators", exc)


def cli(state_dir: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PCP_")}
    env["PCP_LOCAL_DIR"] = str(state_dir)
    return subprocess.run([sys.executable, "-m", "pcp.cli", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def start_long_run(info: dict[str, Any], run_id: str) -> None:
    client = publisher(info["pubsub_host"])
    try:
        request = StartRequest.from_json(json.dumps(
            {"run_id": run_id, "training_config": "--steps 5000 --step-sleep 0.05"}))
        PubSubBus(info["project"], info["stack"], publisher=client).publish(
            "start", request.to_json())
    finally:
        client.transport.close()
    wait_for(f"run {run_id} to be training", lambda: len(run_processes(run_id)) >= 2, 60)


def assert_all_gone(info: dict[str, Any], run_id: str) -> None:
    wait_for("the replica's process to exit", lambda: gone(info["pid"]), 60)
    assert token_pids(info["token"]) == [], "processes of the replica were left behind"
    wait_no_processes(run_id, timeout=5)
    for address in (info["pubsub_host"], info["storage_endpoint"], info["compute_endpoint"],
                    *info["functions"].values()):
        assert refuses(address), f"{address} still accepts connections"


def test_local_up_serves_the_cli_and_down_leaves_nothing_behind(tmp_path: Path) -> None:
    info = background(tmp_path, keep_bucket=True)  # as `pcp local up` starts it
    try:
        assert STATE_KEYS <= set(info)
        assert json.loads((tmp_path / "tiny.json").read_text())["pid"] == info["pid"]
        assert up("tiny", tmp_path) == info, "a second `up` must find the running replica"
        done = cli(tmp_path, "run", "--stack", "tiny", "--run-id", "e2e-cli-run", "--config",
                   "--steps 5 --step-sleep 0.05", "--wait", "--poll", "0.5", "--timeout", "90")
        assert done.returncode == 0, done.stdout + done.stderr
        status = cli(tmp_path, "status", "e2e-cli-run", "--stack", "tiny", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["status"] == "succeeded"
        start_long_run(info, "e2e-cli-long")
    finally:
        stopped = down(tmp_path)
    assert stopped == ["tiny"]
    assert not (tmp_path / "tiny.json").exists()
    assert_all_gone(info, "e2e-cli-long")
    # The run history survives down and up (the bucket is kept on disk); --wipe deletes it.
    background(tmp_path, keep_bucket=True)
    try:
        again = cli(tmp_path, "status", "e2e-cli-run", "--stack", "tiny", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["status"] == "succeeded"
    finally:
        wiped = cli(tmp_path, "local", "down", "--wipe")
    assert "local replica stopped: tiny" in wiped.stdout
    assert "wiped the kept bucket and node directories of: tiny" in wiped.stdout
    assert not (tmp_path / "gcs" / "tiny").exists() and not (tmp_path / "nodes" / "tiny").exists()


def test_ctrl_c_mid_run_stops_every_process(tmp_path: Path) -> None:
    info = background(tmp_path)
    try:
        start_long_run(info, "e2e-ctrl-c")
        os.kill(info["pid"], signal.SIGINT)
        assert_all_gone(info, "e2e-ctrl-c")
        assert not (tmp_path / "tiny.json").exists()
    finally:
        down(tmp_path)


def test_a_replica_that_fails_to_start_stops_what_it_started(tmp_path: Path) -> None:
    # The functions refuse to start (a setting they reject at cold start), after the
    # emulators and the Compute endpoint are already up.
    try:
        check_prerequisites()
    except EmulatorMissing as exc:
        require_emulator("the local replica's emulators", exc)
    replica = Replica(Options(stack="tiny", state_dir=tmp_path, grace=3.0,
                              extra_env={"PCP_WORKER_COUNT": "0"}))
    with pytest.raises(RuntimeError, match="function .* exited"):
        replica.start()
    assert replica.pubsub is not None and replica.gcs is not None
    assert refuses(replica.pubsub.host) and refuses(replica.gcs.endpoint)
    assert token_pids(replica.token) == []
    log = (tmp_path / "logs" / "tiny" / "function-start.log").read_text()
    assert "PCP_WORKER_COUNT" in log  # the function's own words say why


def test_a_killed_supervisor_is_said_and_local_down_stops_all_it_started(
        tmp_path: Path) -> None:
    info = background(tmp_path)
    recorded: list[dict[str, Any]] = []
    try:
        start_long_run(info, "e2e-sigkill")

        def agents_recorded() -> bool:
            state = json.loads((tmp_path / "tiny.json").read_text())
            recorded[:] = state.get("processes", [])
            return {"pubsub-emulator", "fake-gcs-server", "function-start", "shepherd",
                    "pcp-tiny-worker-0"} <= {p["name"] for p in recorded}

        wait_for("the state file to record every process", agents_recorded, 30)
        trainers = run_processes("e2e-sigkill")
        os.kill(info["pid"], signal.SIGKILL)  # the supervisor dies; its children do not
        wait_for("the supervisor to be gone", lambda: gone(info["pid"]), 30)
        assert not refuses(info["pubsub_host"]), "the emulator should outlive its supervisor"
        said = f"its supervisor (pid {info['pid']}) is not running"
        for args in (("status", "--stack", "tiny"), ("run", "--stack", "tiny"),
                     ("status", "e2e-sigkill", "--stack", "tiny")):
            result = cli(tmp_path, *args)
            assert result.returncode == 1, (args, result.stdout, result.stderr)
            assert said in result.stderr and "pcp local down --stack tiny" in result.stderr
            assert "Traceback" not in result.stderr
        doctor = cli(tmp_path, "doctor", "--stack", "tiny")
        assert doctor.returncode == 1
        assert f"✗ local replica: the local replica of stack tiny is down: {said}" in doctor.stdout
        down_cli = cli(tmp_path, "local", "down")
        assert down_cli.returncode == 0, down_cli.stderr
        assert "local replica stopped: tiny" in down_cli.stdout
    finally:
        down(tmp_path)
    for pid in [p["pid"] for p in recorded] + trainers:
        wait_for(f"process {pid} to be gone", lambda pid=pid: gone(pid), 10)
    assert token_pids(info["token"]) == []
    for address in (info["pubsub_host"], info["storage_endpoint"],
                    *info["functions"].values()):
        assert refuses(address), f"{address} still accepts connections"

