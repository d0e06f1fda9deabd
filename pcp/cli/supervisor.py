"""Is the local replica's supervisor alive? Read from its state file, checked by process.

`pcp local up` runs the replica under one supervisor process, which starts the emulators,
the function servers and the agents, restarts what crashes and renews a heartbeat in the
state file every second. Its emulators can outlive it (SIGKILL leaves them running), so a
port that answers proves nothing: the CLI checks the supervisor itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

#: A supervisor silent this long is taken for hung (it renews its heartbeat every second).
HEARTBEAT_STALE_S = 30.0


def process_start(pid: int) -> str | None:
    """When process `pid` started, as the kernel counts it (Linux: clock ticks since boot,
    /proc/PID/stat field 22; elsewhere `ps -o lstart=`), or None when there is no such
    process (a zombie counts as none). With the pid it names one process for good: a number
    the system gave to a new process since has another start."""
    if Path("/proc").is_dir():
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        return fields[19]
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-o", "lstart=", "-p", str(pid)],
                             capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    state, _, start = out.strip().partition(" ")
    return None if not state or state.startswith("Z") else start.strip()


def restart_hint(stack: str) -> str:
    return (f"run `pcp local down --stack {stack}` (it stops every process the replica "
            f"started), then `pcp local up --stack {stack}`")


def supervisor_problem(stack: str, supervisor: Mapping[str, Any], now: datetime) -> str | None:
    """Why the replica described by `supervisor` (pid, pid_start, heartbeat_at) is down, or
    None when its supervisor runs and beats (or the state file predates the record)."""
    pid = supervisor.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    start = process_start(pid)
    recorded = supervisor.get("pid_start")
    if start is None or (recorded is not None and start != str(recorded)):
        return (f"the local replica of stack {stack} is down: its supervisor (pid {pid}) is "
                f"not running, so nothing starts, heals or ends runs: {restart_hint(stack)}")
    beat = supervisor.get("heartbeat_at")
    if isinstance(beat, str):
        try:
            age = (now - datetime.fromisoformat(beat)).total_seconds()
        except (ValueError, TypeError):
            return None
        if age > HEARTBEAT_STALE_S:
            return (f"the local replica of stack {stack} is not answering: its supervisor "
                    f"(pid {pid}) last renewed its heartbeat {age:.0f} s ago: "
                    f"{restart_hint(stack)}")
    return None


def supervisor_health(supervisor: Mapping[str, Any], now: datetime) -> str:
    """For `pcp doctor`: the supervisor that was found running."""
    beat = supervisor.get("heartbeat_at")
    try:
        age = f", heartbeat {(now - datetime.fromisoformat(beat)).total_seconds():.0f} s ago" \
            if isinstance(beat, str) else ""
    except (ValueError, TypeError):
        age = ""
    return f"supervisor pid {supervisor.get('pid')} running{age}"
