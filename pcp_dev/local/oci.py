"""OCI images on this machine: a real registry on loopback, Podman set up to run, test images.

- `LocalRegistry`: Debian's `docker-registry` (the CNCF distribution registry), filesystem
  storage, on 127.0.0.1; the agent pulls from it as it would from Artifact Registry (plain
  HTTP is used for loopback registries only).
- `podman_engine()`: Podman as these machines run it: `--runtime runc --cgroup-manager
  cgroupfs` and a containers.conf with `default_ulimits = []` (`CONTAINERS_CONF`); the default
  crun fails on setrlimit and on a hybrid cgroup layout. `--init` needs `catatonit`.
- `contract_image()`: a tiny image built without a registry or a network: `podman import` of
  a root filesystem holding the static busybox and a `sh` trainer that honours the binary
  contract (docs/agent.md).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pcp.agent.procs import signal_group
from pcp_dev.local.emulators import EmulatorMissing

PACKAGES = "podman, runc, catatonit and docker-registry (Debian packages)"
PODMAN_GLOBALS = ("--runtime", "runc", "--cgroup-manager", "cgroupfs")
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "echo", "cat", "printf", "sleep", "nc", "ls", "wc", "mkdir", "rm", "kill",
           "env", "grep", "sort", "test", "[", "true", "touch")

#: The test trainer: `shepherd --port=P` waits for a `hello` from every worker on its port
#: (busybox nc, one script per connection), `worker --head-node=H:P` says hello until
#: answered; both write metrics.json and env.txt (the contract variables they saw, the
#: secret only as "present") into PCP_OUTPUT_DIR and print a pcp-progress line.
#: `--exit N` sets every node's exit code; `--fail-worker N` makes a worker exit N at once.
TRAINER = r"""#!/bin/sh
echo "argv: $*"
role=$1; shift
case "$role" in
  shepherd) port=${1#--port=}; shift ;;
  worker) head=${1#--head-node=}; shift ;;
  *) echo "usage: shepherd --port=P | worker --head-node=H:P" >&2; exit 2 ;;
esac
code=0; fail=""
while [ $# -gt 0 ]; do
  case "$1" in
    --exit) code=$2; shift 2 ;;
    --fail-worker) fail=$2; shift 2 ;;
    *) shift ;;
  esac
done
out=${PCP_OUTPUT_DIR:?PCP_OUTPUT_DIR is not set}
env | grep -E '^(PCP_|MASTER_|RANK=|WORLD_SIZE=|GROUP_|LOCAL_|GLOO_|NCCL_)' \
  | grep -v '^PCP_RUN_SECRET=' | sort > "$out/env.txt"
[ -n "$PCP_RUN_SECRET" ] && echo "PCP_RUN_SECRET=present" >> "$out/env.txt"
if [ "$role" = shepherd ]; then
  rm -rf /tmp/pcp-hello && mkdir -p /tmp/pcp-hello
  nc -ll -p "$port" -e /bin/pcp-hello & server=$!
  trap 'kill $server; echo "shepherd: SIGTERM" >&2; exit 143' TERM
  n=0
  while [ "$n" -lt "${PCP_NUM_WORKERS:-1}" ]; do
    sleep 0.2
    n=$(ls /tmp/pcp-hello | wc -l)
  done
  kill $server
else
  if [ -n "$fail" ]; then
    echo "worker: failing with exit code $fail" >&2
    exit "$fail"
  fi
  i=0
  until [ "$(echo "hello $PCP_NODE" | nc -w 2 "${head%:*}" "${head##*:}")" = ok ]; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then echo "worker: no shepherd at $head" >&2; exit 1; fi
    sleep 0.2
  done
fi
echo "pcp-progress step=1 loss=0.5"
printf '{"loss": 0.5, "node": "%s"}\n' "$PCP_NODE" > "$out/metrics.json.tmp"
mv "$out/metrics.json.tmp" "$out/metrics.json"
exit "$code"
"""
HELLO = r"""#!/bin/sh
read -r line
case "$line" in
  "hello "*) : > "/tmp/pcp-hello/${line#hello }"; echo ok ;;
esac
"""


def missing() -> str | None:
    """What is missing to build, serve and run images here, or None."""
    gone = [name for name in ("podman", "runc", "docker-registry") if not shutil.which(name)]
    if not Path("/usr/libexec/podman/catatonit").exists():
        gone.append("catatonit")
    if not BUSYBOX.is_file():
        gone.append("busybox-static")
    if gone:
        return f"{', '.join(gone)} not installed (apt-get install {' '.join(gone)})"
    return None


@dataclass(frozen=True)
class Podman:
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """For the agent's --container-engine (split there without a shell)."""
        return " ".join(self.argv)

    def run(self, *args: str, timeout: float = 120.0) -> str:
        import os

        proc = subprocess.run([*self.argv, *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **self.env}, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-800:]}")
        return proc.stdout


def podman_engine(conf_dir: Path) -> Podman:
    """Podman with the options these machines need; writes the containers.conf it uses."""
    reason = missing()
    if reason is not None:
        raise EmulatorMissing(reason)
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "containers.conf"
    conf.write_text(CONTAINERS_CONF)
    found = shutil.which("podman")
    assert found is not None
    return Podman((found, *PODMAN_GLOBALS), {"CONTAINERS_CONF": str(conf)})


def contract_image(podman: Podman, work: Path, tag: str, trainer: str = TRAINER) -> str:
    """Import the busybox contract trainer as `tag` (ENTRYPOINT /bin/pcp-trainer)."""
    root = work / "rootfs"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    (root / "tmp").mkdir()
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    for name, text in (("pcp-trainer", trainer), ("pcp-hello", HELLO)):
        (root / "bin" / name).write_text(text)
        (root / "bin" / name).chmod(0o755)
    archive = work / "rootfs.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(root, arcname=".")
    podman.run("import", "--change", 'ENTRYPOINT ["/bin/pcp-trainer"]', str(archive), tag)
    return tag


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalRegistry:
    """`docker-registry serve CONFIG` on 127.0.0.1:PORT, storage under `root`."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> LocalRegistry:
        found = shutil.which("docker-registry")
        if found is None:
            raise EmulatorMissing("docker-registry not installed (apt-get install "
                                  "docker-registry)")
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "config.yml"
        config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                          f"{self.root / 'data'}\nhttp:\n  addr: {self.host}\n")
        log = open(self.root / "registry.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([found, "serve", str(config)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: see "
                                   f"{self.root / 'registry.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"docker-registry did not listen on {self.host} in {timeout:g} s")

    def push(self, podman: Podman, local: str, repository: str, tag: str) -> str:
        """Push `local` as HOST/REPOSITORY:TAG; returns that reference."""
        ref = f"{self.host}/{repository}:{tag}"
        podman.run("push", "--tls-verify=false", local, ref)
        return ref

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            signal_group(self.proc.pid, 15)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                signal_group(self.proc.pid, 9)
                self.proc.wait()


def containers_of(run_id: str, podman: Podman | None = None) -> list[str]:
    """The ids of containers (running or not) labelled with this run."""
    engine = podman or Podman((shutil.which("podman") or "podman", *PODMAN_GLOBALS))
    return engine.run("ps", "--all", "--quiet", "--filter", f"label=pcp-run={run_id}").split()
