"""Every transition says what it did as kinds (NoteKind) with the run each concerns; the
history of a run is written by one function (`Run.moved`), so its entries are always
`from -> to`."""

from __future__ import annotations

import pytest

from pcp.core.lifecycle import NoteKind as K
from pcp.core.messages import StopRequest
from pcp.core.state import Reason
from tests.core.helpers import Stack, marker, policy, req

pytestmark = pytest.mark.core


def test_a_whole_run_in_kinds() -> None:
    s = Stack(policy(workers=1))
    assert s(req("r1")).kinds() == (K.QUEUED, K.RUN_STARTING)
    assert s(marker("r1", "shepherd", "booted")).kinds() == (K.NODE_BOOTED,)
    assert s(marker("r1", "worker-0", "booted")).kinds() == (K.NODE_BOOTED, K.RUN_RUNNING)
    assert s(marker("r1", "shepherd", "done", 2)).kinds() == (K.NODE_EXITED,)
    last = s(marker("r1", "worker-0", "done", 2))
    assert last.kinds() == (K.NODE_EXITED, K.RUN_ENDED)
    assert last.notes[-1].ended is Reason.SUCCEEDED and last.notes[-1].run_id == "r1"
    assert s(marker("r1", "worker-0", "done", 2)).kinds() == (K.MARKER_IGNORED,)


def test_the_reason_is_derived_from_the_notes() -> None:
    s = Stack()
    t = s(req("r1"))
    assert t.reason == "; ".join(n.text for n in t.notes)
    assert s(StopRequest("nope")).reason.startswith("rejected stop")
    assert s(StopRequest("nope")).kinds() == (K.STOP_UNKNOWN,)


def test_a_failure_with_restarts_and_a_queue_in_kinds() -> None:
    s = Stack(policy(workers=1))
    s(req("r1", max_restarts=1))
    s(req("r2"))
    s.boot_all("r1")
    t = s(s.vms(status="TERMINATED"), 3)  # a booted worker's VM is gone: node lost
    assert K.RUN_ENDED in t.kinds() and K.RUN_RESTARTING in t.kinds()
    ended = next(n for n in t.notes if n.kind is K.RUN_ENDED)
    assert ended.ended is Reason.NODE_LOST
    assert t.kinds()[-1] is K.RUN_STARTING  # the restart goes first, ahead of r2
    assert s.state.active is not None and s.state.active.attempt == 2


def test_history_entries_are_from_to_pairs() -> None:
    s = Stack(policy(workers=1))
    s(req("r1"))
    s.boot_all("r1")
    s(StopRequest("r1"), 3)
    run = s.state.unarchived[-1]
    assert [h.change for h in run.history] == ["-> queued", "queued -> starting",
                                               "starting -> running", "running -> ended"]
