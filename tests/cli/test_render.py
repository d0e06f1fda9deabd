"""The live display (terminal), the follow loop's edges, and markup safety."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from pcp.cli.render import duration, progress_line, progress_table
from pcp.cli.views import NotAccepted, WaitTimeout, find_run, follow
from pcp.core.names import summary_doc

pytestmark = pytest.mark.cli


def test_live_table_on_a_terminal(stack) -> None:
    stack.start("r-a")
    stack.start("r-b")
    stack.marker("r-a", "worker-0", "booted", stack.t0)
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, width=100, color_system=None)
    terminal.print(progress_table(find_run(stack.store, "r-a"), "r-a", 75))
    text = out.getvalue()
    for piece in ("r-a", "1m15s", "starting", "2026-11-29 18:00:00Z", "worker-0", "booted",
                  "shepherd", "pending"):
        assert piece in text
    out.truncate(0)
    terminal.print(progress_table(find_run(stack.store, "r-b"), "r-b", 3))
    assert "position 1" in out.getvalue() and "queued" in out.getvalue()
    terminal.print(progress_table(None, "r-c", 0))
    assert "waiting for the control plane" in out.getvalue()


def test_progress_line_changes_only_with_the_state(stack) -> None:
    stack.start("r-a")
    view = find_run(stack.store, "r-a")
    assert progress_line(view, "r-a", 1) == progress_line(view, "r-a", 99)
    assert "shepherd=pending worker-0=pending" in progress_line(view, "r-a", 1)


def test_duration_format() -> None:
    assert [duration(s) for s in (None, 0, 59.6, 61, 3600, 3725)] == [
        "-", "0s", "1m00s", "1m01s", "1h00m00s", "1h02m05s"]


def test_follow_waits_for_the_summary_a_moment(stack) -> None:
    stack.start("r-s")
    stack.finish("r-s", {})
    summary = stack.store.get(summary_doc("r-s"))
    stack.store.delete(summary_doc("r-s"))  # ended in the stack document, not archived yet
    clock = [0.0]
    seen = []

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 3:
            stack.store.put(summary_doc("r-s"), summary.data)

    view = follow(stack.store, "r-s", on_view=seen.append, sleep=sleep,
                  monotonic=lambda: clock[0], poll=1, timeout=None)
    assert view.summary is not None and clock[0] == 3 and len(seen) == 4
    # Without a summary ever, it gives up after `settle` and returns what it has.
    stack.store.delete(summary_doc("r-s"))
    clock[0] = 0.0
    view = follow(stack.store, "r-s", on_view=lambda v: None, sleep=lambda s: clock.__setitem__(
        0, clock[0] + s), monotonic=lambda: clock[0], poll=1, timeout=None, settle=5)
    assert view.summary is None and view.final and clock[0] == 5


def test_follow_timeout(stack) -> None:
    stack.start("r-slow")
    clock = [0.0]
    with pytest.raises(WaitTimeout, match="after 2 s"):
        follow(stack.store, "r-slow", on_view=lambda v: None,
               sleep=lambda s: clock.__setitem__(0, clock[0] + s),
               monotonic=lambda: clock[0], poll=1, timeout=2)


def test_follow_gives_up_on_a_request_no_function_accepts(stack) -> None:
    clock = [0.0]
    with pytest.raises(NotAccepted, match="within 120 s.*pcp doctor"):
        follow(stack.store, "r-never", on_view=lambda v: None,
               sleep=lambda s: clock.__setitem__(0, clock[0] + s),
               monotonic=lambda: clock[0], poll=5, timeout=None)


def test_markup_in_user_strings_is_printed_as_written(stack, invoke) -> None:
    stack.start("r-m", requested_by="[red]mallory[/red]")
    stack.store.put("runs/r-m/shepherd/metrics.json", json.dumps({"[b]k": "[i]v"}).encode())
    stack.finish("r-m", {"worker-0": 1}, logs=False)
    out = invoke(["status", "r-m"], obj=stack.context).stdout
    assert "[red]mallory[/red]" in out and "[b]k" in out and "[i]v" in out
