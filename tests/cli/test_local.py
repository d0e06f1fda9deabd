"""`pcp local up|down` are thin wrappers around `pcp_dev.local.daemon` (imported lazily).

The replica itself (processes, emulators) is tested in tests/e2e; here a stand-in module
records what the wrappers pass and returns what the real one returns.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cli


class FakeReplica(types.ModuleType):
    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__("pcp_dev.local.daemon")
        self.calls: list[tuple[Any, ...]] = []
        self.fail = fail

    def up(self, stack: str, state_dir: Path, **options: Any) -> dict[str, Any]:
        self.calls.append(("up", stack, Path(state_dir), *sorted(options.items())))
        if self.fail is not None:
            raise self.fail
        return {"stack": stack, "project": "pcp-local", "bucket": f"pcp-{stack}-pcp-local",
                "storage_endpoint": "http://127.0.0.1:1", "pubsub_host": "127.0.0.1:2"}

    def down(self, state_dir: Path, stack: str | None = None) -> list[str]:
        self.calls.append(("down", Path(state_dir), stack))
        return ["tiny"]

    def wipe(self, state_dir: Path, stack: str | None = None) -> list[str]:
        self.calls.append(("wipe", Path(state_dir), stack))
        return ["tiny"]


def install(monkeypatch, module: types.ModuleType | None) -> None:
    """Stand in for pcp_dev.local.daemon, also where an earlier import left it on the package
    (`import pcp_dev.local.daemon as r` reads the package attribute)."""
    import pcp_dev.local

    monkeypatch.setitem(sys.modules, "pcp_dev.local.daemon", module)
    if module is None:
        monkeypatch.delattr(pcp_dev.local, "daemon", raising=False)
    else:
        monkeypatch.setattr(pcp_dev.local, "daemon", module, raising=False)


@pytest.fixture
def replica(monkeypatch) -> FakeReplica:
    fake = FakeReplica()
    install(monkeypatch, fake)
    return fake


def test_up_passes_stack_and_state_dir_and_records_the_state(replica, invoke,
                                                             tmp_path) -> None:
    result = invoke(["local", "up", "--stack", "small"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert replica.calls == [("up", "small", tmp_path, ("keep_bucket", True))]
    invoke(["local", "up", "--stack", "tiny", "--no-gcs-limit"],
           env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert replica.calls[-1] == ("up", "tiny", tmp_path, ("keep_bucket", True),
                                 ("no_gcs_limit", True))
    state = json.loads((tmp_path / "small.json").read_text())
    assert state["pubsub_host"] == "127.0.0.1:2"
    assert "pcp run --stack small --wait" in result.stdout
    # The CLI now resolves the stack through that file.
    from pcp.cli.config import resolve_from

    config = resolve_from({"stack": "small"}, {"PCP_LOCAL_DIR": str(tmp_path)})
    assert config.local and config.bucket == "pcp-small-pcp-local"


def test_up_failure_is_one_line(monkeypatch, invoke, tmp_path) -> None:
    fake = FakeReplica(fail=RuntimeError("java not found (the Pub/Sub emulator needs it)\nmore"))
    install(monkeypatch, fake)
    result = invoke(["local", "up"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr == ("pcp: error: the local replica did not start: java not found "
                             "(the Pub/Sub emulator needs it)\n")


def test_up_refuses_an_unknown_stack(replica, invoke) -> None:
    result = invoke(["local", "up", "--stack", "mega"])
    assert result.exit_code == 1 and "unknown stack 'mega'" in result.stderr
    assert replica.calls == []


def test_down(replica, invoke, tmp_path) -> None:
    result = invoke(["local", "down"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 0, result.output
    assert replica.calls == [("down", tmp_path, None)]
    assert "local replica stopped: tiny" in result.stdout
    assert "kept for the next `pcp local up`" in result.stdout
    result = invoke(["local", "down", "--stack", "tiny", "--wipe"],
                    env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert replica.calls[-2:] == [("down", tmp_path, "tiny"), ("wipe", tmp_path, "tiny")]
    assert "wiped the kept bucket and node directories of: tiny" in result.stdout


def test_down_refuses_an_unknown_stack(replica, invoke) -> None:
    result = invoke(["local", "down", "--stack", "mega", "--wipe"])
    assert result.exit_code == 1 and "unknown stack 'mega'" in result.stderr
    assert replica.calls == []


def test_missing_replica_module_is_a_clear_error(monkeypatch, invoke) -> None:
    install(monkeypatch, None)  # as if it were not shipped
    result = invoke(["local", "up"])
    assert result.exit_code == 1
    assert result.stderr.startswith("pcp: error: the local replica is not available")


# ---------------------------------------------------------------- what an install lacks

REPO = Path(__file__).resolve().parents[2]
# `pcp local up` as the console script runs it, with some modules not importable: what a
# `pip install .` without extras (or with only some) leaves.
BLOCKED_RUN = """
import sys
blocked = set(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name in blocked or any(name.startswith(b + ".") for b in blocked):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
sys.argv = ["pcp", "local", "up"]
from pcp.cli import main
main()
"""


def up_without(tmp_path: Path, *modules: str) -> Any:
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("PCP_")}
    env["PCP_LOCAL_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-c", BLOCKED_RUN, ",".join(modules)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_a_bare_install_says_in_one_line_what_the_cli_lacks(tmp_path) -> None:
    result = up_without(tmp_path, "click", "rich", "google")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("pcp: error: this installation of pcp lacks click, rich, "
                                    "google-cloud-storage, google-cloud-pubsub")
    assert "pip install '.[demo]'" in result.stderr
    assert not (tmp_path / "tiny.json").exists()


def test_a_cli_only_install_says_in_one_line_what_the_replica_lacks(tmp_path) -> None:
    result = up_without(tmp_path, "functions_framework", "numpy")
    assert result.returncode == 1, result.stdout
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "the local replica did not start: the local replica needs: the Python packages " \
           "functions-framework, numpy (pip install '.[demo]'" in result.stderr
    assert not (tmp_path / "tiny.json").exists() and not (tmp_path / "logs").exists()


def test_a_replica_module_that_cannot_import_says_which_package(tmp_path) -> None:
    result = up_without(tmp_path, "google.cloud.compute_v1", "googleapiclient")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("pcp: error: the local replica")
    assert "pip install '.[demo]'" in result.stderr
