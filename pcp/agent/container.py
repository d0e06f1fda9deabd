"""Run the node's part of a run inside an OCI image (docs/trainers.md, "OCI images").

The same contract as a native binary: `IMAGE shepherd --port=P [args]` /
`IMAGE worker --head-node=H:P [args]` (the arguments go to the image's entrypoint), every
contract variable passed through by name (`-e NAME`, the value taken from the engine's own
environment, so no value is ever on a command line), host networking, `PCP_OUTPUT_DIR`
mounted at the same path, the VM's GPUs when it has any, and a stop that is the native one:
`ENGINE stop -t GRACE` sends SIGTERM (to `--init`, which forwards it) and SIGKILLs after the
grace. The container is `--rm` and named `pcp-<run_id>-<node>` with labels `pcp-run` and
`pcp-node`, so one left by a killed agent is removed before the node runs again.

The engine is Docker when it is installed (the Deep Learning VM images carry it and the NVIDIA
container toolkit), else Podman; `--container-engine` names another, with its global options.
Images on Artifact Registry are pulled as the node's service account: `ENGINE login -u
oauth2accesstoken --password-stdin REGISTRY` with an access token (the password goes on
stdin, never on a command line). A registry on the loopback address needs no login and is
spoken to over plain HTTP (podman `--tls-verify=false`; Docker allows 127.0.0.0/8 itself).
Every command is an argument list, never a shell.
"""

from __future__ import annotations

import math
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pcp.agent.binary import BinaryError, stop_group
from pcp.agent.procs import signal_group
from pcp.agent.runner import Runner
from pcp.core.images import ImageRef, parse_image
from pcp.core.messages import Assignment

ENGINES = ("docker", "podman")
LABEL_RUN = "pcp-run"
LABEL_NODE = "pcp-node"
TOKEN_USER = "oauth2accesstoken"
STOP_MARGIN = 5.0  # after the grace: how long `ENGINE stop` may take before the client is killed


@dataclass(frozen=True)
class Engine:
    """A container engine's command with its global options, e.g. ("podman", "--runtime",
    "runc")."""

    argv: tuple[str, ...]

    @property
    def kind(self) -> str:
        name = Path(self.argv[0]).name
        return "podman" if "podman" in name else "docker"

    def cmd(self, *args: str) -> list[str]:
        return [*self.argv, *args]


def find_engine(spec: str | None = None, which: Callable[[str], str | None] = shutil.which
                ) -> Engine:
    """`spec` split into arguments (no shell), or the first of docker, podman on PATH."""
    if spec and spec != "auto":
        argv = tuple(shlex.split(spec))
        if not argv:
            raise BinaryError("--container-engine is empty")
        found = which(argv[0])
        if found is None:
            raise BinaryError(f"the container engine {argv[0]!r} is not installed")
        return Engine((found, *argv[1:]))
    for name in ENGINES:
        found = which(name)
        if found is not None:
            return Engine((found,))
    raise BinaryError("the run names an image but neither docker nor podman is installed "
                      "(the Deep Learning VM images carry Docker; on Debian: apt-get install "
                      "podman)")


def container_name(a: Assignment) -> str:
    """pcp-<run_id>-<node>: the same for every attempt, so a leftover is found by name."""
    return f"pcp-{a.run_id}-{a.node}"


def pull_argv(engine: Engine, ref: ImageRef) -> list[str]:
    tls = ["--tls-verify=false"] if ref.loopback and engine.kind == "podman" else []
    return engine.cmd("pull", *tls, ref.by_digest)


def login_argv(engine: Engine, ref: ImageRef) -> list[str]:
    return engine.cmd("login", "--username", TOKEN_USER, "--password-stdin", ref.registry)


def gpu_flags(engine: Engine, gpus: int) -> list[str]:
    """The VM's GPUs for the container: Docker's NVIDIA runtime hook, or Podman's CDI device."""
    if gpus <= 0:
        return []
    return ["--gpus", "all"] if engine.kind == "docker" else ["--device", "nvidia.com/gpu=all"]


def run_argv(engine: Engine, a: Assignment, ref: ImageRef, env_names: Iterable[str],
             output_dir: str, gpus: int, grace: float) -> list[str]:
    """`ENGINE run ... IMAGE <the contract's arguments>`: an argument list, no values of the
    environment on it (each variable is passed by name)."""
    stop_timeout = str(max(0, math.ceil(grace)))
    argv = engine.cmd(
        "run", "--rm", "--name", container_name(a),
        "--label", f"{LABEL_RUN}={a.run_id}", "--label", f"{LABEL_NODE}={a.node}",
        "--init", "--network", "host", "--pull", "never",
        "--stop-signal", "SIGTERM", "--stop-timeout", stop_timeout,
        "--volume", f"{output_dir}:{output_dir}")
    for name in sorted(set(env_names)):
        argv += ["--env", name]
    argv += gpu_flags(engine, gpus)
    return [*argv, ref.by_digest, *a.argv("")[1:]]


def google_access_token() -> str:
    """The node's service account token: the metadata server on a VM, the key or workload
    identity federation on the shepherd host."""
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)


@dataclass
class Puller:
    """Logs in where needed and pulls the pinned image; `cancelled` aborts a long pull."""

    engine: Engine
    log_to: IO[bytes] | None = None
    cancelled: Callable[[], bool] = lambda: False
    grace: float = 10.0
    token: Callable[[], str] = google_access_token

    def pull(self, image: str) -> ImageRef:
        ref = parse_image(image, "the assignment's image")
        if not ref.pinned:
            raise BinaryError(f"image {image} is not pinned to a digest")
        if ref.google:
            try:
                token = self.token()
            except Exception as e:  # noqa: BLE001 - any credential failure is the reason
                raise BinaryError(f"no access token to log in to {ref.registry}: "
                                  f"{type(e).__name__}: {e}") from None
            self._run(login_argv(self.engine, ref), stdin=token.encode())
        self._run(pull_argv(self.engine, ref))
        return ref

    def _run(self, argv: list[str], stdin: bytes | None = None) -> None:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=self.log_to, stderr=self.log_to,
                                    start_new_session=True)
        except OSError as e:
            raise BinaryError(f"cannot run {argv[0]}: {e}") from None
        if stdin is not None and proc.stdin is not None:
            with proc.stdin:
                proc.stdin.write(stdin)
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.cancelled():
                    stop_group(proc, self.grace)
                    raise BinaryError("the image pull stopped: the node was told to stop "
                                      "before the image was pulled") from None
        if proc.returncode != 0:
            step = argv[len(self.engine.argv)]
            raise BinaryError(f"{Path(argv[0]).name} {step} {argv[-1]} failed with exit code "
                              f"{proc.returncode} (its output is in stderr.log)")


def remove_leftovers(engine: Engine, node: str, log_to: IO[bytes] | None = None) -> list[str]:
    """Remove this node's containers that a killed agent left (label pcp-node=NODE)."""
    try:
        found = subprocess.run(
            engine.cmd("ps", "--all", "--quiet", "--filter", f"label={LABEL_NODE}={node}"),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    ids = found.stdout.decode("utf-8", "replace").split()
    if ids:
        subprocess.run(engine.cmd("rm", "--force", *ids), stdin=subprocess.DEVNULL,
                       stdout=log_to, stderr=log_to, timeout=120, check=False)
    return ids


class ContainerRunner(Runner):
    """A Runner whose stop goes through the engine: `ENGINE stop -t GRACE NAME` (the
    container's init gets SIGTERM, SIGKILL after the grace), then the client is killed and the
    container removed if it is still there STOP_MARGIN seconds later."""

    def __init__(self, engine: Engine, name: str, argv: Sequence[str], env: Mapping[str, str],
                 cwd: Path, stdout: Path, stderr: Path) -> None:
        super().__init__(argv, env, cwd, stdout, stderr)
        self.engine = engine
        self.name = name
        self.stopper: subprocess.Popen[bytes] | None = None
        self.grace = 0.0

    def terminate(self, grace: float) -> None:
        if self.kill_at is not None:
            return
        self.sent = "SIGTERM"
        self.kill_at = time.monotonic() + grace + STOP_MARGIN
        self.grace = grace
        self._stop_container()

    def _stop_container(self) -> None:
        with open(self.stderr, "ab") as err:
            self.stopper = subprocess.Popen(
                self.engine.cmd("stop", "-t", str(max(0, math.ceil(self.grace))), self.name),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True, env=self.env)

    def tick(self) -> None:
        if self.stopper is not None and self.stopper.poll() not in (None, 0) \
                and self.poll() is None and self.kill_at is not None \
                and time.monotonic() < self.kill_at - STOP_MARGIN:
            # Stopped before the engine had created the container: ask again until it exists.
            time.sleep(0.2)
            self._stop_container()
        if self.kill_at is not None and time.monotonic() >= self.kill_at and self.poll() is None:
            self.kill_at = float("inf")
            subprocess.run(self.engine.cmd("rm", "--force", self.name), stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=120, check=False)
            assert self.proc is not None
            signal_group(self.proc.pid, signal.SIGKILL)

    def reap_group(self) -> None:
        super().reap_group()
        if self.stopper is not None and self.stopper.poll() is None:
            try:
                self.stopper.wait(timeout=STOP_MARGIN)
            except subprocess.TimeoutExpired:
                signal_group(self.stopper.pid, signal.SIGKILL)
