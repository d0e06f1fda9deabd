"""The torchrun launcher on a node: what a `torchrun:` binary becomes, and how it is stopped.

The command lines are checked exactly (they are the documented contract, docs/agent.md); the
process-group handling runs real processes: a child in a session of its own that ignores
SIGTERM (what torchrun's local ranks look like to the agent), and real torchrun where torch
is installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pcp.agent import torchrun
from pcp.agent.binary import BinaryError, Realiser, plan
from pcp.agent.runner import Runner, descendant_groups
from pcp.core.messages import Assignment
from tests.conftest import require_emulator

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def assignment(node: str = "worker-1", binary: str = "torchrun:/srv/train.py",
               **over: object) -> Assignment:
    base = dict(run_id="r-tr", attempt=2, stack="small", node=node,
                role="shepherd" if node == "shepherd" else "worker",
                rank=0 if node == "shepherd" else int(node.split("-")[1]) + 1, num_nodes=4,
                head_host="mac.example", port=9000, binary=binary, args=("--steps", "3"),
                deadline=T0, boot_deadline=T0, layout="workers-only")
    base.update(over)
    return Assignment(**base)  # type: ignore[arg-type]


def command(a: Assignment, gpus: int = 0) -> list[str]:
    """What the session starts, with the realiser's answer for a script that is not here."""
    p = plan(a.binary, "x86_64-linux")
    assert p.torchrun and p.kind == "python"
    prefix = ([sys.executable, p.target] if p.target.startswith("/")
              else Realiser(host="x86_64-linux").realise(a.binary))
    return torchrun.argv(p, prefix, a, gpus)


def test_a_worker_runs_its_script_under_torchrun() -> None:
    assert command(assignment(), gpus=4) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=3", "--nproc-per-node=4",
        "--rdzv-backend=c10d", "--rdzv-endpoint=mac.example:9000", "--rdzv-id=r-tr-a2",
        "--rdzv-conf=is_host=false", "--max-restarts=0", "/srv/train.py", "--steps", "3"]


def test_a_cpu_worker_runs_one_process_and_a_module_is_run_with_dash_m() -> None:
    argv = command(assignment(binary="torchrun:pkg.train"), gpus=0)
    assert "--nproc-per-node=1" in argv
    assert argv[-5:] == ["--max-restarts=0", "-m", "pkg.train", "--steps", "3"]


def test_an_ipv6_head_is_bracketed() -> None:
    argv = command(assignment(head_host="fd00::2"))
    assert "--rdzv-endpoint=[fd00::2]:9000" in argv


def test_the_shepherd_hosts_the_rendezvous_store_and_runs_no_rank() -> None:
    assert command(assignment("shepherd")) == [
        sys.executable, str(torchrun.RENDEZVOUS_SCRIPT), "--port=9000"]
    assert torchrun.RENDEZVOUS_SCRIPT.is_file()


def test_a_program_runs_with_no_python_under_the_python_beside_it(tmp_path: Path) -> None:
    out = tmp_path / "abc-env"
    (out / "bin").mkdir(parents=True)
    for name in ("python3", "train", "torchrun"):
        (out / "bin" / name).write_text("#!/bin/sh\n")
        (out / "bin" / name).chmod(0o755)
    a = assignment(binary=f"torchrun:{out}/bin/train")
    p = plan(a.binary, "x86_64-linux")
    assert p.torchrun and p.kind == "path"
    # A store output (here: the same layout outside /nix/store) takes bin/python3.
    store_plan = plan("torchrun:/nix/store/abc-env!train", "x86_64-linux")
    assert store_plan.kind == "store" and store_plan.program == "train"
    python, target = torchrun.interpreter(store_plan, [str(out / "bin" / "train")])
    assert python == str(out / "bin" / "python3")
    assert target == ["--no-python", str(out / "bin" / "train")]
    (out / "bin" / "python3").unlink()
    with pytest.raises(BinaryError, match="has no python3 or python beside train"):
        torchrun.interpreter(store_plan, [str(out / "bin" / "train")])
    # An executable outside Nix runs under the agent's own interpreter.
    assert torchrun.interpreter(p, [str(out / "bin" / "train")])[0] == sys.executable


def test_the_agent_refuses_what_the_start_request_would() -> None:
    with pytest.raises(BinaryError, match="must not start with '-'"):
        plan("torchrun:--standalone", "x86_64-linux")
    flake = plan({"x86_64-linux": "torchrun:github:o/r#env!train"}, "x86_64-linux")
    assert flake.kind == "flake" and flake.program == "train" and flake.torchrun


# ---------------------------------------------------------------- stopping the process tree

STUBBORN_CHILD = """
import os, signal, subprocess, sys, time
if sys.argv[1:] == ["stubborn"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"],
    start_new_session=True)
print(child.pid, flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(check: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(("parent", "ended_by"), [("stubborn", "SIGKILL"), ("plain", "SIGTERM")])
def test_the_stop_reaches_a_child_in_a_session_of_its_own(tmp_path: Path, parent: str,
                                                           ended_by: str) -> None:
    """A stubborn parent is SIGKILLed at the end of the grace, with the groups its
    descendants lead; a parent that dies of SIGTERM leaves its child to the reaping."""
    script = tmp_path / "parent.py"
    script.write_text(STUBBORN_CHILD)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    runner = Runner([sys.executable, str(script), parent], dict(os.environ), tmp_path, out,
                    err)
    runner.start()
    assert runner.pid is not None
    wait_until(lambda: out.read_text().strip(), "the child's pid")
    child = int(out.read_text().split()[0])
    assert os.getpgid(child) == child != runner.pid
    assert child in descendant_groups(runner.pid)
    runner.terminate(0.5)
    while runner.poll() is None:
        runner.tick()
        time.sleep(0.05)
    if parent == "plain":  # SIGTERM to the binary's group did not reach the child
        assert alive(child)
    runner.reap_group()
    assert runner.exit().signal == ended_by
    wait_until(lambda: not alive(child), "the child in its own session to be killed", 10)


@pytest.fixture
def torch_installed() -> None:
    if importlib.util.find_spec("torch") is None:
        require_emulator("PyTorch (pip install torch==2.13.0)",
                         ModuleNotFoundError("No module named 'torch'"))


RANK_FAILS = """
import os, sys, time
if os.environ["LOCAL_RANK"] == "1":
    sys.exit(7)
time.sleep(60)
"""


def test_a_failing_local_rank_fails_torchrun_and_its_peers(tmp_path: Path,
                                                           torch_installed: None) -> None:
    """torchrun stops the other local ranks and exits 1: the node's done exit code."""
    script = tmp_path / "train.py"
    script.write_text(RANK_FAILS)
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    argv = [sys.executable, "-m", torchrun.MODULE, "--standalone", "--nproc-per-node=2",
            "--max-restarts=0", str(script)]
    runner = Runner(argv, dict(os.environ), tmp_path, out, err)
    runner.start()
    started = time.monotonic()
    while runner.poll() is None:
        runner.tick()
        assert time.monotonic() - started < 120, "torchrun did not exit"
        time.sleep(0.1)
    runner.reap_group()
    result = runner.exit()
    assert result.exit_code == 1 and result.signal is None
    assert "exitcode  : 7" in err.read_text()


def test_sigterm_stops_every_local_rank(tmp_path: Path, torch_installed: None) -> None:
    script = tmp_path / "train.py"
    script.write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(120)\n")
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    argv = [sys.executable, "-m", torchrun.MODULE, "--standalone", "--nproc-per-node=2",
            "--max-restarts=0", str(script)]
    runner = Runner(argv, dict(os.environ), tmp_path, out, err)
    runner.start()
    wait_until(lambda: len(out.read_text().split()) == 2, "both local ranks", 120)
    ranks = [int(p) for p in out.read_text().split()]
    runner.terminate(5.0)
    while runner.poll() is None:
        runner.tick()
        time.sleep(0.05)
    runner.reap_group()
    assert runner.exit().signal == "SIGTERM"
    for pid in ranks:
        wait_until(lambda pid=pid: not alive(pid), f"local rank pid {pid} to exit", 10)
