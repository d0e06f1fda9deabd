"""Is the GPU this stack pays for usable, and is it used? The check before the binary starts,
the utilization sampler behind the heartbeat, and the GPU-idle watchdog's policy.

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
from dataclasses import dataclass

from pcp.core.messages import GpuIdle

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


# ------------------------------------------------------------ utilization and the watchdog

#: The query the agent runs (argv, never a shell). The real tool prints one line per GPU,
#: `<utilization %>, <memory used MiB>`, e.g. `87, 10240`; a value the GPU does not report
#: reads `[N/A]` (or `[Not Supported]` on older drivers).
QUERY = ("--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits")
SAMPLE_TIMEOUT_SECONDS = 10.0
_UNKNOWN = ("[N/A]", "[Not Supported]", "N/A")


class SampleError(Exception):
    """nvidia-smi could not report utilization (no devices, no driver, hung, unparsable)."""


@dataclass(frozen=True)
class GpuSample:
    index: int
    utilization_percent: float | None  # None: the GPU does not report it ([N/A])
    memory_used_mib: float | None

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "utilization_percent": self.utilization_percent,
                "memory_used_mib": self.memory_used_mib}


def _value(field: str, line: str) -> float | None:
    text = field.strip()
    if text in _UNKNOWN:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SampleError(f"unexpected nvidia-smi output line {line!r}") from None
    if value != value or value < 0:
        raise SampleError(f"unexpected nvidia-smi output line {line!r}")
    return value


def parse_query(stdout: str) -> list[GpuSample]:
    """The output of `nvidia-smi QUERY`, one sample per GPU; SampleError when it is not that."""
    samples: list[GpuSample] = []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 2:
            raise SampleError(f"unexpected nvidia-smi output line {line[:200]!r}")
        samples.append(GpuSample(len(samples), _value(fields[0], line[:200]),
                                 _value(fields[1], line[:200])))
    if not samples:
        raise SampleError("nvidia-smi printed no GPU")
    return samples


def sample(command: str = NVIDIA_SMI,
           timeout: float = SAMPLE_TIMEOUT_SECONDS) -> list[GpuSample]:
    """Every GPU's utilization and memory now. SampleError says why not, in plain words."""
    exe = shutil.which(command)
    if exe is None:
        raise SampleError(f"{command} is not installed")
    try:
        done = subprocess.run([exe, *QUERY], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise SampleError(f"{command} did not answer within {timeout:g} s") from None
    except OSError as e:
        raise SampleError(f"{command} could not be run: {e}") from None
    if done.returncode != 0:
        said = " ".join((done.stdout + " " + done.stderr).split())[:300]
        raise SampleError(f"{command} exited with code {done.returncode}: "
                          f"{said or 'no output'}")
    return parse_query(done.stdout)


class IdleWatch:
    """The GPU-idle policy over a node's samples (pure: times are passed in, in seconds).

    The node is idle at a sample when every GPU reports a utilization below the threshold.
    A sample that failed or holds an unknown value ([N/A]) is not idle: the watchdog never
    ends a node on data it does not have. Idle time counts from the later of the first idle
    sample of the current streak and the end of the grace (`after_minutes` after `started`);
    `minute_seconds` is how long a policy minute lasts (60; shorter in the local replica).
    """

    def __init__(self, policy: GpuIdle, started: float, minute_seconds: float = 60.0) -> None:
        self.policy = policy
        self.minute_seconds = minute_seconds
        self.grace_ends = started + policy.after_minutes * minute_seconds
        self.window = policy.minutes * minute_seconds
        self.idle_since: float | None = None

    @staticmethod
    def idle(samples: list[GpuSample] | None, below: float) -> bool:
        return bool(samples) and all(
            s.utilization_percent is not None and s.utilization_percent < below
            for s in samples or ())

    def observe(self, samples: list[GpuSample] | None, now: float) -> str | None:
        """Why the policy is broken at `now`, or None. `samples` None: the sample failed."""
        if not self.idle(samples, self.policy.below_percent):
            self.idle_since = None
            return None
        if self.idle_since is None:
            self.idle_since = now
        since = max(self.idle_since, self.grace_ends)
        if now >= self.grace_ends and now - since >= self.window:
            return (f"every GPU stayed below {self.policy.below_percent:g}% utilization for "
                    f"{self.policy.minutes:g} min (gpu_idle policy {self.policy.text})")
        return None
