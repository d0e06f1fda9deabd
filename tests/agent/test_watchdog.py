"""The GPU-idle watchdog and the maintenance / preemption notices, in the agent.

The sampler reads the stand-in nvidia-smi (pcp_dev/local/nvidia_smi.py), which prints what the
driver's tool prints for `--query-gpu=utilization.gpu,memory.used --format=csv,noheader,
nounits` and fails as it does; the notices come from the metadata server stand-in with its
hanging `wait_for_change` GETs. The whole-worker tests run the real agent against an in-memory
bucket and check the done marker and the heartbeat a person would read.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.adapters.memory import MemoryStore
from pcp.agent import gpu, notices
from pcp.agent.assignment import Metadata
from pcp.agent.config import AgentConfig
from pcp.agent.log import Log
from pcp.agent.worker import Worker
from pcp.core.messages import Assignment, GpuIdle
from pcp.core.names import ASSIGNMENT_KEY, META_BUCKET, marker_path, node_file
from pcp_dev.local.metadata import MetadataServer, etag
from pcp_dev.local.nvidia_smi import install, write_state

pytestmark = [pytest.mark.agent]


@pytest.fixture
def smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in nvidia-smi first on PATH; returns its state directory."""
    state = tmp_path / "gpu-state"
    monkeypatch.setenv("PATH", f"{install(tmp_path / 'bin', state)}:/usr/bin:/bin")
    return state


# ---------------------------------------------------------------- the sampler


def test_samples_one_line_per_gpu_as_the_real_tool_prints_them(smi: Path) -> None:
    write_state(smi, [(87, 10240), (0, 0)])
    assert gpu.sample() == [gpu.GpuSample(0, 87.0, 10240.0), gpu.GpuSample(1, 0.0, 0.0)]
    write_state(smi, [(None, 512)])  # a GPU that does not report utilization: [N/A]
    assert gpu.sample() == [gpu.GpuSample(0, None, 512.0)]


@pytest.mark.parametrize(("mode", "words"), [
    ("no-devices", "exited with code 6: No devices were found"),
    ("no-driver", "exited with code 9: NVIDIA-SMI has failed because it couldn't communicate"),
])
def test_the_real_failures_are_sample_errors_in_plain_words(smi: Path, mode: str,
                                                            words: str) -> None:
    write_state(smi, [], mode)
    with pytest.raises(gpu.SampleError, match=words):
        gpu.sample()


def test_no_nvidia_smi_is_a_sample_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(gpu.SampleError, match="nvidia-smi is not installed"):
        gpu.sample()


@pytest.mark.parametrize("out", ["", "87\n", "87, 10, 3\n", "busy, 10\n", "-1, 10\n"])
def test_output_that_is_not_the_query_format_is_refused(out: str) -> None:
    with pytest.raises(gpu.SampleError):
        gpu.parse_query(out)


def test_the_query_is_an_argument_list() -> None:
    assert gpu.QUERY == ("--query-gpu=utilization.gpu,memory.used",
                         "--format=csv,noheader,nounits")


# ---------------------------------------------------------------- the policy


def S(*utils: float | None) -> list[gpu.GpuSample]:  # noqa: N802 - reads like a sample
    return [gpu.GpuSample(i, u, 0.0) for i, u in enumerate(utils)]


def test_idle_for_the_window_after_the_grace_breaks_the_policy() -> None:
    w = gpu.IdleWatch(GpuIdle(5, 2, 1), started=0.0, minute_seconds=60)
    assert w.observe(S(0, 1), 0) is None
    assert w.observe(S(0, 1), 150) is None  # idle since 0, but the window counts from 60
    broken = w.observe(S(0, 1), 180)
    assert broken is not None and "below 5% utilization for 2 min" in broken


def test_one_busy_gpu_or_an_unknown_value_resets_the_window() -> None:
    w = gpu.IdleWatch(GpuIdle(5, 1), started=0.0, minute_seconds=60)
    assert w.observe(S(0, 0), 0) is None
    assert w.observe(S(0, 50), 50) is None  # one GPU busy: not idle
    assert w.observe(S(0, 0), 60) is None  # a new streak from 60
    assert w.observe(S(0, None), 100) is None  # [N/A]: not known idle
    assert w.observe(None, 110) is None  # a failed sample: nothing known
    assert w.observe(S(0, 0), 120) is None
    assert w.observe(S(0, 0), 179) is None
    assert w.observe(S(0, 0), 180) is not None


def test_exactly_the_threshold_is_not_idle() -> None:
    w = gpu.IdleWatch(GpuIdle(5, 1), started=0.0, minute_seconds=1)
    assert w.observe(S(5), 0) is None and w.observe(S(5), 10) is None
    assert w.observe(S(4.9), 10) is None and w.observe(S(4.9), 11) is not None


# ---------------------------------------------------------------- the metadata server


def get(server: MetadataServer, path: str, flavor: bool = True,
        timeout: float = 10) -> tuple[int, str, str | None]:
    headers = {"Metadata-Flavor": "Google"} if flavor else {}
    request = urllib.request.Request(f"{server.url}/computeMetadata/v1/instance/{path}",
                                     headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read().decode(), r.headers.get("ETag")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), None


def test_the_notice_keys_hang_until_the_value_changes_like_the_real_server() -> None:
    with MetadataServer(dict, "vm") as server:
        assert get(server, "maintenance-event")[:2] == (200, "NONE")
        code, value, tag = get(server, "preempted")
        assert (code, value, tag) == (200, "FALSE", etag("FALSE"))
        assert get(server, "preempted", flavor=False)[0] == 403
        # timeout_sec: the unchanged value after that long
        began = time.monotonic()
        assert get(server, f"preempted?wait_for_change=true&last_etag={tag}&timeout_sec=1")[1] \
            == "FALSE"
        assert time.monotonic() - began >= 0.9
        # a stale last_etag answers at once
        assert get(server, "preempted?wait_for_change=true&last_etag=0000&timeout_sec=30")[1] \
            == "FALSE"
        assert get(server, "preempted?wait_for_change=true&timeout_sec=0")[0] == 400
        threading.Timer(0.3, server.notify, ("preempted", "TRUE")).start()
        code, value, new = get(server, f"preempted?wait_for_change=true&last_etag={tag}")
        assert (code, value) == (200, "TRUE") and new != tag
        with pytest.raises(ValueError, match="cannot be 'MAYBE'"):
            server.notify("preempted", "MAYBE")
        server.reset()
        assert get(server, "preempted")[1] == "FALSE"


def test_the_watch_fires_once_on_terminate_and_ignores_a_live_migration() -> None:
    fired: list[tuple[str, str]] = []
    with MetadataServer(dict, "vm") as server:
        watch = notices.NoticeWatch(server.host, lambda r, t: fired.append((r, t)),
                                    Log("tiny"), wait=5, retry_seconds=0.1).start()
        time.sleep(0.3)
        server.notify("maintenance-event", "MIGRATE_ON_HOST_MAINTENANCE")
        time.sleep(0.5)
        assert fired == []
        server.notify("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
        server.notify("preempted", "TRUE")
        deadline = time.monotonic() + 5
        while not fired and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        watch.stop()
    assert len(fired) == 1 and fired[0][0] in ("maintenance", "preempted"), fired


# ---------------------------------------------------------------- a whole worker agent


def long_binary(tmp_path: Path) -> str:
    """A binary that trains until it is told to stop, and exits 143 on SIGTERM."""
    path = tmp_path / "trainer.sh"
    path.write_text("#!/bin/sh\ntrap 'echo got SIGTERM; exit 143' TERM\n"
                    "i=0\nwhile [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n")
    path.chmod(0o755)
    return str(path)


def run_worker(tmp_path: Path, policy: GpuIdle | None,
               during: object = None) -> tuple[MemoryStore, dict[str, object]]:
    store = MemoryStore()
    cfg = AgentConfig(role="worker", work_dir=tmp_path / "work", poweroff=(), boot_grace=0,
                      poll_interval=0.2, upload_interval=0.2, gpu_interval=0.1,
                      gpu_minute_seconds=0.5, grace=2.0)
    with socket.create_server(("127.0.0.1", 0)) as head:
        now = datetime.now(UTC)
        a = Assignment(run_id="r-w", attempt=1, stack="tiny", node="worker-0", role="worker",
                       rank=1, num_nodes=2, head_host="127.0.0.1", port=head.getsockname()[1],
                       binary=long_binary(tmp_path), args=(),
                       deadline=now + timedelta(minutes=5),
                       boot_deadline=now + timedelta(seconds=30), gpu_idle=policy)
        attrs = {META_BUCKET: "pcp-tiny-p", ASSIGNMENT_KEY: a.to_json().decode()}
        with MetadataServer(lambda: attrs, "pcp-tiny-worker-0") as server:
            if callable(during):
                threading.Timer(1.0, during, (server,)).start()
            Worker(cfg, Metadata(server.host), lambda b, p: store, Log("tiny"),
                   threading.Event()).run()
    blob = store.get(marker_path("r-w", "worker-0", "done"))
    assert blob is not None, "no done marker"
    return store, json.loads(blob.data)


def test_an_idle_gpu_ends_the_node_with_reason_gpu_idle(tmp_path: Path, smi: Path) -> None:
    write_state(smi, [(1, 300), (0, 300)])
    store, done = run_worker(tmp_path, GpuIdle(5, 2, 1))  # 1.5 s of a 0.5 s "minute"
    assert done["end_reason"] == "gpu_idle" and done["signal"] == "SIGTERM", done
    assert done["duration_s"] < 60  # ended by the watchdog, not by the binary's own end
    beat = json.loads(store.get(node_file("r-w", "worker-0", "heartbeat.json")).data)
    assert beat["gpus"] == [{"index": 0, "utilization_percent": 1.0, "memory_used_mib": 300.0},
                            {"index": 1, "utilization_percent": 0.0, "memory_used_mib": 300.0}]
    stderr = store.get(node_file("r-w", "worker-0", "stderr.log")).data.decode()
    assert "pcp-agent: stopping the binary: every GPU stayed below 5% utilization" in stderr


def test_a_busy_gpu_is_left_alone_and_a_notice_ends_it_as_preempted(tmp_path: Path,
                                                                    smi: Path) -> None:
    write_state(smi, [(90, 8000)])

    def preempt(server: MetadataServer) -> None:
        time.sleep(1.5)  # several windows of the policy have passed, busy
        server.notify("preempted", "TRUE")
    store, done = run_worker(tmp_path, GpuIdle(5, 1), during=preempt)
    assert done["end_reason"] == "preempted" and done["exit_code"] == 143, done
    stdout = store.get(node_file("r-w", "worker-0", "stdout.log")).data.decode()
    assert "got SIGTERM" in stdout  # the binary was given SIGTERM, and its outputs went up


def test_a_maintenance_notice_ends_the_node_as_maintenance(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: no GPU sampling at all
    store, done = run_worker(
        tmp_path, None,
        during=lambda s: s.notify("maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE"))
    assert done["end_reason"] == "maintenance", done
    beat = json.loads(store.get(node_file("r-w", "worker-0", "heartbeat.json")).data)
    assert "gpus" not in beat
