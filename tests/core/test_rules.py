"""Rules both fleet adapters and the service share, as pure functions of the core."""

from __future__ import annotations

import pytest

from pcp.core.events import holds_attempt, late_stop_spares
from pcp.core.lifecycle import marker_would_change
from pcp.core.messages import NodeMarker
from pcp.core.names import LABEL_ATTEMPT, LABEL_RUN
from tests.core.helpers import Stack, marker, policy, req

pytestmark = pytest.mark.core


def labels(run: str, attempt: int) -> dict[str, str]:
    return {LABEL_RUN: run, LABEL_ATTEMPT: str(attempt)}


def test_holds_attempt_needs_run_and_attempt() -> None:
    assert holds_attempt(labels("r1", 2), "r1", 2)
    assert not holds_attempt(labels("r1", 1), "r1", 2)
    assert not holds_attempt(labels("r2", 2), "r1", 2)
    assert not holds_attempt({}, "r1", 1)


def test_a_late_stop_spares_only_the_attempt_active_now() -> None:
    asked: list[int] = []

    def current() -> tuple[str, int] | None:
        asked.append(1)
        return ("r2", 1)

    assert late_stop_spares(labels("r2", 1), "r1", current)  # the VM moved on to r2
    assert not late_stop_spares(labels("r2", 2), "r1", current)  # not the active attempt
    assert not late_stop_spares(labels("r1", 1), "r1", current)  # still the stopped run's
    assert len(asked) == 2, "the current attempt is read only for VMs of other runs"
    assert not late_stop_spares(labels("r2", 1), "r1", None)
    assert not late_stop_spares(labels("r2", 1), "r1", lambda: None)


def test_marker_would_change_matches_what_decide_does() -> None:
    s = Stack(policy(workers=1))
    s(req("r1"))
    assert marker_would_change(s.state, "r1", "worker-0", "booted", 1)
    assert marker_would_change(s.state, "r1", "worker-0", "booted", None)
    assert not marker_would_change(s.state, "r1", "worker-0", "booted", 2)  # stale attempt
    assert not marker_would_change(s.state, "r9", "worker-0", "booted", 1)
    s(marker("r1", "worker-0", "booted"))
    assert not marker_would_change(s.state, "r1", "worker-0", "booted", 1)
    assert marker_would_change(s.state, "r1", "worker-0", "done", 1)
    s(marker("r1", "worker-0", "done"))
    assert not marker_would_change(s.state, "r1", "worker-0", "done", 1)


def test_which_markers_could_move_a_run() -> None:
    from pcp.core.lifecycle import markers_could_move_run

    nodes = ("shepherd", "worker-0", "worker-1")

    def m(node: str, kind: str, code: int | None = 0, attempt: int = 1) -> NodeMarker:
        return marker("r1", node, kind, code=code, attempt=attempt)

    booted = (m("shepherd", "booted"), m("worker-0", "booted"))
    # Not every node booted yet: progress only.
    assert not markers_could_move_run(m("worker-0", "booted"), booted[:1], nodes)
    # The last boot could make the run running.
    assert markers_could_move_run(m("worker-1", "booted"), booted, nodes)
    # A done after its own boot, with others still running: progress only.
    all_booted = (*booted, m("worker-1", "booted"))
    assert not markers_could_move_run(m("worker-0", "done"), all_booted, nodes)
    # A done whose boot was never seen may be what completes the boot.
    assert markers_could_move_run(m("worker-1", "done"), booted, nodes)
    # A failure, at once (fail fast); every node done.
    assert markers_could_move_run(m("worker-0", "done", code=3), booted[:1], nodes)
    dones = (m("shepherd", "done"), m("worker-0", "done"))
    assert markers_could_move_run(m("worker-1", "done"), (*all_booted, *dones), nodes)
    # Markers of another attempt count for nothing.
    old = tuple(m(n, "booted", attempt=1) for n in nodes)
    assert not markers_could_move_run(m("worker-0", "booted", attempt=2), old, nodes)
