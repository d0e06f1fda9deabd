"""A transient failure is HTTP 500, so Pub/Sub or Eventarc redelivers the event.

The state was saved before the failing command ran, so nothing is lost: the level-triggered
sweep finds what the failed command left undone and acts on it.
"""

from __future__ import annotations

import pytest

from tests.functions.conftest import FnStack, MakeStack, log_lines

pytestmark = [pytest.mark.functions, pytest.mark.emulator]


def unavailable(fn: FnStack, kind: str, vm: str) -> None:
    """Make Compute answer 503 to more tries than the fleet makes before it gives up.

    The fleet's own backoff is shortened so the test is quick; its retries still happen.
    """
    fleet = fn.service().fleet
    fleet.backoff_seconds = 0.01
    for _ in range(fleet.attempts + 5):
        fn.compute.faults.fail_next(kind, vm, 503)


def recovered(fn: FnStack, kind: str, vm: str) -> None:
    """Compute is back: drop the failures nobody consumed."""
    while fn.compute.faults.take(kind, vm) is not None:
        pass


def test_compute_unavailable_is_http_500_and_the_sweep_heals(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    vm = fn.vm_names[0]
    unavailable(fn, "start", vm)

    response = fn.start({"run_id": "flaky"})
    assert response.status_code == 500
    assert fn.compute.count("start", vm) >= 1  # the fleet tried (and retried), then gave up
    [line] = [x for x in log_lines(capsys.readouterr().out) if x["event"] == "start"]
    assert line["severity"] == "ERROR" and line["run_id"] == "flaky"
    assert "retry" in line["reason"] and "503" in line["reason"]
    assert fn.running() == []
    assert fn.state()["active"]["status"] == "starting"  # saved before the command failed

    recovered(fn, "start", vm)
    # The redelivered start finds its run still starting and re-issues the start of every
    # node that has not booted (the fleet's start is idempotent): same attempt, no restart.
    assert fn.start({"run_id": "flaky"}).status_code == 200
    assert fn.running() == [vm]
    assert (fn.vm(vm).labels["pcp-run"], fn.vm(vm).labels["pcp-attempt"]) == ("flaky", "1")
    active = fn.state()["active"]
    assert (active["run_id"], active["attempt"], active["status"]) == ("flaky", 1, "starting")
    # The sweep finds nothing left to do for it.
    assert fn.sweep().status_code == 200
    assert fn.running() == [vm] and fn.state()["active"]["attempt"] == 1


def test_failed_stop_at_the_end_is_retried_and_healed(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    vm = fn.vm_names[0]
    assert fn.start({"run_id": "flaky-end"}).status_code == 200
    for node in ("shepherd", "worker-0"):
        assert fn.marker("flaky-end", node, "booted").status_code == 200
    assert fn.marker("flaky-end", "shepherd", "done").status_code == 200
    unavailable(fn, "stop", vm)
    name, generation = fn.write_marker("flaky-end", "worker-0", "done")
    event = fn.marker_event(name, generation, "finalized")

    assert fn.post("on_marker", event).status_code == 500
    assert fn.running() == [vm]  # the stop failed, though the run has ended in the state
    assert fn.state()["recent"][0]["status"] == "succeeded"

    recovered(fn, "stop", vm)
    assert fn.post("on_marker", event).status_code == 200  # redelivered, acknowledged
    assert fn.sweep().status_code == 200  # the VM no run holds is stopped
    assert fn.running() == []
    assert fn.compute.count("stop", vm) >= 1
