"""The reference trainer (examples/reference-trainer) as real processes on loopback ports."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pcp_dev import REFERENCE_TRAINER

pytestmark = pytest.mark.agent

REPO = Path(__file__).resolve().parents[2]
WAIT = 20.0  # seconds any node may take to finish in these tests


def _load_trainer() -> Any:
    """The trainer is a script under examples/, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("reference_trainer", REFERENCE_TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_trainer = _load_trainer()
recv_msg, send_msg, should_fail = _trainer.recv_msg, _trainer.send_msg, _trainer.should_fail
proof = _trainer.proof
SECRET = "5e" * 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    rank: int
    out_dir: Path
    log_dir: Path

    def wait(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout=timeout)

    @property
    def stdout(self) -> str:
        return (self.log_dir / "stdout").read_text()

    @property
    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text()

    def metrics(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.out_dir / "metrics.json").read_text())
        return data


Launch = Callable[..., Node]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Start a trainer node; every node started is killed at teardown."""
    nodes: list[Node] = []

    def start(rank: int, num_nodes: int, port: int, *args: str, secret: str = "") -> Node:
        role = "shepherd" if rank == 0 else "worker"
        log_dir = tmp_path / f"logs{rank}"
        log_dir.mkdir(exist_ok=True)
        out_dir = tmp_path / f"out{rank}"
        env = {**os.environ, "PYTHONPATH": str(REPO), "PCP_RUN_ID": "test-run",
               "PCP_ROLE": role, "PCP_NODE_RANK": str(rank), "PCP_NUM_NODES": str(num_nodes),
               "PCP_HEAD_NODE": f"127.0.0.1:{port}", "PCP_OUTPUT_DIR": str(out_dir),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(num_nodes)}
        env.pop("PCP_RUN_SECRET", None)
        if secret:
            env["PCP_RUN_SECRET"] = secret
        where = ["--port", str(port), "--host", "127.0.0.1"] if rank == 0 else [
            f"--head-node=127.0.0.1:{port}"]
        with open(log_dir / "stdout", "wb") as out, open(log_dir / "stderr", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(REFERENCE_TRAINER), role, *where, *args],
                cwd=REPO, env=env, stdout=out, stderr=err)
        node = Node(proc, rank, out_dir, log_dir)
        nodes.append(node)
        return node

    try:
        yield start
    finally:
        for node in nodes:
            if node.proc.poll() is None:
                node.proc.kill()
            node.proc.wait(timeout=10)


def start_cluster(launch: Launch, workers: int, *args: str) -> list[Node]:
    port = free_port()
    return [launch(rank, workers + 1, port, *args) for rank in range(workers + 1)]


def wait_for_output(node: Node, text: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.stdout:
        assert node.proc.poll() is None, f"node {node.rank} exited: {node.stderr}"
        assert time.monotonic() < deadline, f"no {text!r} from node {node.rank}: {node.stdout}"
        time.sleep(0.05)


@pytest.mark.parametrize("workers", [1, 3])
def test_training_converges(launch: Launch, workers: int) -> None:
    nodes = start_cluster(launch, workers, "--steps", "20")
    codes = [node.wait() for node in nodes]
    assert codes == [0] * (workers + 1), [n.stderr for n in nodes]
    shepherd = nodes[0]
    metrics = shepherd.metrics()
    assert metrics["status"] == "succeeded"
    assert metrics["steps"] == 20 and len(metrics["loss"]) == 20
    assert metrics["num_workers"] == workers
    assert metrics["final_loss"] < metrics["initial_loss"] / 10
    assert metrics["initial_loss"] == metrics["loss"][0]
    with np.load(shepherd.out_dir / "checkpoint.npz") as ckpt:
        assert ckpt["w"].shape == (20,) and np.all(np.isfinite(ckpt["w"]))
        assert int(ckpt["step"]) == 20
    assert "step 20/20 loss" in shepherd.stdout
    sizes = []
    for worker in nodes[1:]:
        wm = worker.metrics()
        assert wm["status"] == "succeeded" and len(wm["loss"]) == 20
        assert wm["loss"][-1] < wm["loss"][0] / 10
        assert f"[worker {worker.rank}] step 20/20" in worker.stdout
        sizes.append(wm["shard_size"])
    assert sum(sizes) == 4096 and max(sizes) - min(sizes) <= 1


def test_the_shepherd_reports_progress_as_the_live_view_reads_it(launch: Launch) -> None:
    """`pcp-progress step= loss=` lines (docs/agent.md): what `pcp run --wait` draws."""
    from pcp.cli.views import TrainingProgress

    nodes = start_cluster(launch, 1, "--steps", "100")
    assert [node.wait() for node in nodes] == [0, 0], [n.stderr for n in nodes]
    shepherd = nodes[0]
    seen = TrainingProgress().read([("shepherd/stdout.log", shepherd.stdout.encode())])
    assert seen.node == "shepherd" and seen.step == 100
    assert len(seen.losses) == 50  # every other step of 100, the last included
    assert seen.loss == pytest.approx(shepherd.metrics()["final_loss"], rel=1e-5)
    assert seen.losses[-1] < seen.losses[0] / 10


def test_failing_worker_is_named_by_the_shepherd(launch: Launch) -> None:
    nodes = start_cluster(launch, 2, "--steps", "20", "--fail-at-step", "5",
                          "--fail-exit-code", "7", "--fail-node", "1", "--peer-loss-grace", "1")
    shepherd, failing, other = nodes
    assert failing.wait() == 7
    assert shepherd.wait() == 1
    assert other.wait() != 0
    assert "lost worker rank 1 at step 5" in shepherd.stderr
    assert shepherd.metrics()["steps_completed"] == 4
    assert shepherd.metrics()["status"] == "failed"
    assert failing.metrics()["status"] == "injected-failure"
    assert "lost connection to shepherd" in other.stderr
    assert "waiting up to 1 s before exiting" in shepherd.stderr


def test_shepherd_stopped_while_lingering_reports_the_signal(launch: Launch) -> None:
    nodes = start_cluster(launch, 1, "--steps", "20", "--fail-at-step", "3",
                          "--fail-node", "1", "--peer-loss-grace", "60")
    shepherd, failing = nodes
    assert failing.wait() == 3
    deadline = time.monotonic() + 20
    while "waiting up to 60 s" not in shepherd.stderr and time.monotonic() < deadline:
        time.sleep(0.1)
    shepherd.proc.send_signal(signal.SIGTERM)
    assert shepherd.wait() == 143
    assert shepherd.metrics()["status"] == "terminated"


def test_lost_shepherd_ends_every_worker(launch: Launch) -> None:
    nodes = start_cluster(launch, 2, "--steps", "20", "--lose-shepherd-at-step", "3")
    assert nodes[0].wait() == 137
    for worker in nodes[1:]:
        assert worker.wait() == 1
        assert "lost connection to shepherd at 127.0.0.1:" in worker.stderr
        assert worker.metrics()["steps_completed"] == 2


def test_worker_waits_for_a_late_shepherd(launch: Launch) -> None:
    port = free_port()
    worker = launch(1, 2, port, "--steps", "10")
    wait_for_output(worker, f"waiting for shepherd at 127.0.0.1:{port}")
    time.sleep(1.5)
    assert worker.proc.poll() is None
    shepherd = launch(0, 2, port, "--steps", "10")
    assert shepherd.wait() == 0, shepherd.stderr
    assert worker.wait() == 0, worker.stderr
    assert shepherd.metrics()["steps_completed"] == 10


def test_worker_gives_up_without_a_shepherd(launch: Launch) -> None:
    worker = launch(1, 2, free_port(), "--connect-timeout", "1")
    assert worker.wait() == 1
    assert "waiting for shepherd at" in worker.stdout
    assert "gave up after 1 s" in worker.stderr


def test_shepherd_gives_up_without_workers(launch: Launch) -> None:
    shepherd = launch(0, 3, free_port(), "--connect-timeout", "1")
    assert shepherd.wait() == 1
    assert "0 of 2 connected, missing rank(s) [1, 2]" in shepherd.stderr


def test_hanging_worker_trips_the_peer_timeout(launch: Launch) -> None:
    port = free_port()
    shepherd = launch(0, 2, port, "--peer-timeout", "1")
    worker = launch(1, 2, port, "--hang")
    assert shepherd.wait() == 1
    assert "gradient of worker rank(s) [1]" in shepherd.stderr
    assert worker.proc.poll() is None  # still hanging; the fixture kills it


@pytest.mark.parametrize("rank", [0, 1])
def test_unknown_argument_is_a_usage_error(launch: Launch, rank: int) -> None:
    node = launch(rank, 2, free_port(), "--bogus", "1")
    assert node.wait() == 2
    assert "unrecognized arguments: --bogus" in node.stderr


def test_sigterm_stops_the_shepherd_promptly(launch: Launch) -> None:
    shepherd, worker = start_cluster(launch, 1, "--steps", "100", "--step-sleep", "0.2")
    wait_for_output(shepherd, "step 4/100")
    shepherd.proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert shepherd.wait(timeout=5) == 143
    assert time.monotonic() - sent < 3
    metrics = shepherd.metrics()
    assert metrics["status"] == "terminated"
    assert 4 <= metrics["steps_completed"] < 100
    assert worker.wait() == 1
    assert "lost connection to shepherd" in worker.stderr


def test_fail_rule() -> None:
    def args(node: int | None) -> Namespace:
        return Namespace(fail_at_step=5, fail_node=node)

    assert [should_fail(args(None), r, 5) for r in range(3)] == [False, True, True]
    assert [should_fail(args(2), r, 5) for r in range(3)] == [False, False, True]
    assert should_fail(args(0), 0, 5) and not should_fail(args(0), 0, 4)
    assert not should_fail(Namespace(fail_at_step=None, fail_node=None), 1, 5)


def test_frames_round_trip() -> None:
    a, b = socket.socketpair()
    with a, b:
        vec = np.arange(5, dtype=np.float64) / 3
        send_msg(a, {"type": "grad", "step": 2}, vec)
        send_msg(a, {"type": "done"})
        header, got = recv_msg(b)
        assert header == {"type": "grad", "step": 2, "nbytes": 40}
        assert np.array_equal(got, vec)
        header, got = recv_msg(b)
        assert header["type"] == "done" and got.size == 0


# ---------------------------------------------------------------- the run secret


def test_a_cluster_sharing_the_run_secret_trains(launch: Launch) -> None:
    port = free_port()
    nodes = [launch(rank, 3, port, "--steps", "5", secret=SECRET) for rank in range(3)]
    assert [n.wait() for n in nodes] == [0, 0, 0], nodes[0].stderr
    assert nodes[0].metrics()["steps_completed"] == 5
    for node in nodes:
        assert SECRET not in node.stdout + node.stderr


def handshake(port: int, hello: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """Connect as a hostile client: read the challenge, send `hello(nonce)`, return the
    answer (or {} when the shepherd just closes)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the shepherd never listened"
            time.sleep(0.05)
    with sock:
        challenge, _ = recv_msg(sock)
        assert challenge["type"] == "challenge" and SECRET not in json.dumps(challenge)
        send_msg(sock, hello(challenge["nonce"]))
        try:
            answer, _ = recv_msg(sock)
        except _trainer.PeerLost:
            return {}
        return answer


@pytest.mark.parametrize("client", ["no-proof", "forged-proof", "replayed-proof"])
def test_a_connection_without_the_secret_is_rejected_and_the_shepherd_keeps_waiting(
        launch: Launch, client: str) -> None:
    port = free_port()
    shepherd = launch(0, 2, port, "--steps", "3", secret=SECRET)

    def hello(nonce: str) -> dict[str, Any]:
        if client == "no-proof":
            return {"type": "hello", "rank": 1}
        if client == "forged-proof":  # a proof made with another secret
            return {"type": "hello", "rank": 1, "nonce": "ab" * 16,
                    "proof": proof(b"guessed", "hello", nonce, "ab" * 16, 1)}
        # a proof that was valid for another challenge
        return {"type": "hello", "rank": 1, "nonce": "ab" * 16,
                "proof": proof(SECRET.encode(), "hello", "0" * 32, "ab" * 16, 1)}

    assert handshake(port, hello) == {"type": "reject", "reason": "authentication failed",
                                      "nbytes": 0}
    wait_for_stderr(shepherd, "authentication failed")
    worker = launch(1, 2, port, "--steps", "3", secret=SECRET)  # the genuine one still gets in
    assert worker.wait() == 0 and shepherd.wait() == 0, shepherd.stderr
    assert shepherd.metrics()["steps_completed"] == 3


def test_a_worker_with_another_secret_is_refused(launch: Launch) -> None:
    port = free_port()
    launch(0, 2, port, "--steps", "3", "--connect-timeout", "30", secret=SECRET)
    worker = launch(1, 2, port, "--steps", "3", secret="77" * 32)
    assert worker.wait() == 1
    assert "shepherd rejected this worker: authentication failed" in worker.stderr


def test_a_worker_refuses_a_shepherd_that_cannot_prove_the_secret(launch: Launch) -> None:
    """A fake shepherd (anything listening on the head node's port) learns nothing and is
    not trained with: the worker checks the welcome's proof."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        worker = launch(1, 2, port, "--steps", "3", secret=SECRET)
        srv.settimeout(WAIT)
        conn, _ = srv.accept()
        with conn:
            send_msg(conn, {"type": "challenge", "nonce": "cd" * 16})
            hello, _ = recv_msg(conn)
            assert SECRET not in json.dumps(hello) and len(hello["proof"]) == 64
            send_msg(conn, {"type": "welcome", "num_workers": 1, "seed": 0, "samples": 8,
                            "features": 2, "steps": 3, "proof": "0" * 64})
            assert worker.wait() == 1
    assert "did not prove the run secret" in worker.stderr


def wait_for_stderr(node: Node, text: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.stderr:
        assert time.monotonic() < deadline, f"no {text!r} from node {node.rank}: {node.stderr}"
        time.sleep(0.05)
