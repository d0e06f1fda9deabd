"""The torchrun launcher: a stock torchrun script on the workers, its rendezvous on the shepherd.

A run whose binary is `torchrun:<target>` (docs/agent.md, "The torchrun launcher") runs no
contract binary. Each worker runs

    PYTHON -m torch.distributed.run --nnodes=N --node-rank=R --nproc-per-node=G
        --rdzv-backend=c10d --rdzv-endpoint=HEAD:PORT --rdzv-id=RUN-aATTEMPT
        --rdzv-conf=is_host=false --max-restarts=0 TARGET... TRAINING_ARGS...

with N the workers, R this worker's index, G its GPUs (at least 1). The shepherd is no rank:
it runs `PYTHON pcp/agent/rendezvous.py --port=PORT`, the c10d store the workers' torchrun
agents meet at (`is_host=false`: none of them tries to host it), and stops it once every
worker wrote a successful `done`. torchrun then gives its processes RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR and the rest; its node of group rank 0 hosts the process group's own
store inside the subnet. PYTHON is the interpreter that has torch: the agent's own for a
script or module path, else `python3` beside the realised program (a Nix Python environment).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pcp.agent.binary import BinaryError, Plan
from pcp.core.messages import Assignment

#: The rendezvous store the shepherd hosts: standard library and torch only, so that it runs
#: under whatever interpreter has torch.
RENDEZVOUS_SCRIPT = Path(__file__).with_name("rendezvous.py")
MODULE = "torch.distributed.run"
PYTHONS = ("python3", "python")


def interpreter(p: Plan, prefix: list[str]) -> tuple[str, list[str]]:
    """The Python that runs torchrun (and the store) and torchrun's target arguments.

    `prefix` is what the realiser made of the plan: `[python, script]`, `[python, -m, mod]`
    or `[program]`."""
    if p.kind == "python":
        return prefix[0], prefix[1:]
    program = Path(prefix[0])
    if p.kind == "path":
        return sys.executable, ["--no-python", str(program)]
    for name in PYTHONS:  # a Nix Python environment (python3.withPackages) links it beside
        candidate = program.parent / name
        if candidate.is_file():
            return str(candidate), ["--no-python", str(program)]
    raise BinaryError(f"torchrun: {program.parent} has no {' or '.join(PYTHONS)} beside "
                      f"{program.name}: build the output as a Python environment with torch "
                      "(python3.withPackages) that holds the program")


def nproc(gpus: int) -> int:
    """Processes per worker: one per GPU, at least one (a CPU worker runs one)."""
    return max(gpus, 1)


def endpoint(a: Assignment) -> str:
    host = f"[{a.head_host}]" if ":" in a.head_host else a.head_host
    return f"{host}:{a.port}"


def worker_argv(python: str, target: list[str], a: Assignment, gpus: int) -> list[str]:
    """A worker's torchrun command line (never through a shell)."""
    return [python, "-m", MODULE,
            f"--nnodes={a.num_nodes - 1}", f"--nproc-per-node={nproc(gpus)}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint(a)}",
            f"--rdzv-id={a.run_id}-a{a.attempt}", "--rdzv-conf=is_host=false",
            "--max-restarts=0", *target, *a.args]


def store_argv(python: str, a: Assignment) -> list[str]:
    """The shepherd's command line: the c10d rendezvous store on the run's port."""
    return [python, str(RENDEZVOUS_SCRIPT), f"--port={a.port}"]


def argv(p: Plan, prefix: list[str], a: Assignment, gpus: int) -> list[str]:
    python, target = interpreter(p, prefix)
    if a.role == "shepherd":
        return store_argv(python, a)
    return worker_argv(python, target, a, gpus)
