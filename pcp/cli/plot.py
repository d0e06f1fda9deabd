"""The loss curve as a PNG, written with the standard library only (zlib and struct).

`pcp results` puts it next to a run's files (`loss-curve.png`), so a person can open the
curve without a plotting library: a white canvas, a frame, faint horizontal grid lines at the
quarters of the loss range, and the loss as a 2-pixel blue line from the first report (left)
to the last (right), highest loss at the top. The numbers travel in the PNG's text chunks
(`Title`, `Description`), which image viewers show as the file's properties.
"""

from __future__ import annotations

import math
import struct
import zlib

WHITE, FRAME, GRID, LINE = (255, 255, 255), (90, 90, 90), (225, 225, 225), (31, 119, 180)
MARGIN = 12


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(width: int, height: int, rows: list[bytearray],
               text: dict[str, str] | None = None) -> bytes:
    """An 8-bit RGB PNG of `rows` (each `width * 3` bytes), filter 0 on every row."""
    raw = b"".join(b"\x00" + bytes(row) for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunks = [_chunk(b"IHDR", header)]
    for key, value in (text or {}).items():
        chunks.append(_chunk(b"tEXt", key.encode("latin-1") + b"\x00"
                             + value.encode("latin-1", errors="replace")))
    chunks += [_chunk(b"IDAT", zlib.compress(raw, 9)), _chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


class Canvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.rows = [bytearray(bytes(WHITE) * width) for _ in range(height)]

    def dot(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            self.rows[y][3 * x:3 * x + 3] = bytes(color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int],
             thick: int = 1) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            x = x0 + round((x1 - x0) * i / steps)
            y = y0 + round((y1 - y0) * i / steps)
            for dx in range(thick):
                for dy in range(thick):
                    self.dot(x + dx, y + dy, color)


def loss_png(losses: list[float], width: int = 640, height: int = 320,
             title: str = "loss") -> bytes:
    """The curve of `losses` (at least two finite values) as PNG bytes."""
    values = [float(v) for v in losses if math.isfinite(v)]
    if len(values) < 2:
        raise ValueError("a loss curve needs at least two finite values")
    c = Canvas(width, height)
    left, top, right, bottom = MARGIN, MARGIN, width - 1 - MARGIN, height - 1 - MARGIN
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    for k in range(1, 4):
        y = top + round((bottom - top) * k / 4)
        c.line(left, y, right, y, GRID)
    for x0, y0, x1, y1 in ((left, top, right, top), (right, top, right, bottom),
                           (right, bottom, left, bottom), (left, bottom, left, top)):
        c.line(x0, y0, x1, y1, FRAME)
    inner_l, inner_r, inner_t, inner_b = left + 3, right - 4, top + 3, bottom - 4
    points = [(inner_l + round((inner_r - inner_l) * i / (len(values) - 1)),
               inner_t + round((inner_b - inner_t) * (hi - v) / span))
              for i, v in enumerate(values)]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        c.line(x0, y0, x1, y1, LINE, thick=2)
    text = {"Title": title,
            "Description": f"{len(values)} reports; first {values[0]:.6g}, last "
                           f"{values[-1]:.6g}, min {lo:.6g}, max {hi:.6g}",
            "Software": "pcp"}
    return encode_png(width, height, c.rows, text)
