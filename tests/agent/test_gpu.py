"""The worker's GPU check: a stand-in `nvidia-smi` on PATH printing what the real one prints,
or none at all, and a whole worker agent (metadata server, in-memory bucket) failing its node
in plain words when the GPU is not there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.adapters.memory import MemoryStore
from pcp.agent import gpu
from pcp.agent.assignment import Metadata
from pcp.agent.config import AgentConfig
from pcp.agent.log import Log
from pcp.agent.worker import Worker
from pcp.core.messages import Assignment
from pcp.core.names import ASSIGNMENT_KEY, META_BUCKET, META_GPU_COUNT, marker_path, node_file
from pcp_dev.local.metadata import MetadataServer

pytestmark = [pytest.mark.agent]

# What the driver's nvidia-smi prints: `-L` lists the GPUs; without a loaded driver it says
# so on stdout and exits 9.
T4 = "GPU {i}: Tesla T4 (UUID: GPU-8a1f3c2e-5b7d-4e10-9c6a-0f2b3d4e5f6{i})"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")


def standin(directory: Path, body: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "nvidia-smi"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return directory


def gpus(n: int) -> str:
    lines = "\n".join(T4.format(i=i) for i in range(n))
    return f'[ "$1" = -L ] || exit 64\ncat <<"EOF"\n{lines}\nEOF\n'


@pytest.fixture
def path_to(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    def use(directory: Path | None) -> None:
        monkeypatch.setenv("PATH", f"{directory}:/usr/bin:/bin" if directory else "/nonexistent")
    yield use


def test_a_working_gpu_passes(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", gpus(2)))
    assert gpu.check(1) is None and gpu.check(2) is None


def test_fewer_gpus_than_the_stack_has(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", gpus(1)))
    problem = gpu.check(2)
    assert problem is not None and problem.startswith("nvidia-smi sees 1 GPU(s), this worker "
                                                      "should have 2")


def test_no_driver_loaded(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", f'echo "{NO_DRIVER}"\nexit 9\n'))
    problem = gpu.check(1)
    assert problem is not None
    assert problem.startswith("nvidia-smi failed with exit code 9: the NVIDIA driver is not "
                              "working (NVIDIA-SMI has failed because it couldn't communicate")


def test_no_nvidia_smi_at_all(path_to) -> None:  # noqa: ANN001
    path_to(None)
    problem = gpu.check(1)
    assert problem is not None and "nvidia-smi is not installed" in problem
    assert "no NVIDIA driver" in problem
    assert gpu.check(0) is None  # a CPU stack never asks


def test_a_hung_driver(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", "exec sleep 30\n"))
    problem = gpu.check(1, timeout=0.5)
    assert problem is not None and "did not answer within 0.5 s" in problem


@pytest.mark.parametrize(("raw", "count"), [(None, 0), ("", 0), (" 0 ", 0), ("4", 4)])
def test_the_metadata_count(raw: str | None, count: int) -> None:
    assert gpu.parse_count(raw) == count


@pytest.mark.parametrize("raw", ["two", "-1", "1.5"])
def test_a_malformed_count(raw: str) -> None:
    with pytest.raises(ValueError, match="pcp-gpu-count"):
        gpu.parse_count(raw)


# ---------------------------------------------------------------- a whole worker agent


def assignment(port: int, binary: str) -> Assignment:
    now = datetime.now(UTC)
    return Assignment(run_id="r-gpu", attempt=1, stack="tiny", node="worker-0", role="worker",
                      rank=1, num_nodes=2, head_host="127.0.0.1", port=port, binary=binary,
                      args=(), deadline=now + timedelta(minutes=5),
                      boot_deadline=now + timedelta(seconds=30))


def run_worker(tmp_path: Path, attrs: dict[str, str]) -> tuple[int, MemoryStore]:
    store = MemoryStore()
    cfg = AgentConfig(role="worker", work_dir=tmp_path / "work", poweroff=(), boot_grace=0,
                      poll_interval=0.2, upload_interval=0.2)
    with socket.create_server(("127.0.0.1", 0)) as head:  # the shepherd's port answers
        attrs[ASSIGNMENT_KEY] = assignment(head.getsockname()[1], "python:this").to_json() \
            .decode()
        with MetadataServer(lambda: attrs, "pcp-tiny-worker-0") as server:
            worker = Worker(cfg, Metadata(server.host), lambda b, p: store, Log("tiny"),
                            threading.Event())
            code = worker.run()
    return code, store


def done(store: MemoryStore) -> dict[str, object] | None:
    blob = store.get(marker_path("r-gpu", "worker-0", "done"))
    return None if blob is None else json.loads(blob.data)


def test_a_worker_without_its_gpu_fails_its_node_in_plain_words(tmp_path: Path,
                                                                 path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", f'echo "{NO_DRIVER}"\nexit 9\n'))
    code, store = run_worker(tmp_path, {META_BUCKET: "pcp-tiny-p", META_GPU_COUNT: "1"})
    assert code == 0  # then the dead-man's switch (an empty power-off command here)
    marker = done(store)
    assert marker is not None and marker["exit_code"] == gpu.GPU_UNAVAILABLE == 125
    assert store.get(marker_path("r-gpu", "worker-0", "booted")) is None  # nothing ran
    stderr = store.get(node_file("r-gpu", "worker-0", "stderr.log"))
    assert stderr is not None
    assert stderr.data.decode().startswith("pcp-agent: the GPU is not usable: nvidia-smi failed "
                                           "with exit code 9: the NVIDIA driver is not working")


def test_a_worker_with_its_gpu_runs_the_binary(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(standin(tmp_path / "bin", gpus(1)))
    code, store = run_worker(tmp_path, {META_BUCKET: "pcp-tiny-p", META_GPU_COUNT: "1"})
    assert code == 0
    marker = done(store)
    assert marker is not None and marker["exit_code"] == 0, marker
    assert store.get(marker_path("r-gpu", "worker-0", "booted")) is not None


def test_a_cpu_stack_never_looks_for_a_gpu(tmp_path: Path, path_to) -> None:  # noqa: ANN001
    path_to(None)  # no nvidia-smi anywhere: it must not matter
    code, store = run_worker(tmp_path, {META_BUCKET: "pcp-tiny-p"})
    marker = done(store)
    assert code == 0 and marker is not None and marker["exit_code"] == 0
    assert os.environ["PATH"] == "/nonexistent"
