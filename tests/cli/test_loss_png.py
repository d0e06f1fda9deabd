"""`pcp results` draws the run's loss curve as a PNG next to its files (issue 16, item 9)."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from pcp.cli.plot import LINE, loss_png

pytestmark = pytest.mark.cli


def decode(data: bytes) -> tuple[int, int, list[bytes], dict[str, str]]:
    """A small PNG reader for 8-bit RGB, filter 0 (what a viewer would do, checked)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (size,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + size]
        (crc,) = struct.unpack(">I", data[pos + 8 + size:pos + 12 + size])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + size
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    assert all(row[0] == 0 for row in rows)
    text = dict(body.decode("latin-1").split("\0", 1) for kind, body in chunks
                if kind == b"tEXt")
    return width, height, [row[1:] for row in rows], text


def curve_rows(width: int, rows: list[bytes]) -> dict[int, float]:
    """x -> mean y of the curve's pixels in that column."""
    found: dict[int, list[int]] = {}
    for y, row in enumerate(rows):
        for x in range(width):
            if tuple(row[3 * x:3 * x + 3]) == LINE:
                found.setdefault(x, []).append(y)
    return {x: sum(ys) / len(ys) for x, ys in found.items()}


def test_the_png_is_valid_and_follows_the_curve() -> None:
    losses = [1.0 / i for i in range(1, 101)]
    width, height, rows, text = decode(loss_png(losses, width=320, height=160))
    assert (width, height) == (320, 160)
    assert text["Title"] == "loss" and "first 1, last 0.01" in text["Description"]
    ys = curve_rows(width, rows)
    assert len(ys) > width * 0.8  # the line crosses nearly the whole plot
    xs = sorted(ys)
    left, right = ys[xs[0]], ys[xs[-1]]
    assert left < height * 0.2 and right > height * 0.7  # high loss at the top, low at the bottom
    assert all(ys[a] <= ys[b] + 2 for a, b in zip(xs, xs[1:], strict=False))  # always falling
    # a rising curve is drawn the other way up
    rising = curve_rows(width, decode(loss_png(losses[::-1], width=320, height=160))[2])
    assert rising[min(rising)] > rising[max(rising)]


def test_a_curve_needs_two_points() -> None:
    with pytest.raises(ValueError):
        loss_png([0.5])


def test_results_write_the_loss_curve_next_to_the_runs_files(stack, invoke, tmp_path) -> None:
    stack.start("r-png")
    stack.finish("r-png", {})
    stack.store.put("runs/r-png/shepherd/stdout.log", b"".join(
        f"[shepherd] step {i}\npcp-progress step={i} loss={2.0 / i:.4f}\n".encode()
        for i in range(1, 41)))
    result = invoke(["results", "r-png", "--dest", str(tmp_path), "--json"], obj=stack.context)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    png = Path(tmp_path, "r-png", "loss-curve.png")
    assert str(png) in [f["path"] for f in out["files"]]
    width, height, rows, text = decode(png.read_bytes())
    assert "40 reports; first 2, last 0.05" in text["Description"]
    assert len(curve_rows(width, rows)) > width * 0.8


def test_no_curve_without_progress_lines(stack, invoke, tmp_path) -> None:
    stack.start("r-nopng")
    stack.finish("r-nopng", {})
    result = invoke(["results", "r-nopng", "--dest", str(tmp_path)], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r-nopng" / "summary.json").exists()
    assert not (tmp_path / "r-nopng" / "loss-curve.png").exists()
