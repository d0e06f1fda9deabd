"""The agent's own SIGTERM on a Spot VM (30 s in all): output uploads are cut short so that
`done` is still written. A real binary (a shell script that waits) runs until it is stopped."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.adapters.memory import MemoryStore
from pcp.agent.__main__ import DEFAULT_GRACE, DEFAULT_STOP_UPLOAD
from pcp.agent.config import AgentConfig
from pcp.agent.log import Log
from pcp.agent.session import Session
from pcp.agent.uploader import Uploader
from pcp.core.messages import Assignment
from pcp.core.names import marker_path, node_file

pytestmark = [pytest.mark.agent]
SPOT_SOFT_OFF_SECONDS = 30


def assignment(binary: str = "/bin/true") -> Assignment:
    now = datetime.now(UTC)
    return Assignment(run_id="r-spot", attempt=1, stack="tiny", node="shepherd", role="shepherd",
                      rank=0, num_nodes=1, head_host="127.0.0.1", port=9000,
                      binary=binary, args=(),
                      deadline=now + timedelta(minutes=5),
                      boot_deadline=now + timedelta(seconds=30))


def test_the_defaults_fit_a_spot_vm() -> None:
    # signal delivery ~1 s, logs ~3 s, done ~1 s, one file already under way: keep 10 s spare
    assert DEFAULT_GRACE + DEFAULT_STOP_UPLOAD + 10 <= SPOT_SOFT_OFF_SECONDS


def test_outputs_past_the_budget_are_skipped_and_named(tmp_path: Path) -> None:
    store = MemoryStore()
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.bin", "b.bin"):
        (out / name).write_bytes(b"x")
    up = Uploader(store, assignment(), Log("tiny"))
    assert up.output(out, until=time.monotonic() - 1) == 0
    assert store.list("runs/") == []
    assert up.output(out, until=time.monotonic() + 60) == 2


@pytest.mark.parametrize("budget", [0.0, 60.0])
def test_done_is_written_after_a_sigterm_within_the_budget(tmp_path: Path,
                                                           budget: float) -> None:
    store = MemoryStore()
    stop = threading.Event()
    cfg = AgentConfig(role="shepherd", work_dir=tmp_path / "work", grace=5.0,
                      stop_upload_budget=budget, upload_interval=0.2, poll_interval=0.2,
                      output_interval=0)  # outputs go up only at the end, under the budget
    trainer = tmp_path / "trainer"
    trainer.write_text("#!/bin/sh\ntrap 'exit 143' TERM\nsleep 60 &\nwait\n")
    trainer.chmod(0o755)
    session = Session(assignment(str(trainer)), store, cfg, Log("tiny"), stop)
    checkpoint = session.output / "checkpoint.pt"
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(session.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while store.get(marker_path("r-spot", "shepherd", "booted")) is None:
        assert time.monotonic() < deadline, "the binary never started"
        time.sleep(0.05)
    checkpoint.write_bytes(b"weights")  # written while the run goes on, not yet uploaded
    started = time.monotonic()
    stop.set()  # the agent's SIGTERM
    thread.join(30)
    assert not thread.is_alive()
    took = time.monotonic() - started
    done = store.get(marker_path("r-spot", "shepherd", "done"))
    assert done is not None and json.loads(done.data)["signal"] == "SIGTERM"
    assert took < DEFAULT_GRACE + 5
    uploaded = store.get(node_file("r-spot", "shepherd", "checkpoint.pt")) is not None
    assert uploaded is (budget > 0)
    assert store.get(node_file("r-spot", "shepherd", "stderr.log")) is not None  # logs: always
