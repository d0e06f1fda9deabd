"""When each stretch of a node's stdout.log and stderr.log was written: `logtimes.txt`.

The binary writes straight into the two files (no pipe through the agent, so its output
never depends on the agent keeping up), which leaves no time on its lines. The agent's loop
(ten times a second while the binary runs) looks at both files' sizes and, when either grew,
appends one line to `logtimes.txt` beside them, at most every `every` seconds:

    2026-12-01T20:56:57.123Z stdout=1234 stderr=56

meaning: by that time, stdout.log held 1234 bytes and stderr.log 56. A line of output was
written between the index line before the first that covers its end and that one, so a
reader (`pcp logs`) can merge the two streams, and several nodes, in time order. The logs
themselves stay exactly what the binary wrote. The index is uploaded with the logs, as
`runs/<run_id>/<node>/logtimes.txt`.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

from pcp.core.timefmt import iso


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class LogTimes:
    def __init__(self, stdout: Path, stderr: Path, index: Path, every: float = 0.2) -> None:
        self.stdout, self.stderr, self.index = stdout, stderr, index
        self.every = every
        self.last: tuple[int, int] = (0, 0)
        self.last_at = float("-inf")

    def observe(self, force: bool = False) -> bool:
        """Record the files' sizes now if they grew (and `every` has passed, or `force`)."""
        sizes = (_size(self.stdout), _size(self.stderr))
        if sizes == self.last:
            return False
        now = time.monotonic()
        if not force and now - self.last_at < self.every:
            return False
        line = f"{iso(datetime.now(UTC))} stdout={sizes[0]} stderr={sizes[1]}\n"
        try:
            with open(self.index, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError:
            return False  # the times are a convenience; the logs themselves go on
        self.last, self.last_at = sizes, now
        return True
