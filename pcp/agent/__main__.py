"""`python -m pcp.agent worker|shepherd [...]`: parse, assemble adapters, run, exit.

SIGTERM (a VM stop, `launchctl bootout`, `systemctl stop`) and SIGINT only set an event;
the running session forwards the signal to the binary, uploads, writes done and returns.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pcp.agent.config import AgentConfig
from pcp.agent.deadman import DEFAULT_CONSOLE, DEFAULT_POWEROFF, parse_command
from pcp.agent.log import Log, LogFile, use_log_file
from pcp.core.ports import BlobStore

DEFAULT_WORK_DIR = "/opt/pcp/work"
_DEFAULTS = AgentConfig(role="worker", work_dir=Path(DEFAULT_WORK_DIR))
DEFAULT_GRACE = _DEFAULTS.grace
DEFAULT_STOP_UPLOAD = _DEFAULTS.stop_upload_budget
DEFAULT_LOG_MAX_BYTES = _DEFAULTS.log_max_bytes
DEFAULT_LOG_BACKUPS = _DEFAULTS.log_backups


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pcp.agent", allow_abbrev=False,
                                description="pcp node agent (see docs/agent.md)")
    p.add_argument("role", choices=("worker", "shepherd"))
    p.add_argument("--bucket", help="stack bucket (worker default: pcp-bucket metadata; "
                   "otherwise pcp-<stack>-<project>)")
    p.add_argument("--project", help="Google Cloud project (worker default: pcp-project metadata)")
    p.add_argument("--stack", help="stack name (worker default: pcp-stack metadata)")
    p.add_argument("--poweroff-command", default=DEFAULT_POWEROFF, metavar="CMD",
                   help="worker power-off command, split into arguments and run without a "
                   f"shell; empty = just exit (default {DEFAULT_POWEROFF!r})")
    p.add_argument("--console", default=DEFAULT_CONSOLE, metavar="PATH",
                   help="worker: also write the power-off line here, the serial console that "
                   f"Compute Engine sends to Cloud Logging; empty = nowhere (default "
                   f"{DEFAULT_CONSOLE})")
    p.add_argument("--wandb-key-file", type=Path, metavar="FILE",
                   help="read the wandb API key from FILE (default: the stack's Secret "
                   "Manager secret pcp-<stack>-wandb-api-key, for runs that name a wandb "
                   "project)")
    p.add_argument("--work-dir", type=Path, default=Path(DEFAULT_WORK_DIR),
                   help=f"per-run working directories (default {DEFAULT_WORK_DIR})")
    p.add_argument("--once", action="store_true",
                   help="shepherd: exit after one run, with the binary's exit code")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE, metavar="S",
                   help=f"SIGTERM to SIGKILL for the binary (default {DEFAULT_GRACE:g}; "
                   "sized for a Spot VM's 30 s shutdown, docs/agent.md)")
    p.add_argument("--stop-upload-budget", type=float, default=DEFAULT_STOP_UPLOAD, metavar="S",
                   help="after the agent's own SIGTERM, upload outputs for at most this long "
                   f"before writing done (default {DEFAULT_STOP_UPLOAD:g})")
    p.add_argument("--upload-interval", type=float, default=5.0, metavar="S",
                   help="log and heartbeat uploads (default 5)")
    p.add_argument("--poll-interval", type=float, default=5.0, metavar="S",
                   help="run record and metadata polling (default 5)")
    p.add_argument("--output-interval", type=float, default=60.0, metavar="S",
                   help="PCP_OUTPUT_DIR uploads while running; 0 = only at exit (default 60)")
    p.add_argument("--boot-grace", type=float, default=60.0, metavar="S",
                   help="worker: wait this long for an assignment before powering off "
                   "(default 60)")
    p.add_argument("--gpu-interval", type=float, default=_DEFAULTS.gpu_interval, metavar="S",
                   help="nvidia-smi utilization samples for the heartbeat and the gpu_idle "
                   f"watchdog (default {_DEFAULTS.gpu_interval:g})")
    p.add_argument("--gpu-minute-seconds", type=float, default=_DEFAULTS.gpu_minute_seconds,
                   metavar="S", help="how long one minute of a gpu_idle policy lasts (default "
                   "60; shorter only to rehearse the watchdog locally)")
    p.add_argument("--log-file", type=Path, metavar="FILE",
                   help="write the agent's output to FILE and rotate it there (the shepherd "
                   "Mac); default: stdout")
    p.add_argument("--log-max-bytes", type=int, default=DEFAULT_LOG_MAX_BYTES, metavar="N",
                   help=f"rotate --log-file at this size (default {DEFAULT_LOG_MAX_BYTES})")
    p.add_argument("--log-backups", type=int, default=DEFAULT_LOG_BACKUPS, metavar="N",
                   help=f"rotated files kept (default {DEFAULT_LOG_BACKUPS})")
    p.add_argument("--nix-bin-dir", metavar="DIR",
                   help="directory holding nix and nix-store (default: PATH, then the "
                   "multi-user profile)")
    p.add_argument("--socket-ifname", metavar="IFACE",
                   help="set NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for the binary (unless "
                   "already set); 'auto': the default route's interface")
    p.add_argument("--container-engine", metavar="CMD",
                   help="the engine for a run that names an image, with its global options, "
                   "split without a shell (default: docker if installed, else podman)")
    return p


def make_store(bucket: str, project: str | None) -> BlobStore:
    from pcp.adapters.gcs_store import GcsStore  # the client is built on first use

    return GcsStore(bucket, project=project)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("grace", "upload_interval", "poll_interval", "output_interval", "boot_grace",
                 "stop_upload_budget", "gpu_interval"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.gpu_minute_seconds <= 0:
        parser.error("--gpu-minute-seconds must be positive")
    for name in ("log_max_bytes", "log_backups"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    cfg = AgentConfig(
        role=args.role, work_dir=args.work_dir, bucket=args.bucket, project=args.project,
        stack=args.stack, poweroff=tuple(parse_command(args.poweroff_command)), once=args.once,
        console=args.console or None, wandb_key_file=args.wandb_key_file,
        grace=args.grace, upload_interval=args.upload_interval,
        poll_interval=args.poll_interval, output_interval=args.output_interval,
        boot_grace=args.boot_grace, nix_bin_dir=args.nix_bin_dir,
        socket_ifname=args.socket_ifname or None,
        container_engine=args.container_engine or None,
        stop_upload_budget=args.stop_upload_budget, log_file=args.log_file,
        log_max_bytes=args.log_max_bytes, log_backups=args.log_backups,
        gpu_interval=args.gpu_interval, gpu_minute_seconds=args.gpu_minute_seconds)
    if cfg.log_file is not None:
        use_log_file(LogFile(cfg.log_file, cfg.log_max_bytes, cfg.log_backups))
    log = Log(stack=cfg.stack or "", role=cfg.role)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("signal", f"received {signal.Signals(signum).name}: stopping")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.role == "shepherd":
        from pcp.agent.shepherd import Shepherd

        if not cfg.stack or not cfg.project:
            parser.error("shepherd needs --stack and --project")
        bucket = cfg.bucket or cfg.default_bucket()
        assert bucket is not None
        log.info("agent_start", f"shepherd for stack {cfg.stack}, bucket {bucket}")
        return Shepherd(cfg, make_store(bucket, cfg.project), log, stop).run()
    from pcp.agent.assignment import Metadata
    from pcp.agent.worker import Worker

    metadata = Metadata()
    log.info("agent_start", f"worker, metadata server {metadata.host}")
    return Worker(cfg, metadata, make_store, log, stop).run()


if __name__ == "__main__":
    sys.exit(main())
