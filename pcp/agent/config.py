"""The agent's settings, from its command line (see __main__.py); all times in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcp.core.names import Names


@dataclass(frozen=True)
class AgentConfig:
    role: str  # "worker" or "shepherd"
    work_dir: Path
    bucket: str | None = None
    project: str | None = None
    stack: str | None = None
    poweroff: tuple[str, ...] = ("shutdown", "-h", "now")
    #: Where a worker's power-off line is also written (the serial console; the command line
    #: defaults to /dev/console); None: nowhere.
    console: str | None = None
    #: The wandb API key from this file instead of Secret Manager (the shepherd Mac, the local
    #: replica); None: Secret Manager (pcp/agent/wandb.py).
    wandb_key_file: Path | None = None
    once: bool = False
    grace: float = 10.0  # SIGTERM -> SIGKILL for the binary (fits a Spot VM's 30 s, docs/agent.md)
    stop_upload_budget: float = 10.0  # after the agent's own SIGTERM: time for output uploads
    upload_interval: float = 5.0  # logs and heartbeat
    poll_interval: float = 5.0  # run record, and the metadata while waiting for an assignment
    output_interval: float = 60.0  # PCP_OUTPUT_DIR while running (always at exit); 0 = off
    boot_grace: float = 60.0  # how long a worker with no assignment waits before powering off
    progress_interval: float = 5.0  # "waiting for the shepherd" lines
    nix_bin_dir: str | None = None
    #: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME for the binary: an interface name, "auto" (the
    #: interface of the default route: a VM's primary one), or None to leave them unset.
    socket_ifname: str | None = None
    gpu_interval: float = 10.0  # nvidia-smi utilization samples (heartbeat, GPU-idle watchdog)
    #: How long one minute of a gpu_idle policy lasts: 60, shorter only to rehearse it locally.
    gpu_minute_seconds: float = 60.0
    #: The container engine for a run that names an image: None/"auto" = docker if installed,
    #: else podman; or a command with global options, split without a shell.
    container_engine: str | None = None
    keep_runs: int = 3  # local work directories of older runs are deleted
    log_file: Path | None = None  # the agent's own rotated log (shepherd Mac); None: stdout
    log_max_bytes: int = 50 * 1024 * 1024
    log_backups: int = 7

    def default_bucket(self) -> str | None:
        """The stack bucket's name as the Pulumi program makes it: pcp-<stack>-<project>."""
        if self.stack and self.project:
            return Names(self.stack, self.project).bucket
        return None
