"""A run's logs merged in time order: every node's stdout and stderr, line by line.

Each node's agent keeps `runs/<id>/<node>/logtimes.txt` beside the two logs (pcp/agent/
logtimes.py): lines `<time> stdout=N stderr=M`, by which time each log held that many bytes.
A line of a log gets the time of the first index line that covers its end. Lines the index
does not cover yet (a log uploaded a moment before its index) get the time of the log's
latest index line; logs without any index (older agents) keep their order after one another.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from pcp.core.names import run_prefix
from pcp.core.ports import BlobStore

INDEX = "logtimes.txt"
STREAMS = ("stdout", "stderr")


def parse_index(data: bytes) -> list[tuple[datetime, dict[str, int]]]:
    """`<iso time> stdout=N stderr=M` lines; a line that does not parse is skipped."""
    out = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        parts = line.split()
        if not parts:
            continue
        try:
            at = datetime.fromisoformat(parts[0].replace("Z", "+00:00"))
            sizes = {k: int(v) for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p)}
        except ValueError:
            continue
        if at.tzinfo is None:
            continue
        out.append((at, sizes))
    return out


@dataclass(frozen=True)
class Line:
    at: datetime | None
    log: str  # "<node>/stdout.log"
    text: str


@dataclass
class Merger:
    """Turns new bytes of several logs into complete lines, each with its time."""

    #: Bytes of an unfinished last line, by log.
    partial: dict[str, bytes] = field(default_factory=dict)
    #: Where in each log the partial bytes start.
    offset: dict[str, int] = field(default_factory=dict)

    def lines(self, name: str, start: int, data: bytes,
              index: list[tuple[datetime, dict[str, int]]], final: bool = False) -> list[Line]:
        """The complete lines in `data`, which begins at byte `start` of log `name`
        (`<node>/<stream>.log`); with `final`, an unfinished last line too."""
        if start == 0 or name not in self.offset:
            self.partial[name], self.offset[name] = b"", start
        buf = self.partial[name] + data
        base = self.offset[name]
        stream = name.rsplit("/", 1)[-1].removesuffix(".log")
        times = [(at, sizes.get(stream)) for at, sizes in index]
        latest = next((at for at, size in reversed(times) if size is not None), None)
        out, pos = [], 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            end = base + nl + 1
            at = next((t for t, size in times if size is not None and size >= end), latest)
            out.append(Line(at, name, buf[pos:nl].decode("utf-8", errors="replace")))
            pos = nl + 1
        rest = buf[pos:]
        if final and rest:
            out.append(Line(latest, name, rest.decode("utf-8", errors="replace")))
            rest, pos = b"", len(buf)
        self.partial[name], self.offset[name] = rest, base + pos
        return out


    def flush(self) -> list[Line]:
        """Every log's unfinished last line (at the end of a run)."""
        out = [Line(None, name, rest.decode("utf-8", errors="replace"))
               for name, rest in self.partial.items() if rest]
        for name in self.partial:
            self.offset[name] += len(self.partial[name])
            self.partial[name] = b""
        return out


def in_time_order(lines: list[Line]) -> list[Line]:
    """Sorted by time, stable: same-time lines (and logs without times) keep their order."""
    floor: dict[str, datetime | None] = {}
    keyed = []
    for i, line in enumerate(lines):
        at = line.at if line.at is not None else floor.get(line.log)
        floor[line.log] = at
        keyed.append((at is not None, at.timestamp() if at is not None else 0.0, i, line))
    keyed.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[3] for k in keyed]


def read_index(store: BlobStore, run_id: str, node: str) -> list[tuple[datetime, dict[str, int]]]:
    blob = store.get(f"{run_prefix(run_id)}{node}/{INDEX}")
    return [] if blob is None else parse_index(blob.data)
