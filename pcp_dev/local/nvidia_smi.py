"""A stand-in `nvidia-smi` for machines without an NVIDIA GPU (the local replica, the tests).

It answers the two calls the agent makes, as the driver's tool prints them:

- `nvidia-smi -L`: `GPU <i>: Tesla T4 (UUID: GPU-...)`, one line per GPU;
- `nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits`:
  `<utilization>, <memory MiB>` per GPU, e.g. `0, 0` or `87, 10240`; a value the GPU does not
  report prints `[N/A]`.

What it reports lives in a state directory, re-read at every call, so a test or the replica
changes a node's GPUs while it runs (`write_state`). Modes other than `ok` print the real
failures: `no-devices` ("No devices were found", exit 6), `no-driver` (the driver's message,
exit 9). Any other argument list exits 2, as the real tool does for arguments it cannot
combine. `install(dir, state)` writes the executable: a POSIX shell script (no interpreter
start-up per sample, so an agent may sample it every second).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")
NO_DEVICES = "No devices were found"
NO_DRIVER = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
             "Make sure that the latest NVIDIA driver is installed and running.")
UUID = "GPU-8a1f3c2e-5b7d-4e10-9c6a-0f2b3d4e5f6{i}"
MODES = ("ok", "no-devices", "no-driver")


def _field(value: Any) -> str:
    if value is None:
        return "[N/A]"
    return str(int(value)) if float(value).is_integer() else str(value)


def render(gpus: list[tuple[Any, Any]], mode: str = "ok") -> tuple[str, str, int]:
    """(`-L` output, query output, exit code) of the real tool for these GPUs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "no-driver":
        return NO_DRIVER + "\n", NO_DRIVER + "\n", 9
    if mode == "no-devices" or not gpus:
        return NO_DEVICES + "\n", NO_DEVICES + "\n", 6
    listing = "".join(f"GPU {i}: Tesla T4 (UUID: {UUID.format(i=i)})\n"
                      for i in range(len(gpus)))
    query = "".join(f"{_field(u)}, {_field(m)}\n" for u, m in gpus)
    return listing, query, 0


def write_state(state: Path, gpus: list[tuple[Any, Any]], mode: str = "ok") -> None:
    """What the stand-in reading `state` reports from now on (each file replaced whole)."""
    listing, query, code = render(gpus, mode)
    state.mkdir(parents=True, exist_ok=True)
    for name, text in (("list", listing), ("query", query), ("rc", f"{code}\n")):
        tmp = state / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, state / name)


def install(directory: Path, state: Path) -> Path:
    """Write `directory/nvidia-smi` reading `state`; returns the directory (for PATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    if not (state / "rc").exists():
        write_state(state, [(0, 0)])
    q = shlex.quote(str(state))
    exe = directory / "nvidia-smi"
    exe.write_text(
        "#!/bin/sh\n"
        f"state={q}\n"
        'if [ "$#" -eq 1 ] && [ "$1" = -L ]; then out=list\n'
        f'elif [ "$#" -eq 2 ] && [ "$1" = {QUERY[0]} ] && [ "$2" = {QUERY[1]} ]; then out=query\n'
        "else\n"
        "  echo \"Invalid combination of input arguments. Please run 'nvidia-smi -h' for help.\"\n"
        "  exit 2\n"
        "fi\n"
        'cat "$state/$out"\n'
        'read -r code < "$state/rc"\n'
        'exit "$code"\n')
    exe.chmod(0o755)
    return directory
