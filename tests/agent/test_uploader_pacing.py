"""The uploader keeps to Cloud Storage's per-object update limit (about one a second).

A periodic write of an object written less than a second ago is left for the next tick; a
final one waits out the gap; different objects never wait for each other. The clock is the
uploader's own (injected), so nothing here sleeps for real.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.adapters.memory import MemoryStore
from pcp.agent.log import Log
from pcp.agent.uploader import MIN_OBJECT_GAP, Uploader
from pcp.core.messages import Assignment

pytestmark = [pytest.mark.agent]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def put(self, name: str, data: bytes, **kw: object) -> int:
        self.names.append(name)
        return super().put(name, data, **kw)  # type: ignore[arg-type]


def uploader() -> tuple[Uploader, CountingStore, Clock]:
    now = datetime.now(UTC)
    a = Assignment(run_id="r1", attempt=1, stack="tiny", node="worker-0", role="worker",
                   rank=1, num_nodes=2, head_host="127.0.0.1", port=9000, binary="/bin/true",
                   args=(), deadline=now + timedelta(minutes=5),
                   boot_deadline=now + timedelta(seconds=30))
    store, clock = CountingStore(), Clock()
    return Uploader(store, a, Log("tiny"), clock=clock, sleep=clock.sleep), store, clock


def test_a_heartbeat_within_the_gap_is_skipped_then_sent() -> None:
    up, store, clock = uploader()
    assert up.heartbeat("running", 1) is True
    clock.now += MIN_OBJECT_GAP / 2
    assert up.heartbeat("running", 1) is False
    assert store.names == ["runs/r1/worker-0/heartbeat.json"]
    clock.now += MIN_OBJECT_GAP / 2
    assert up.heartbeat("running", 1) is True
    assert len(store.names) == 2 and clock.slept == []


def test_a_final_heartbeat_waits_out_the_gap() -> None:
    up, store, clock = uploader()
    up.heartbeat("running", 1)
    clock.now += 0.25
    assert up.heartbeat("exited", None, force=True) is True
    assert clock.slept == [pytest.approx(MIN_OBJECT_GAP - 0.25)]
    assert len(store.names) == 2


def test_a_changed_log_within_the_gap_goes_up_on_a_later_tick(tmp_path: Path) -> None:
    up, store, clock = uploader()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    out.write_text("one\n")
    err.write_text("")
    up.logs(out, err)
    out.write_text("one\ntwo\n")
    clock.now += 0.5
    up.logs(out, err)  # too soon for stdout.log: skipped, still marked as changed
    assert store.names == ["runs/r1/worker-0/stdout.log", "runs/r1/worker-0/stderr.log"]
    clock.now += 0.5
    up.logs(out, err)
    assert store.names[-1] == "runs/r1/worker-0/stdout.log"
    blob = store.get("runs/r1/worker-0/stdout.log")
    assert blob is not None and blob.data == b"one\ntwo\n"


def test_the_final_logs_wait_and_other_objects_do_not(tmp_path: Path) -> None:
    up, store, clock = uploader()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    out.write_text("a\n")
    err.write_text("b\n")
    up.file(out, up.prefix + "stdout.log")
    clock.now += 0.1
    up.logs(out, err, force=True)
    assert clock.slept == [pytest.approx(MIN_OBJECT_GAP - 0.1)]  # stdout.log only
    assert store.names.count(up.prefix + "stdout.log") == 2
    up.marker("done", 0)  # a marker never waits
    assert len(clock.slept) == 1


def test_the_log_index_waits_for_a_log_left_for_the_next_tick(tmp_path: Path) -> None:
    """logtimes.txt must never promise more of a log than the bucket holds."""
    up, store, clock = uploader()
    out, err, times = tmp_path / "stdout", tmp_path / "stderr", tmp_path / "logtimes"
    index = up.prefix + "logtimes.txt"
    times.write_text("t0 stdout=0 stderr=0\n")
    up.file(times, index)
    clock.now += 0.8
    out.write_text("one\n")
    err.write_text("")
    up.logs(out, err)  # the logs, 0.8 s after the index
    clock.now += 0.4  # the index could go again, stdout.log not yet
    out.write_text("one\ntwo\n")
    times.write_text("t0 stdout=0 stderr=0\nt1 stdout=8 stderr=0\n")
    count = len(store.names)
    up.logs(out, err, times=times)
    assert store.names[count:] == []  # stdout.log held back, so its index too
    clock.now += 0.6
    up.logs(out, err, times=times)
    assert store.names[count:] == [up.prefix + "stdout.log", index]
    blob = store.get(index)
    assert blob is not None and b"stdout=8" in blob.data
