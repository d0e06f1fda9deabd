"""The import rules of docs/architecture.md: each package imports only what the place it runs has.

The table is the one in docs/architecture.md ("Where each part runs"); a test below checks that
the two agree, so neither can drift from the other.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.core
REPO = Path(__file__).resolve().parents[2]

#: package (a directory or a module, relative to the repo) -> the pcp packages it may import.
#: Third-party imports are checked separately (THIRD_PARTY).
RULES: dict[str, tuple[str, ...]] = {
    "pcp/core": ("pcp.core",),
    "pcp/adapters": ("pcp.core", "pcp.logs"),
    "pcp/service.py": ("pcp.core", "pcp.progress"),
    "pcp/progress.py": ("pcp.core",),
    "pcp/settings.py": ("pcp.core",),
    "pcp/logs.py": (),
    "pcp/edge": ("pcp.core", "pcp.adapters", "pcp.service", "pcp.settings", "pcp.logs",
                 "pcp.edge"),
    "functions": ("pcp.core", "pcp.edge", "pcp.settings"),
    "pcp/agent": ("pcp", "pcp.core", "pcp.adapters.gcs_store", "pcp.logs", "pcp.agent"),
    "pcp/cli": ("pcp", "pcp.core", "pcp.adapters", "pcp.progress", "pcp.cli", "pcp_dev.local"),
    "pcp_dev": ("pcp", "pcp_dev"),
}

#: Third-party packages a part may import (the rest of the standard library is always allowed).
THIRD_PARTY: dict[str, frozenset[str]] = {
    "pcp/core": frozenset(),
    "pcp/service.py": frozenset(),
    "pcp/progress.py": frozenset(),
    "pcp/settings.py": frozenset(),
    "pcp/logs.py": frozenset(),
    "pcp/adapters": frozenset({"google", "requests"}),
    # the framework's own request decoding, to acknowledge what it cannot decode (envelope.py)
    "pcp/edge": frozenset({"google", "functions_framework", "flask", "cloudevents"}),
    "functions": frozenset({"functions_framework"}),
    "pcp/agent": frozenset({"google"}),
}
#: Files that never run in their part's process: the agent starts them under the trainer's
#: interpreter, so they import the standard library, these packages, and nothing of pcp.
SEPARATE_PROCESS: dict[str, frozenset[str]] = {
    "pcp/agent/rendezvous.py": frozenset({"torch"}),
}


def imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            found.append((node.lineno, node.module or ""))
    return found


def files(part: str) -> list[Path]:
    root = REPO / part
    found = sorted(root.rglob("*.py")) if root.is_dir() else [root]
    assert found and all(f.is_file() for f in found), f"{part} went missing"
    return found


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(part: str) -> list[str]:
    out = []
    for path in files(part):
        for line, name in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            rel = f"{path.relative_to(REPO)}:{line}"
            alone = SEPARATE_PROCESS.get(str(path.relative_to(REPO)))
            if alone is not None:
                if top not in alone:
                    out.append(f"{rel} imports {name}, but runs under the trainer's interpreter")
                continue
            if top in ("pcp", "pcp_dev"):
                if not allowed(name, RULES[part]):
                    out.append(f"{rel} imports {name}")
            elif part in THIRD_PARTY and top not in THIRD_PARTY[part]:
                out.append(f"{rel} imports third-party {name}")
    return out


@pytest.mark.parametrize("part", sorted(RULES))
def test_each_part_imports_only_what_runs_where_it_runs(part: str) -> None:
    assert violations(part) == []


def test_the_rules_catch_a_forbidden_import(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "pcp" / "core"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from pcp.service import Service\nimport requests\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert violations("pcp/core") == ["pcp/core/bad.py:1 imports pcp.service",
                                      "pcp/core/bad.py:2 imports third-party requests"]


def test_every_python_package_has_a_rule() -> None:
    parts = {p.parent.relative_to(REPO).as_posix() for p in (REPO / "pcp").glob("*/__init__.py")}
    parts |= {p.relative_to(REPO).as_posix() for p in (REPO / "pcp").glob("*.py")
              if p.name != "__init__.py"}
    assert parts <= set(RULES), f"add a rule for {sorted(parts - set(RULES))}"


def test_architecture_doc_lists_every_part() -> None:
    doc = (REPO / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `([a-z_/.]+?)/?` \|", doc, flags=re.M))
    assert set(RULES) <= listed, f"docs/architecture.md lacks {sorted(set(RULES) - listed)}"
