"""Telling a VM that GCE's hard cap stopped from one the control plane stopped, from the
instance resource alone (`lastStartTimestamp`, `lastStopTimestamp`, the armed
`scheduling.maxRunDuration`), on the real `compute_v1.Instance` type."""

from __future__ import annotations

import pytest

from pcp.adapters.compute_fleet import capped_stop_epoch

compute_v1 = pytest.importorskip("google.cloud.compute_v1")

START = "2026-12-01T10:00:00.000-08:00"
START_EPOCH = 1796148000


def instance(status: str, stop: str | None, seconds: int | None) -> object:
    scheduling = compute_v1.Scheduling()
    if seconds is not None:
        scheduling.max_run_duration = compute_v1.Duration(seconds=seconds)
    inst = compute_v1.Instance(name="pcp-tiny-worker-0", status=status, scheduling=scheduling,
                               last_start_timestamp=START)
    if stop is not None:
        inst.last_stop_timestamp = stop
    return inst


def test_a_stop_at_or_after_the_armed_duration_is_the_cap() -> None:
    # Armed for one hour; GCE may act up to 30 s late.
    assert capped_stop_epoch(instance("TERMINATED", "2026-12-01T11:00:20.5-08:00", 3600)) == (
        START_EPOCH + 3620)
    assert capped_stop_epoch(instance("TERMINATED", "2026-12-01T19:00:00Z", 3600)) == (
        START_EPOCH + 3600)


def test_an_earlier_stop_a_running_vm_or_an_unarmed_one_is_not() -> None:
    assert capped_stop_epoch(instance("TERMINATED", "2026-12-01T10:57:30-08:00", 3600)) is None
    assert capped_stop_epoch(instance("RUNNING", "2026-12-01T11:00:20-08:00", 3600)) is None
    assert capped_stop_epoch(instance("TERMINATED", "2026-12-01T11:00:20-08:00", None)) is None
    assert capped_stop_epoch(instance("TERMINATED", None, 3600)) is None
    assert capped_stop_epoch(instance("TERMINATED", "not a time", 3600)) is None
