"""The node's dead-man's switch: when a worker VM powers itself off, and how.

Independent of the control plane (a safety layer of its own, docs/reliability.md): even if
every function fails, a worker never idles past its run. The decision is a pure function of
the assignment, the run record and the time; the agent re-evaluates it every poll until it
says "now".
"""

from __future__ import annotations

import os
import shlex
import subprocess
from datetime import datetime

from pcp.agent.log import Log
from pcp.agent.record import RunView
from pcp.core.messages import Assignment, dump
from pcp.core.names import DEAD_MAN_CONSOLE_TAG, power_off_doc
from pcp.core.ports import BlobStore
from pcp.core.timefmt import iso

DEFAULT_POWEROFF = "shutdown -h now"

#: The worker images run no logging agent, so the agent's stdout (the journal) never reaches
#: Cloud Logging. The power-off line is also written to the serial console: with the instance
#: metadata `serial-port-logging-enable=TRUE` (the Pulumi program sets it) Compute Engine sends
#: serial port 1 to Cloud Logging as the log `serialconsole.googleapis.com/serial_port_1_output`
#: of the `gce_instance`, one `textPayload` per line, where the metric `deadman-power-offs`
#: counts the lines starting with CONSOLE_TAG (infra/pcp_infra/monitoring.py).
DEFAULT_CONSOLE = "/dev/console"
CONSOLE_TAG = DEAD_MAN_CONSOLE_TAG


def power_off_at(a: Assignment, record: RunView | None, now: datetime) -> tuple[datetime, str]:
    """When to power off after this node's part of the run is over, and why."""
    if now >= a.deadline:
        return now, "the run's deadline has passed"
    if not a.keep_vm_alive:
        return now, "this node is done and the run does not keep VMs alive"
    if record is not None:
        over = record.over_for(a.attempt)
        if over is not None and record.attempt > a.attempt:
            return now, over
        if over is not None:
            if record.keep_alive_until is None:
                return now, f"{over} without a keep-alive lease"
            until = min(record.keep_alive_until, a.deadline)
            return until, f"keep-alive lease until {until.isoformat()}"
    return a.deadline, "keep_vm_alive: waiting for the run to end, at most until its deadline"


def record_power_off(store: BlobStore, a: Assignment, reason: str, now: datetime,
                     log: Log) -> None:
    """Write runs/<run>/<node>/power_off.json before powering off, so `pcp events` shows the
    dead-man stop without Cloud Logging. Best effort: a failed write never keeps the VM up."""
    try:
        store.put(power_off_doc(a.run_id, a.node),
                  dump({"run_id": a.run_id, "node": a.node, "attempt": a.attempt,
                        "at": iso(now), "reason": reason, "kind": "dead_man_power_off"}))
    except Exception as e:  # noqa: BLE001 - the switch must fire whatever storage does
        log.warning("power_off_unrecorded", f"{type(e).__name__}: {e}")


def parse_command(text: str) -> list[str]:
    """The power-off command as an argument list; empty means 'just exit' (local replica)."""
    return shlex.split(text)


def console_line(log: Log, reason: str) -> str:
    """The serial-console line of a power-off: the tag, then `key=value` fields (the stack
    name, node names and run ids hold no spaces), the reason last, on one line."""
    ctx = log.context
    flat = " ".join(reason.split())
    return (f"{CONSOLE_TAG} stack={log.stack or '-'} node={ctx.get('node', '-')} "
            f"run_id={log.run_id or '-'} attempt={ctx.get('attempt', '-')} reason={flat}\n")


def write_console(path: str, line: str, log: Log) -> bool:
    """Append one line to the console device (no shell, no create). Best effort: a failed
    write never keeps the VM up."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY)
    except OSError as e:
        log.warning("power_off_console_failed", f"{path}: {e}")
        return False
    try:
        os.write(fd, line.encode("utf-8", "backslashreplace"))
    except OSError as e:
        log.warning("power_off_console_failed", f"{path}: {e}")
        return False
    finally:
        os.close(fd)
    return True


def power_off(argv: list[str], reason: str, log: Log, console: str | None = None) -> int:
    """Run the power-off command without a shell. Returns the agent's exit code.

    With a `console` path, the power-off is first written there as `console_line` (so it
    reaches Cloud Logging through the serial port); not when only exiting (empty command)."""
    if not argv:
        log.info("power_off_skipped", f"{reason}; the power-off command is empty: exiting")
        return 0
    log.info("power_off", reason, command=argv)
    if console:
        write_console(console, console_line(log, reason), log)
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.error("power_off_failed", f"{argv[0]}: {e}; the sweeper and the GCE run-duration "
                  "cap still stop this VM")
        return 1
    if done.returncode != 0:
        log.error("power_off_failed", f"{argv[0]} exited with {done.returncode}; the sweeper "
                  "and the GCE run-duration cap still stop this VM")
        return 1
    return 0
