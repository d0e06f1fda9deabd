"""The agent's own rotated log (the shepherd Mac): a real process writing through LogFile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pcp.agent.log import LogFile

pytestmark = [pytest.mark.agent]

WRITER = """
import sys
from pathlib import Path
from pcp.agent.log import Log, LogFile, use_log_file
use_log_file(LogFile(Path(sys.argv[1]), int(sys.argv[2]), 2))
log = Log(stack="tiny", role="shepherd")
for i in range(int(sys.argv[3])):
    log.info("tick", f"line {i:04d} " + "x" * 80)
print("plain print", flush=True)
raise SystemExit("a traceback-like line on stderr")
"""


def run_writer(path: Path, max_bytes: int, lines: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", WRITER, str(path), str(max_bytes), str(lines)],
                          capture_output=True, text=True, timeout=60, check=False)


def events(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [int(json.loads(line)["reason"][5:9]) for line in path.read_text().splitlines()
            if line.startswith("{")]


def test_the_agent_rotates_its_own_log_and_loses_no_line(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "shepherd.log"
    done = run_writer(log, 2000, 60)
    assert done.returncode == 1
    assert done.stdout == "" and done.stderr == ""  # everything went into the file
    files = sorted(p.name for p in log.parent.iterdir())
    assert files == ["shepherd.log", "shepherd.log.1", "shepherd.log.2"]  # 2 backups kept
    for path in (log.with_name("shepherd.log.1"), log.with_name("shepherd.log.2")):
        assert 2000 <= path.stat().st_size < 2000 + 400  # rotated right after crossing it
    # The newest lines, in order and without a gap, across the files that are kept.
    kept = events(log.with_name("shepherd.log.2")) + events(log.with_name("shepherd.log.1")) \
        + events(log)
    assert kept == list(range(kept[0], 60)) and kept[0] > 0
    tail = log.read_text()
    assert "plain print\n" in tail and "a traceback-like line on stderr" in tail


def test_a_small_log_is_not_rotated(tmp_path: Path) -> None:
    log = tmp_path / "shepherd.log"
    assert run_writer(log, 1_000_000, 5).returncode == 1
    assert events(log) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shepherd.log"]


def test_a_log_file_needs_room() -> None:
    with pytest.raises(ValueError):
        LogFile(Path("x.log"), 0, 1)
    with pytest.raises(ValueError):
        LogFile(Path("x.log"), 10, 0)
