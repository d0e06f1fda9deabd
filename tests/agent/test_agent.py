"""The node agent as real processes: fake-gcs-server, the Pub/Sub emulator, the trainer.

Each worker agent reads its assignment from its own metadata server (GCE_METADATA_HOST);
the shepherd agent pulls commands from the emulator. Power-off is `touch <file>`, so a test
can see that the dead-man's switch fired without stopping anything real.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pcp.adapters.gcs_store import GcsStore
from pcp.agent.binary import BinaryError, Realiser, build_outputs, host_platform, plan
from pcp.agent.config import AgentConfig
from pcp.agent.deadman import power_off_at
from pcp.agent.log import Log
from pcp.agent.record import RunView
from pcp.agent.worker import Worker
from pcp.core.messages import (
    Assignment,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    split_training_config,
)
from pcp.core.names import DEAD_MAN_CONSOLE_TAG
from pcp.core.state import Phase, Reason, Run
from pcp_dev import REFERENCE_BINARY
from pcp_dev.local.emulators import ensure_subscription, ensure_topic, publisher
from pcp_dev.local.metadata import MetadataServer
from tests.conftest import TEST_PROJECT, GcsBucket

pytestmark = [pytest.mark.agent]
emulator = pytest.mark.emulator

REPO = Path(__file__).resolve().parents[2]
TRAIN = ("--steps", "5", "--samples", "256", "--features", "4",
         "--connect-timeout", "30", "--peer-timeout", "30")
WAIT = 45.0


def wait_for(check: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), so cleanup reaches binaries in own sessions."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    out: Path
    poweroff: Path
    console: Path | None = None  # stands in for /dev/console (the serial port)

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"agent did not exit in {timeout:g} s:\n{self.text()}") from None

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def logs(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def logged(self, event: str, contains: str = "") -> bool:
        return any(r.get("event") == event and contains in r.get("reason", "")
                   for r in self.logs())


@dataclass
class Harness:
    tmp: Path
    bucket: GcsBucket
    pubsub_host: str | None = None
    stack: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    agents: list[Agent] = field(default_factory=list)
    servers: list[MetadataServer] = field(default_factory=list)

    @property
    def store(self) -> GcsStore:
        return GcsStore(self.bucket.name, client=self.bucket.client)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PUBSUB_EMULATOR_HOST", "GCE_METADATA_HOST")}
        env.update(STORAGE_EMULATOR_HOST=self.bucket.endpoint, PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO))
        if self.pubsub_host:
            env["PUBSUB_EMULATOR_HOST"] = self.pubsub_host
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Agent:
        out = self.tmp / f"{name}.agent.log"
        poweroff = self.tmp / f"{name}.poweroff"
        console = self.tmp / f"{name}.console"
        console.write_bytes(b"")  # a device exists; the agent never creates one
        argv = [sys.executable, "-m", "pcp.agent", *argv, "--work-dir",
                str(self.tmp / name / "work"), "--upload-interval", "0.5",
                "--poll-interval", "0.5", "--grace", "5", "--output-interval", "0",
                "--poweroff-command", shlex.join(["touch", str(poweroff)]),
                "--console", str(console)]
        with open(out, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.tmp, start_new_session=True)
        agent = Agent(proc, out, poweroff, console)
        self.agents.append(agent)
        return agent

    def worker(self, a: Assignment | None, name: str = "worker-0", *flags: str,
               bucket: str | None = None, env: dict[str, str] | None = None) -> Agent:
        attrs = {"pcp-bucket": bucket or self.bucket.name, "pcp-stack": self.stack,
                 "pcp-project": TEST_PROJECT}
        if a is not None:
            attrs["pcp-assignment"] = a.to_json().decode()
        server = MetadataServer(lambda: dict(attrs), name).start()
        self.servers.append(server)
        full = self.env() | {"GCE_METADATA_HOST": server.host} | (env or {})
        return self.spawn(name, ["worker", "--boot-grace", "1", *flags], full)

    def shepherd(self, *flags: str, env: dict[str, str] | None = None) -> Agent:
        assert self.pubsub_host is not None
        ensure_topic(self.pubsub_host, TEST_PROJECT, f"pcp-{self.stack}-shepherd")
        ensure_subscription(self.pubsub_host, TEST_PROJECT, f"pcp-{self.stack}-shepherd-host",
                            f"pcp-{self.stack}-shepherd")
        return self.spawn("shepherd", ["shepherd", "--stack", self.stack, "--project",
                                       TEST_PROJECT, "--bucket", self.bucket.name, *flags],
                          self.env() | (env or {}))

    def publish(self, data: bytes) -> None:
        assert self.pubsub_host is not None
        client = publisher(self.pubsub_host)
        topic = client.topic_path(TEST_PROJECT, f"pcp-{self.stack}-shepherd")
        client.publish(topic, data).result(timeout=10)

    def get(self, name: str) -> bytes | None:
        blob = self.store.get(name)
        return None if blob is None else blob.data

    def marker(self, run_id: str, node: str, kind: str) -> dict[str, Any] | None:
        name = f"markers/{run_id}/{node}/{kind}.json"
        data = self.get(name)
        if data is None:
            return None
        # The agent also describes the marker in the object's metadata, which listings and
        # notifications carry, so the control plane need not read the object.
        [listed] = [x for x in self.store.scan(name) if x.name == name]
        assert NodeMarker.from_metadata(dict(listed.metadata), name) == \
            NodeMarker.from_json(data, name)
        found: dict[str, Any] = json.loads(data)
        return found

    def wait_marker(self, run_id: str, node: str, kind: str) -> dict[str, Any]:
        found: dict[str, Any] = wait_for(lambda: self.marker(run_id, node, kind),
                                         f"{kind} marker of {node}")
        return found

    def cleanup(self) -> None:
        for agent in self.agents:
            below = descendants(agent.proc.pid)
            if agent.proc.poll() is None:
                agent.proc.send_signal(signal.SIGTERM)
                try:
                    agent.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    agent.proc.kill()
                    agent.proc.wait()
            for pid in below:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for server in self.servers:
            server.stop()


@pytest.fixture
def harness(tmp_path: Path, gcs_bucket: GcsBucket) -> Iterator[Harness]:
    h = Harness(tmp_path, gcs_bucket)
    yield h
    h.cleanup()


@pytest.fixture
def cluster(harness: Harness, pubsub_emulator: Any) -> Harness:
    harness.pubsub_host = pubsub_emulator.host
    return harness


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assignments(run_id: str, stack: str, workers: int, port: int, args: tuple[str, ...] = (),
                binary: str | dict[str, str] = REFERENCE_BINARY, keep: bool = False,
                deadline_s: float = 600) -> list[Assignment]:
    """Shepherd first; the shepherd alone listens on loopback (the trainer's --host)."""
    now = datetime.now(UTC)
    nodes = ["shepherd", *(f"worker-{i}" for i in range(workers))]
    return [Assignment(run_id=run_id, attempt=1, stack=stack, node=node,
                       role="shepherd" if rank == 0 else "worker", rank=rank,
                       num_nodes=len(nodes), head_host="127.0.0.1", port=port, binary=binary,
                       args=(*args, "--host=127.0.0.1") if rank == 0 else args,
                       deadline=now + timedelta(seconds=deadline_s),
                       boot_deadline=now + timedelta(seconds=60), keep_vm_alive=keep)
            for rank, node in enumerate(nodes)]


def new_run() -> str:
    return f"run-{uuid.uuid4().hex[:10]}"


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}")
    path.chmod(0o755)
    return path


ARGV_DUMP = """import json, os, sys
out = os.environ["PCP_OUTPUT_DIR"]
env = {k: v for k, v in os.environ.items() if k.startswith("PCP_") or k in
       ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NCCL_SOCKET_IFNAME",
        "GLOO_SOCKET_IFNAME")}
with open(os.path.join(out, "argv.json"), "w") as f:
    json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": env}, f)
print("binary ran", flush=True)
"""

SLEEPER = """import sys, time
print("sleeper up", flush=True)
while True:
    print("tick", flush=True)
    time.sleep(0.2)
"""


# ---------------------------------------------------------------- whole runs


@emulator
@pytest.mark.parametrize("workers", [1, 3])
def test_run_writes_markers_logs_and_outputs_then_powers_off(cluster: Harness,
                                                             workers: int) -> None:
    run_id, port = new_run(), free_port()
    plan_ = assignments(run_id, cluster.stack, workers, port, TRAIN)
    shepherd = cluster.shepherd("--once")
    cluster.publish(ShepherdCommand("start", run_id, 1, plan_[0]).to_json())
    agents = [cluster.worker(a, a.node) for a in plan_[1:]]

    assert shepherd.wait() == 0, shepherd.text()
    for agent in agents:
        assert agent.wait() == 0, agent.text()
    for a, agent in zip(plan_, [shepherd, *agents], strict=True):
        booted = cluster.marker(run_id, a.node, "booted")
        done = cluster.marker(run_id, a.node, "done")
        assert booted is not None and booted["attempt"] == 1, a.node
        assert done is not None and done["exit_code"] == 0 and done["signal"] is None, done
        assert done["duration_s"] > 0
        stdout = (cluster.get(f"runs/{run_id}/{a.node}/stdout.log") or b"").decode()
        assert "step 5/5" in stdout, stdout
        assert cluster.get(f"runs/{run_id}/{a.node}/stderr.log") is not None
        metrics = json.loads(cluster.get(f"runs/{run_id}/{a.node}/metrics.json") or b"{}")
        assert metrics["status"] == "succeeded" and metrics["run_id"] == run_id
        heartbeat = json.loads(cluster.get(f"runs/{run_id}/{a.node}/heartbeat.json") or b"{}")
        assert heartbeat["node"] == a.node and heartbeat["phase"] == "exited"
        assert agent.poweroff.exists() == (a.role == "worker"), a.node
        # The dead-man stop is on record for `pcp events`, written before the power-off.
        power = json.loads(cluster.get(f"runs/{run_id}/{a.node}/power_off.json") or b"null")
        if a.role == "worker":
            assert power["kind"] == "dead_man_power_off" and power["node"] == a.node, power
            # ... and on the serial console, in the form the deadman-power-offs metric
            # matches (tests/infra/test_monitoring.py matches the same function's line).
            assert agent.console is not None
            [line] = agent.console.read_text().splitlines()
            assert line.startswith(f"{DEAD_MAN_CONSOLE_TAG} stack={cluster.stack} "
                                   f"node={a.node} run_id={run_id} attempt=1 reason="), line
            assert power["attempt"] == 1 and power["reason"]
        else:
            assert power is None, power
            assert agent.console is not None and agent.console.read_text() == ""
    assert cluster.get(f"runs/{run_id}/shepherd/checkpoint.npz")
    assert cluster.store.list(f"markers/{run_id}/") == sorted(  # logs stay out of markers/
        f"markers/{run_id}/{a.node}/{kind}.json" for a in plan_ for kind in ("booted", "done"))


@emulator
def test_failing_worker_reports_its_code_and_the_shepherd_fails_too(cluster: Harness) -> None:
    run_id, port = new_run(), free_port()
    plan_ = assignments(run_id, cluster.stack, 1, port,
                        (*TRAIN, "--fail-at-step", "2", "--fail-exit-code", "7"))
    shepherd = cluster.shepherd("--once")
    cluster.publish(ShepherdCommand("start", run_id, 1, plan_[0]).to_json())
    worker = cluster.worker(plan_[1])

    assert worker.wait() == 0
    assert shepherd.wait() != 0
    assert cluster.wait_marker(run_id, "worker-0", "done")["exit_code"] == 7
    shepherd_done = cluster.wait_marker(run_id, "shepherd", "done")
    assert shepherd_done["exit_code"] not in (0, None)
    stderr = (cluster.get(f"runs/{run_id}/worker-0/stderr.log") or b"").decode()
    assert "injected failure at step 2" in stderr
    assert worker.poweroff.exists()


@emulator
def test_sigterm_to_a_worker_agent_forwards_it_and_still_writes_done(cluster: Harness) -> None:
    run_id, port = new_run(), free_port()
    plan_ = assignments(run_id, cluster.stack, 1, port,
                        (*TRAIN[:1], "400", *TRAIN[2:], "--step-sleep", "0.05"))
    shepherd = cluster.shepherd("--once")
    cluster.publish(ShepherdCommand("start", run_id, 1, plan_[0]).to_json())
    worker = cluster.worker(plan_[1])
    cluster.wait_marker(run_id, "worker-0", "booted")
    wait_for(lambda: b"step" in (cluster.get(f"runs/{run_id}/worker-0/stdout.log") or b""),
             "training steps in the uploaded worker log")

    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait() == 0
    done = cluster.wait_marker(run_id, "worker-0", "done")
    assert done["signal"] == "SIGTERM" and done["exit_code"] == 143, done
    stderr = (cluster.get(f"runs/{run_id}/worker-0/stderr.log") or b"").decode()
    assert "received SIGTERM" in stderr
    assert json.loads(cluster.get(f"runs/{run_id}/worker-0/metrics.json") or b"{}")["status"] \
        == "terminated"
    assert not worker.poweroff.exists()  # a VM stop owns the machine's fate
    assert shepherd.wait() != 0  # it lost its worker


# ---------------------------------------------------------------- one worker, no shepherd agent


@pytest.fixture
def head() -> Iterator[int]:
    """A listening port standing in for the shepherd: the worker only needs it to answer."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        yield int(srv.getsockname()[1])


def test_shell_metacharacters_reach_the_binary_as_literal_arguments(
        harness: Harness, head: int, tmp_path: Path) -> None:
    run_id = new_run()
    config = (f"--lr=0.1 '; rm -rf / $(touch {tmp_path}/pwned1)' `touch {tmp_path}/pwned2` "
              f"&& touch {tmp_path}/pwned3 | cat > {tmp_path}/pwned4 \"$(id)\" '$HOME'")
    args = split_training_config(config)
    binary = script(tmp_path / "dump-argv", ARGV_DUMP)
    a = assignments(run_id, harness.stack, 1, head, args, binary=str(binary))[1]
    agent = harness.worker(a)

    assert agent.wait() == 0, agent.text()
    assert harness.wait_marker(run_id, "worker-0", "done")["exit_code"] == 0
    seen = json.loads(harness.get(f"runs/{run_id}/worker-0/argv.json") or b"{}")
    assert seen["argv"] == ["worker", f"--head-node=127.0.0.1:{head}", *args]
    assert "; rm -rf / $(touch" in " ".join(seen["argv"])
    assert not any((tmp_path / f"pwned{i}").exists() for i in range(1, 5))
    assert seen["env"]["PCP_RUN_ID"] == run_id and seen["env"]["RANK"] == "1"
    assert seen["env"]["PCP_OUTPUT_DIR"].endswith(f"{run_id}/1/output")
    assert seen["cwd"].endswith(f"{run_id}/1")
    assert agent.poweroff.exists()


def test_the_binary_gets_the_socket_interface_and_local_rank(
        harness: Harness, head: int, tmp_path: Path) -> None:
    run_id = new_run()
    binary = script(tmp_path / "dump-argv", ARGV_DUMP)
    a = assignments(run_id, harness.stack, 1, head, (), binary=str(binary))[1]
    agent = harness.worker(a, "worker-0", "--socket-ifname", "eth9")
    assert agent.wait() == 0, agent.text()
    seen = json.loads(harness.get(f"runs/{run_id}/worker-0/argv.json") or b"{}")
    assert seen["env"]["NCCL_SOCKET_IFNAME"] == seen["env"]["GLOO_SOCKET_IFNAME"] == "eth9"
    assert seen["env"]["LOCAL_RANK"] == "0" and seen["env"]["PCP_WORKER_RANK"] == "0"


@pytest.mark.parametrize("case", ["missing", "stale"])
def test_a_vm_booted_with_no_current_run_powers_off(harness: Harness, case: str) -> None:
    a = None
    if case == "stale":
        a = assignments(new_run(), harness.stack, 1, 9, deadline_s=-60)[1]
    agent = harness.worker(a)
    assert agent.wait(20) == 0, agent.text()
    assert agent.poweroff.exists()
    assert agent.logged("no_current_run")
    assert harness.store.list("markers/") == []


def test_a_rebooted_vm_does_not_run_an_attempt_again(harness: Harness, head: int,
                                                     tmp_path: Path) -> None:
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head,
                    binary=str(script(tmp_path / "dump-argv", ARGV_DUMP)))[1]
    done = NodeMarker(run_id, "worker-0", "done", 1, datetime.now(UTC), exit_code=0)
    harness.store.put(done.path, done.to_json())
    agent = harness.worker(a)
    assert agent.wait() == 0, agent.text()
    assert agent.logged("already_done") and agent.poweroff.exists()
    assert harness.marker(run_id, "worker-0", "booted") is None
    assert harness.get(f"runs/{run_id}/worker-0/argv.json") is None


def test_run_record_marked_ended_stops_the_binary(harness: Harness, head: int,
                                                  tmp_path: Path) -> None:
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head,
                    binary=str(script(tmp_path / "sleeper", SLEEPER)))[1]
    agent = harness.worker(a)
    harness.wait_marker(run_id, "worker-0", "booted")
    assert agent.proc.poll() is None
    now = datetime.now(UTC)
    run = Run(StartRequest(run_id), Phase.ENDED, accepted_at=now, attempt=1, started_at=now,
              ended_at=now, reason=Reason.FAILED, detail="worker-3 exited with code 7")
    harness.store.put(f"runs/{run_id}/run.json", run.to_json())

    assert agent.wait() == 0, agent.text()
    done = harness.wait_marker(run_id, "worker-0", "done")
    assert done["signal"] == "SIGTERM" and done["exit_code"] == 128 + signal.SIGTERM
    stderr = (harness.get(f"runs/{run_id}/worker-0/stderr.log") or b"").decode()
    assert "pcp-agent: stopping the binary: the run ended (failed" in stderr
    assert "tick" in (harness.get(f"runs/{run_id}/worker-0/stdout.log") or b"").decode()
    assert agent.poweroff.exists()


def test_a_binary_that_cannot_be_realised_still_writes_done(harness: Harness,
                                                             head: int) -> None:
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head, binary="/nonexistent/trainer")[1]
    agent = harness.worker(a)
    assert agent.wait() == 0, agent.text()
    assert harness.marker(run_id, "worker-0", "done")["exit_code"] == 127  # type: ignore[index]
    assert harness.marker(run_id, "worker-0", "booted") is None
    stderr = (harness.get(f"runs/{run_id}/worker-0/stderr.log") or b"").decode()
    assert "cannot realise the binary" in stderr and "/nonexistent/trainer" in stderr
    assert agent.poweroff.exists()


def test_an_agent_failure_still_powers_the_vm_off(harness: Harness, head: int,
                                                  tmp_path: Path) -> None:
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head,
                    binary=str(script(tmp_path / "sleeper", SLEEPER)))[1]
    agent = harness.worker(a, bucket=f"pcp-missing-{uuid.uuid4().hex[:8]}")
    assert agent.wait() == 1, agent.text()
    assert agent.logged("agent_failed", "NotFound")
    assert agent.poweroff.exists()


def fake_nix(tmp_path: Path, binary: Path) -> tuple[Path, Path]:
    """`nix` and `nix-store` stand-ins: record their argv, print a store path we made (as
    `nix build --json` prints it when asked for JSON). tests/agent/test_nix.py runs real Nix."""
    out = tmp_path / "store" / "abc123-trainer"
    (out / "bin").mkdir(parents=True)
    (out / "bin" / "trainer").symlink_to(binary)
    bindir, calls = tmp_path / "nixbin", tmp_path / "nix-calls.jsonl"
    bindir.mkdir()
    body = (f"import json, sys\nwith open({str(calls)!r}, 'a') as f:\n"
            f"    f.write(json.dumps(sys.argv) + '\\n')\n"
            f"print('building...', file=sys.stderr)\n"
            f"outs = {{'out': {str(out)!r}}}\n"
            f"print(json.dumps([{{'outputs': outs}}]) if '--json' in sys.argv else outs['out'])\n")
    script(bindir / "nix", body)
    script(bindir / "nix-store", body)
    return bindir, calls


def test_a_flake_reference_is_built_with_nix_and_its_program_run(
        harness: Harness, head: int, tmp_path: Path) -> None:
    run_id = new_run()
    bindir, calls = fake_nix(tmp_path, script(tmp_path / "dump-argv", ARGV_DUMP))
    a = assignments(run_id, harness.stack, 1, head, ("--steps", "3"),
                    binary={host_platform(): "github:example/trainer#trainer",
                            "riscv64-plan9": "/nix/store/zzz-other"})[1]
    agent = harness.worker(a, "worker-0", "--nix-bin-dir", str(bindir))
    assert agent.wait() == 0, agent.text()
    assert harness.marker(run_id, "worker-0", "done")["exit_code"] == 0  # type: ignore[index]
    argv = json.loads(calls.read_text().splitlines()[0])
    assert argv[1:] == ["--extra-experimental-features", "nix-command flakes", "build",
                        "--no-link", "--json", "github:example/trainer#trainer"]
    seen = json.loads(harness.get(f"runs/{run_id}/worker-0/argv.json") or b"{}")
    assert seen["argv"] == ["worker", f"--head-node=127.0.0.1:{head}", "--steps", "3"]
    assert b"building..." in (harness.get(f"runs/{run_id}/worker-0/stderr.log") or b"")


# ---------------------------------------------------------------- the shepherd daemon


@emulator
def test_shepherd_daemon_follows_start_and_stop_commands(cluster: Harness,
                                                         tmp_path: Path) -> None:
    sleeper = str(script(tmp_path / "sleeper", SLEEPER))
    run_a, run_b = new_run(), new_run()
    a = assignments(run_a, cluster.stack, 1, 9, binary=sleeper)[0]
    b = assignments(run_b, cluster.stack, 1, 9, binary=sleeper)[0]
    agent = cluster.shepherd()

    cluster.publish(b'{"action": "launch"}')
    wait_for(lambda: agent.logged("command_rejected", "action must be start or stop"),
             "the malformed command to be rejected")
    cluster.publish(ShepherdCommand("start", run_a, 1, a).to_json())
    cluster.wait_marker(run_a, "shepherd", "booted")
    cluster.publish(ShepherdCommand("start", run_a, 1, a).to_json())
    wait_for(lambda: agent.logged("ignored", "already running"), "the duplicate start ignored")
    cluster.publish(ShepherdCommand("stop", "run-elsewhere", 1, reason="x").to_json())
    wait_for(lambda: agent.logged("ignored", "not running here"), "the foreign stop ignored")
    assert cluster.marker(run_a, "shepherd", "done") is None

    cluster.publish(ShepherdCommand("start", run_b, 1, b).to_json())  # a new run replaces A
    assert cluster.wait_marker(run_a, "shepherd", "done")["signal"] == "SIGTERM"
    cluster.wait_marker(run_b, "shepherd", "booted")
    cluster.publish(ShepherdCommand("stop", run_b, 1, reason="cancelled: pcp stop").to_json())
    assert cluster.wait_marker(run_b, "shepherd", "done")["signal"] == "SIGTERM"
    stderr = (cluster.get(f"runs/{run_b}/shepherd/stderr.log") or b"").decode()
    assert "stop command: cancelled: pcp stop" in stderr
    cluster.publish(ShepherdCommand("start", run_a, 1, a).to_json())  # A already ran here
    wait_for(lambda: agent.logged("ignored", "already ran here"), "the finished start ignored")

    agent.proc.send_signal(signal.SIGTERM)
    assert agent.wait() == 0


# ---------------------------------------------------------------- decisions, in process


@pytest.mark.parametrize(("spec", "kind", "target", "program", "subpath"), [
    ("github:org/repo#trainer", "flake", "github:org/repo#trainer", None, ""),
    (".#trainer", "flake", ".#trainer", None, ""),
    ("github:org/repo", "flake", "github:org/repo", None, ""),
    ("/src/flake#x!train", "flake", "/src/flake#x", "train", ""),
    ("/nix/store/abc-trainer", "store", "/nix/store/abc-trainer", None, ""),
    ("/nix/store/abc-trainer/bin/run", "store", "/nix/store/abc-trainer", None, "bin/run"),
    ("/nix/store/abc-trainer!run", "store", "/nix/store/abc-trainer", "run", ""),
    ("/usr/local/bin/trainer", "path", "/usr/local/bin/trainer", None, ""),
    ("python:pcp.trainer", "python", "pcp.trainer", None, ""),
    ("python:/src/trainer.py", "python", "/src/trainer.py", None, ""),
])
def test_binary_plan(spec: str, kind: str, target: str, program: str | None,
                     subpath: str) -> None:
    p = plan(spec, "x86_64-linux")
    assert (p.kind, p.target, p.program, p.subpath) == (kind, target, program, subpath)


@pytest.mark.parametrize("spec", [None, "trainer", "python:os; rm -rf /", "python:../x.py",
                                  "python:/a/../b.py", "relative/path",
                                  "/nix/store/x/../../etc", "x#y!a/b",
                                  {"aarch64-darwin": "/nix/store/abc"}])
def test_binary_plan_refuses_what_it_cannot_run(spec: Any) -> None:
    with pytest.raises(BinaryError):
        plan(spec, "x86_64-linux")


def test_platform_names_match_nix() -> None:
    assert host_platform("arm64", "darwin") == "aarch64-darwin"
    assert host_platform("x86_64", "linux") == "x86_64-linux"
    assert plan({"aarch64-darwin": "/nix/store/mac", "x86_64-linux": "/nix/store/lin"},
                "aarch64-darwin").target == "/nix/store/mac"


def test_build_outputs_are_read_from_nix_build_json() -> None:
    answer = ('[{"drvPath": "/nix/store/d.drv", '
              '"outputs": {"bin": "/nix/store/b", "out": "/nix/store/o"}}]')
    assert build_outputs(answer) == [Path("/nix/store/o"), Path("/nix/store/b")]  # out first
    for bad in ("/nix/store/o\n", "{}", '[{"outputs": 1}]', ""):
        with pytest.raises(BinaryError, match="no JSON list of outputs"):
            build_outputs(bad)


# A stand-in for `nix build` with a builder in its process group. For a ref that says `ignore`
# both ignore SIGTERM (an ignored signal stays ignored across exec), so only SIGKILL ends them.
NIX_WITH_BUILDER = """import signal, subprocess, sys, time
if "ignore" in sys.argv[-1]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "300"])
with open(PIDFILE, "w") as f:
    f.write(str(child.pid))
time.sleep(300)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(("mode", "grace", "at_least", "at_most"), [
    ("obey", 5.0, 0.0, 3.0), ("ignore", 1.0, 1.0, 4.0)])
def test_a_stop_sigterms_nix_and_its_group_then_sigkills_after_the_grace(
        tmp_path: Path, mode: str, grace: float, at_least: float, at_most: float) -> None:
    bindir, pidfile = tmp_path / "nixbin", tmp_path / "builder.pid"
    bindir.mkdir()
    script(bindir / "nix", f"PIDFILE = {str(pidfile)!r}\n" + NIX_WITH_BUILDER)
    realiser = Realiser(str(bindir), cancelled=pidfile.exists, grace=grace)
    started = time.monotonic()
    try:
        with pytest.raises(BinaryError, match="told to stop"):
            realiser.realise(f"path:/src/{mode}#trainer")
        took = time.monotonic() - started
        assert at_least <= took <= at_most, took
        wait_for(lambda: gone(int(pidfile.read_text())), "the builder stand-in to be gone",
                 timeout=5)
    finally:
        if pidfile.exists() and not gone(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_store_paths_are_realised_with_nix_store(tmp_path: Path) -> None:
    bindir, calls = fake_nix(tmp_path, script(tmp_path / "prog", "print('x')\n"))
    prefix = Realiser(str(bindir)).realise("/nix/store/abc123-trainer")
    assert prefix == [str(tmp_path / "store" / "abc123-trainer" / "bin" / "trainer")]
    assert json.loads(calls.read_text())[1:] == ["--realise", "/nix/store/abc123-trainer"]
    assert Realiser(str(bindir)).realise("/nix/store/abc123-trainer/bin/trainer") == prefix
    with pytest.raises(BinaryError, match="no executable bin/other"):
        Realiser(str(bindir)).realise("/nix/store/abc123-trainer!other")
    with pytest.raises(BinaryError, match="nix not found in --nix-bin-dir"):
        Realiser(str(tmp_path)).realise("github:org/repo#x")


def test_power_off_decision() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    a = assignments("run-x", "s", 1, 9)[1]
    a = Assignment.from_dict({**a.to_dict(), "deadline": "2026-01-01T06:00:00Z"})
    kept = Assignment.from_dict({**a.to_dict(), "keep_vm_alive": True})
    lease = now + timedelta(hours=2)
    ended = RunView("ended", 1, "succeeded", keep_alive_until=lease)
    assert power_off_at(a, ended, now)[0] == now
    assert power_off_at(kept, None, now)[0] == kept.deadline  # run not over yet: wait
    assert power_off_at(kept, RunView("running", 1), now)[0] == kept.deadline
    assert power_off_at(kept, ended, now)[0] == lease
    assert power_off_at(kept, RunView("ended", 1, "cancelled"), now)[0] == now
    assert power_off_at(kept, RunView("starting", 2), now)[0] == now
    assert power_off_at(kept, ended, kept.deadline)[0] == kept.deadline  # never past it


def test_keep_alive_lease_delays_the_power_off(tmp_path: Path) -> None:
    from pcp.adapters.memory import MemoryStore

    store = MemoryStore()
    now = datetime.now(UTC)
    a = Assignment.from_dict({**assignments("run-k", "s", 1, 9)[1].to_dict(),
                              "keep_vm_alive": True})
    run = Run(StartRequest("run-k"), Phase.ENDED, accepted_at=now, ended_at=now,
              reason=Reason.SUCCEEDED, keep_alive_until=now + timedelta(seconds=1.5))
    store.put("runs/run-k/run.json", run.to_json())
    flag = tmp_path / "off"
    cfg = AgentConfig("worker", tmp_path, poweroff=("touch", str(flag)), poll_interval=0.2)
    stop = threading.Event()
    worker = Worker(cfg, None, lambda b, p: store, Log(), stop)  # type: ignore[arg-type]
    started = time.monotonic()
    assert worker.dead_man(a, store, Log()) == 0
    assert flag.exists() and time.monotonic() - started >= 1.0
