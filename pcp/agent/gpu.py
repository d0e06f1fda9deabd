"""Is the GPU this stack pays for usable? Checked by a worker before it starts the binary.

A GPU stack's workers tell the agent how many GPUs they have (instance metadata
`pcp-gpu-count`, written by the Pulumi program). When the boot image has no NVIDIA driver,
or the driver does not answer, the binary would fail minutes later with a CUDA error deep in
its log; the agent fails the node at once instead, in plain words, with exit code
`GPU_UNAVAILABLE` in its done marker. `nvidia-smi -L` is the check: it ships with the driver,
prints one `GPU <i>: <name> (UUID: ...)` line per GPU, and exits non-zero (9 without a
loaded driver) when it cannot talk to the driver.
"""

from __future__ import annotations

import shutil
import subprocess

#: The done marker's exit code for a node whose GPU is missing or not working.
GPU_UNAVAILABLE = 125
NVIDIA_SMI = "nvidia-smi"
TIMEOUT_SECONDS = 60.0


def parse_count(raw: str | None) -> int:
    """The metadata value as a GPU count; unset or empty means none. ValueError otherwise."""
    text = (raw or "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"pcp-gpu-count must be a whole number, got {text!r}")
    return int(text)


def check(expected: int, command: str = NVIDIA_SMI,
          timeout: float = TIMEOUT_SECONDS) -> str | None:
    """None when at least `expected` GPUs answer; otherwise why not, in plain words."""
    if expected <= 0:
        return None
    exe = shutil.which(command)
    if exe is None:
        return (f"this worker should have {expected} GPU(s) but {command} is not installed: "
                "the boot image has no NVIDIA driver (use a GPU image with the driver, or "
                "install it in the startup script)")
    try:
        done = subprocess.run([exe, "-L"], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"{command} -L did not answer within {timeout:g} s: the NVIDIA driver is hung"
    except OSError as e:
        return f"{command} could not be run: {e}"
    said = " ".join((done.stdout + " " + done.stderr).split())[:300]
    if done.returncode != 0:
        return (f"{command} failed with exit code {done.returncode}: the NVIDIA driver is not "
                f"working ({said or 'no output'})")
    found = sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))
    if found < expected:
        return (f"{command} sees {found} GPU(s), this worker should have {expected} "
                f"({said or 'no output'})")
    return None
