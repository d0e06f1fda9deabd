"""`pcp logs RUN` merges every node's stdout and stderr in the order they were written
(issue 16, item 7), from the logtimes.txt index the agent keeps beside the logs."""

from __future__ import annotations

import pytest

from pcp.cli.logtimes import Line, Merger, in_time_order, parse_index

pytestmark = pytest.mark.cli


def put_logs(stack, run_id: str) -> None:
    """A shepherd and a worker, each writing to both streams at known times."""
    logs = {
        "shepherd/stdout.log": b"s-out 1\ns-out 2\n",
        "shepherd/stderr.log": b"s-err 1\n",
        "worker-0/stdout.log": b"w-out 1\nw-out 2\n",
        "worker-0/stderr.log": b"w-err 1\n",
    }
    index = {
        # shepherd: s-out 1 at :01, s-err 1 at :03, s-out 2 at :05
        "shepherd": b"2026-11-29T12:00:01.000Z stdout=8 stderr=0\n"
                    b"2026-11-29T12:00:03.000Z stdout=8 stderr=8\n"
                    b"2026-11-29T12:00:05.000Z stdout=16 stderr=8\n",
        # worker: w-out 1 at :02, w-err 1 at :04, w-out 2 at :06
        "worker-0": b"2026-11-29T12:00:02.000Z stdout=8 stderr=0\n"
                    b"garbage line\n"
                    b"2026-11-29T12:00:04.000Z stdout=8 stderr=8\n"
                    b"2026-11-29T12:00:06.000Z stdout=16 stderr=8\n",
    }
    for name, data in logs.items():
        stack.store.put(f"runs/{run_id}/{name}", data, content_type="text/plain")
    for node, data in index.items():
        stack.store.put(f"runs/{run_id}/{node}/logtimes.txt", data, content_type="text/plain")


def body(out: str) -> list[str]:
    return [line for line in out.splitlines() if not line.startswith("==> ")]


def test_logs_interleave_every_node_and_stream_by_time(stack, invoke) -> None:
    stack.start("r-mix")
    put_logs(stack, "r-mix")
    result = invoke(["logs", "r-mix"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert body(result.stdout) == ["s-out 1", "w-out 1", "s-err 1", "w-err 1", "s-out 2",
                                   "w-out 2"]
    # a header each time the log changes, as `tail -f` on several files
    assert result.stdout.startswith("==> shepherd/stdout.log <==\ns-out 1\n"
                                    "==> worker-0/stdout.log <==\nw-out 1\n"
                                    "==> shepherd/stderr.log <==\ns-err 1\n")
    stamped = invoke(["logs", "r-mix", "--timestamps"], obj=stack.context).stdout
    assert "12:00:03.000 s-err 1" in stamped and "12:00:06.000 w-out 2" in stamped


def test_logs_pick_one_stream_or_one_node(stack, invoke) -> None:
    stack.start("r-one")
    put_logs(stack, "r-one")
    err = invoke(["logs", "r-one", "--stream", "stderr"], obj=stack.context).stdout
    assert body(err) == ["s-err 1", "w-err 1"]
    worker = invoke(["logs", "r-one", "--node", "worker-0"], obj=stack.context).stdout
    assert body(worker) == ["w-out 1", "w-err 1", "w-out 2"]


def test_logs_without_an_index_keep_each_log_whole() -> None:
    merger = Merger()
    lines = (merger.lines("shepherd/stdout.log", 0, b"a\nb\n", [])
             + merger.lines("worker-0/stdout.log", 0, b"c\n", []))
    assert [x.text for x in in_time_order(lines)] == ["a", "b", "c"]


def test_a_partial_line_waits_for_its_end_and_takes_its_time() -> None:
    index = parse_index(b"2026-11-29T12:00:01Z stdout=3 stderr=0\n"
                        b"2026-11-29T12:00:09Z stdout=9 stderr=0\n")
    merger = Merger()
    first = merger.lines("shepherd/stdout.log", 0, b"ab\ncd", index)
    assert [(x.text, x.at.second) for x in first] == [("ab", 1)]
    second = merger.lines("shepherd/stdout.log", 5, b"ef\n", index)
    assert [(x.text, x.at.second) for x in second] == [("cdef", 9)]
    assert merger.flush() == []
    merger.lines("shepherd/stdout.log", 8, b"tail", index)
    assert merger.flush() == [Line(None, "shepherd/stdout.log", "tail")]


def test_a_log_started_afresh_is_read_from_its_start() -> None:
    merger = Merger()
    merger.lines("worker-0/stdout.log", 0, b"old\npart", [])
    again = merger.lines("worker-0/stdout.log", 0, b"new\n", [])  # a new attempt's log
    assert [x.text for x in again] == ["new"]
