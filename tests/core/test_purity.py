"""The core is pure: standard library and pcp.core only, and it never reads a clock."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core
CORE = Path(__file__).resolve().parents[2] / "pcp" / "core"
CLOCK_CALLS = {"now", "utcnow", "today", "time", "monotonic", "perf_counter", "time_ns",
               "monotonic_ns", "localtime", "gmtime"}


def modules() -> list[Path]:
    found = sorted(CORE.glob("*.py"))
    assert len(found) >= 8, "pcp/core went missing"
    return found


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_core_imports_only_stdlib_and_core(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: use absolute imports"
            names = [node.module or ""]
        for name in names:
            top = name.split(".")[0]
            ok = top in sys.stdlib_module_names or name == "pcp.core" or \
                name.startswith("pcp.core.") or top == "__future__"
            assert ok, f"{path.name} imports {name}: the core may use only stdlib and pcp.core"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
def test_core_never_reads_the_clock(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in CLOCK_CALLS:
            pytest.fail(f"{path.name}:{node.lineno} reads the clock via .{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module == "time":
            pytest.fail(f"{path.name}:{node.lineno} imports from time")


def test_the_checker_catches_a_clock_read(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from datetime import datetime\nx = datetime.now()\n")
    tree = ast.parse(bad.read_text())
    assert any(isinstance(n, ast.Attribute) and n.attr in CLOCK_CALLS for n in ast.walk(tree))
