"""The replica in the background: `pcp local up` / `down`, its state file, signals, and the
command line (`python -m pcp_dev.local.daemon serve`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from pcp.core.policy import STACK_SIZES
from pcp_dev.local.emulators import (
    EmulatorMissing,
)

if TYPE_CHECKING:
    pass
from pcp_dev.local.processes import _kill, same_process, stop_recorded
from pcp_dev.local.replica import Options, Replica, bucket_dir, check_prerequisites


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the main thread like Ctrl-C does, so cleanup always runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def state_file(state_dir: Path, stack: str) -> Path:
    return Path(state_dir) / f"{stack}.json"


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:  # our own child (up() in the same process) must be reaped, or it lingers as a zombie
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Exited but not reaped by its parent (a supervisor that `up` started in a process that
    # still runs, seen from another process such as `pcp local down`): a zombie is gone.
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].startswith(("Z", "X"))
    except (OSError, ValueError):
        pass
    try:  # no /proc (macOS)
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.startswith("Z")


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


#: How often the supervisor renews its heartbeat (and its process list) in the state file.
HEARTBEAT_S = 1.0


def supervisor_state(replica: Replica) -> dict[str, Any]:
    """The state file: how to reach the replica, its supervisor's pid and start, the
    processes it started, and a heartbeat (the CLI calls a replica whose supervisor is gone
    or silent down, `pcp local down` stops what it started)."""
    return {**replica.info(), "heartbeat_at": datetime.now(UTC).isoformat()}


def serve(options: Options) -> int:
    """Run a replica until SIGTERM or Ctrl-C, with its state file written while it is up."""
    path = state_file(options.state_dir, options.stack)
    with exit_on_signals():
        try:
            with Replica(options) as replica:
                _write_json(path, supervisor_state(replica))
                try:
                    while True:
                        time.sleep(HEARTBEAT_S)
                        replica.heal()
                        _write_json(path, supervisor_state(replica))
                finally:
                    state = _read_state(path)
                    if state is not None and state.get("pid") == os.getpid():
                        path.unlink(missing_ok=True)
        except EmulatorMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            return 0
    return 0


def up(stack: str, state_dir: Path | str, *, timeout: float = 120.0,
       **options: Any) -> dict[str, Any]:
    """Start a replica of `stack` in the background (or find the running one); its state."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_file(state_dir, stack)
    current = _read_state(path)
    if current is not None and isinstance(current.get("pid"), int) and _alive(current["pid"]):
        return current
    if current is not None:  # a supervisor that was killed: stop what it left running
        stop_recorded(current.get("processes"), _token(current))
    path.unlink(missing_ok=True)
    check_prerequisites()  # a clear message here rather than in a background log
    argv = [sys.executable, "-m", "pcp_dev.local.daemon", "serve", "--stack", stack,
            "--state-dir", str(state_dir.resolve())]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, str(value)]
    log_path = state_dir / "logs" / f"replica-{stack}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _read_state(path)
        if state is not None and state.get("pid") == proc.pid:
            return state
        if proc.poll() is not None:
            raise RuntimeError(f"the local replica exited with code {proc.returncode} while "
                               f"starting: {_tail(log_path)}")
        time.sleep(0.2)
    _kill(proc.pid, signal.SIGTERM, group=False)
    raise RuntimeError(f"the local replica did not come up within {timeout:.0f} s; "
                       f"see {log_path}")


def wipe(state_dir: Path | str, stack: str | None = None) -> list[str]:
    """Delete the kept bucket and the nodes' work directories of `stack` (default: every
    stack), so the next `up` starts clean. Returns the stacks wiped."""
    root = Path(state_dir)
    stacks = [stack] if stack is not None else sorted(
        {p.name for sub in ("gcs", "nodes") if (root / sub).is_dir()
         for p in (root / sub).iterdir() if p.is_dir()})
    wiped = []
    for name in stacks:
        dirs = [bucket_dir(root, name), root / "nodes" / name]
        if any(d.exists() for d in dirs):
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
            wiped.append(name)
    return wiped


def down(state_dir: Path | str, stack: str | None = None, timeout: float = 60.0) -> list[str]:
    """Stop the background replica(s) in `state_dir` and everything they started."""
    stopped = []
    for path in sorted(Path(state_dir).glob("*.json")):
        state = _read_state(path)
        if state is None or (stack is not None and state.get("stack") != stack):
            continue
        pid = state.get("pid")
        if not isinstance(pid, int):
            continue
        if _alive(pid) and (state.get("pid_start") is None
                            or same_process(pid, state.get("pid_start"))):
            _kill(pid, signal.SIGTERM, group=False)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _alive(pid):  # the orderly stop did not finish in time
                _kill(pid, signal.SIGKILL, group=False)
        # What a killed supervisor could not stop itself: every process it recorded, with
        # what each started, and anything else carrying its token.
        stop_recorded(state.get("processes"), _token(state))
        path.unlink(missing_ok=True)
        stopped.append(str(state.get("stack")))
    return stopped


def _token(state: dict[str, Any]) -> str | None:
    token = state.get("token")
    return token if isinstance(token, str) and token else None


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return text[-limit:].strip() or "(no output)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcp_dev.local.daemon",
                                description="run the local replica of a pcp stack")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run in the foreground until SIGTERM or Ctrl-C")
    s.add_argument("--stack", default="tiny", choices=sorted(STACK_SIZES))
    s.add_argument("--state-dir", type=Path, default=Path(".pcp-local"))
    s.add_argument("--sweep-interval", type=float, default=Options.sweep_interval)
    s.add_argument("--boot-timeout-minutes", type=float, default=Options.boot_timeout_minutes)
    s.add_argument("--keep-alive-hours", type=float, default=Options.keep_alive_hours)
    s.add_argument("--max-run-hours", type=float, default=Options.max_run_hours)
    s.add_argument("--grace", type=float, default=Options.grace)
    s.add_argument("--compute-time-scale", type=float, default=Options.compute_time_scale,
                   help="fraction of Compute Engine's real boot and stop times (1: real)")
    s.add_argument("--no-gcs-limit", action="store_true",
                   help="lift the one-update-per-second-per-object limit (debugging only)")
    s.add_argument("--keep-bucket", action="store_true",
                   help="keep the bucket in STATE_DIR/gcs/STACK across restarts")
    args = p.parse_args(argv)
    return serve(Options(stack=args.stack, state_dir=args.state_dir,
                         sweep_interval=args.sweep_interval,
                         boot_timeout_minutes=args.boot_timeout_minutes,
                         keep_alive_hours=args.keep_alive_hours,
                         max_run_hours=args.max_run_hours, grace=args.grace,
                         gcs_mutation_interval=None if args.no_gcs_limit else 1.0,
                         compute_time_scale=args.compute_time_scale,
                         keep_bucket=args.keep_bucket))


if __name__ == "__main__":
    sys.exit(main())
