"""The agent's logtimes.txt: when each stretch of stdout.log and stderr.log was written."""

from __future__ import annotations

from pcp.agent.logtimes import LogTimes
from pcp.cli.logtimes import parse_index


def test_the_index_records_each_growth_of_either_log(tmp_path) -> None:
    out, err, index = tmp_path / "stdout.log", tmp_path / "stderr.log", tmp_path / "t.txt"
    times = LogTimes(out, err, index, every=0.0)
    assert not times.observe()  # nothing written yet: no line
    out.write_bytes(b"one\n")
    assert times.observe()
    assert not times.observe()  # unchanged
    with open(err, "ab") as f:
        f.write(b"oops\n")
    assert times.observe()
    entries = parse_index(index.read_bytes())
    assert [sizes for _, sizes in entries] == [{"stdout": 4, "stderr": 0},
                                              {"stdout": 4, "stderr": 5}]
    assert entries[0][0] <= entries[1][0]


def test_the_index_is_rate_limited_unless_forced(tmp_path) -> None:
    out, err, index = tmp_path / "stdout.log", tmp_path / "stderr.log", tmp_path / "t.txt"
    times = LogTimes(out, err, index, every=3600.0)
    out.write_bytes(b"a\n")
    assert times.observe()
    out.write_bytes(b"a\nb\n")
    assert not times.observe()  # too soon
    assert times.observe(force=True)
    assert len(index.read_text().splitlines()) == 2
