"""The agent's containers: the command lines it builds, and real Podman runs of them.

The argument lists are checked as data (no shell, every contract variable passed by name and
no value on a command line, GPUs only where there are some); then a busybox image built here
runs under real Podman: a stop is SIGTERM through the container's init then SIGKILL after the
grace, and a container a killed agent left behind is removed before the node runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.agent import container
from pcp.agent.binary import BinaryError
from pcp.core.images import parse_image
from pcp.core.messages import Assignment
from pcp_dev.local import oci
from tests.conftest import require_emulator

DIGEST = "sha256:" + "ab" * 32
NOW = datetime.now(UTC)


def assignment(role: str = "worker", run_id: str = "r1", **over: object) -> Assignment:
    node = "shepherd" if role == "shepherd" else "worker-0"
    base: dict[str, object] = dict(
        run_id=run_id, attempt=1, stack="tiny", node=node, role=role,
        rank=0 if role == "shepherd" else 1, num_nodes=2, head_host="10.0.0.2", port=9000,
        binary=None, args=("--lr", "0.1", "; rm -rf / $(id)"), deadline=NOW + timedelta(hours=1),
        boot_deadline=NOW + timedelta(minutes=5), secret="ff" * 32,
        image=f"127.0.0.1:5000/pcp/trainer@{DIGEST}")
    base.update(over)
    return Assignment(**base)  # type: ignore[arg-type]


DOCKER = container.Engine(("/usr/bin/docker",))
PODMAN = container.Engine(("/usr/bin/podman", "--runtime", "runc"))


def test_run_argv_is_the_contract_with_every_variable_by_name() -> None:
    a = assignment()
    ref = parse_image(a.image)
    env = a.env("/opt/pcp/work/r1/1/output")
    argv = container.run_argv(PODMAN, a, ref, [*env, "GLOO_SOCKET_IFNAME"],
                              "/opt/pcp/work/r1/1/output", gpus=0, grace=7.5)
    image_at = argv.index(ref.by_digest)
    # IMAGE worker --head-node=H:P, then the training config as literal arguments
    assert argv[image_at + 1:] == ["worker", "--head-node=10.0.0.2:9000", "--lr", "0.1",
                                   "; rm -rf / $(id)"]
    opts = argv[:image_at]
    assert opts[:4] == ["/usr/bin/podman", "--runtime", "runc", "run"]
    for flag in ("--rm", "--init"):
        assert flag in opts
    pairs = {opts[i]: opts[i + 1] for i in range(len(opts) - 1) if opts[i].startswith("--")}
    assert pairs["--name"] == "pcp-r1-worker-0"
    assert pairs["--network"] == "host"
    assert pairs["--stop-signal"] == "SIGTERM" and pairs["--stop-timeout"] == "8"
    assert pairs["--volume"] == "/opt/pcp/work/r1/1/output:/opt/pcp/work/r1/1/output"
    assert pairs["--pull"] == "never"
    assert {opts[i + 1] for i, o in enumerate(opts) if o == "--label"} == {
        "pcp-run=r1", "pcp-node=worker-0"}
    passed = [opts[i + 1] for i, o in enumerate(opts) if o == "--env"]
    assert set(passed) == {*env, "GLOO_SOCKET_IFNAME"}
    assert all("=" not in name for name in passed)  # names only: no value on a command line
    assert not any(a.secret in arg for arg in argv)
    assert "--gpus" not in argv and "--device" not in argv


def test_the_shepherd_runs_image_shepherd_port() -> None:
    a = assignment("shepherd", image=f"us-docker.pkg.dev/p/r/t@{DIGEST}")
    argv = container.run_argv(DOCKER, a, parse_image(a.image), [], "/o", gpus=0, grace=10)
    assert argv[argv.index(f"us-docker.pkg.dev/p/r/t@{DIGEST}") + 1:][:2] == [
        "shepherd", "--port=9000"]
    assert "pcp-r1-shepherd" in argv


@pytest.mark.parametrize(("engine", "flags"), [
    (DOCKER, ["--gpus", "all"]), (PODMAN, ["--device", "nvidia.com/gpu=all"])])
def test_gpus_are_given_only_when_the_vm_has_some(engine: container.Engine,
                                                   flags: list[str]) -> None:
    a = assignment()
    with_gpus = container.run_argv(engine, a, parse_image(a.image), [], "/o", gpus=2, grace=1)
    start = with_gpus.index(flags[0])
    assert with_gpus[start:start + 2] == flags
    assert flags[0] not in container.run_argv(engine, a, parse_image(a.image), [], "/o",
                                              gpus=0, grace=1)


def test_pull_and_login_commands() -> None:
    loop = parse_image(f"127.0.0.1:5000/pcp/t:v1@{DIGEST}")
    ar = parse_image(f"us-docker.pkg.dev/p/r/t@{DIGEST}")
    assert container.pull_argv(PODMAN, loop)[-2:] == ["--tls-verify=false",
                                                       f"127.0.0.1:5000/pcp/t@{DIGEST}"]
    assert "--tls-verify=false" not in container.pull_argv(PODMAN, ar)  # TLS verified
    assert "--tls-verify=false" not in container.pull_argv(DOCKER, loop)  # docker: loopback ok
    assert container.login_argv(DOCKER, ar) == [
        "/usr/bin/docker", "login", "--username", "oauth2accesstoken", "--password-stdin",
        "us-docker.pkg.dev"]


def test_docker_is_preferred_then_podman_and_missing_says_what_to_install() -> None:
    both = {"docker": "/usr/bin/docker", "podman": "/usr/bin/podman"}
    assert container.find_engine(None, both.get).argv == ("/usr/bin/docker",)
    assert container.find_engine(None, {"podman": "/usr/bin/podman"}.get).argv == (
        "/usr/bin/podman",)
    assert container.find_engine("podman --runtime runc", both.get).argv == (
        "/usr/bin/podman", "--runtime", "runc")
    with pytest.raises(BinaryError, match="neither docker nor podman is installed"):
        container.find_engine(None, {}.get)
    with pytest.raises(BinaryError, match="'nerdctl' is not installed"):
        container.find_engine("nerdctl", both.get)


def test_the_login_password_goes_on_stdin_never_on_a_command_line(tmp_path: Path) -> None:
    """A Google registry: the token reaches `ENGINE login` on stdin; then the pull runs."""
    record = tmp_path / "calls"
    fake = tmp_path / "engine"
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    f"open({str(record)!r}, 'a').write(repr((sys.argv[1:], "
                    "sys.stdin.read() if 'login' in sys.argv else '')) + '\\n')\n")
    fake.chmod(0o755)
    puller = container.Puller(container.Engine((str(fake),)), token=lambda: "tok-123")
    ref = puller.pull(f"us-docker.pkg.dev/p/r/t@{DIGEST}")
    assert ref.pinned
    calls = [eval(line) for line in record.read_text().splitlines()]  # noqa: S307 - our repr
    assert calls[0] == (["login", "--username", "oauth2accesstoken", "--password-stdin",
                         "us-docker.pkg.dev"], "tok-123")
    assert calls[1] == (["pull", f"us-docker.pkg.dev/p/r/t@{DIGEST}"], "")
    assert all("tok-123" not in " ".join(args) for args, _ in calls)
    with pytest.raises(BinaryError, match="not pinned"):
        puller.pull("us-docker.pkg.dev/p/r/t:v1")


# ------------------------------------------------------------------ real Podman


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> tuple[oci.Podman, str]:
    reason = oci.missing()
    if reason is not None:
        require_emulator(f"containers ({oci.PACKAGES})", RuntimeError(reason))
    work = tmp_path_factory.mktemp("container")
    engine = oci.podman_engine(work)
    sleeper = oci.TRAINER.replace('echo "argv: $*"', 'echo "argv: $*"\ntrap "echo got-term >&2;'
                                  ' exit 42" TERM\n[ "$1" = sleep ] && { sleep 600 & wait; }')
    image = oci.contract_image(engine, work, "localhost/pcp-agent-test:1", sleeper)
    digest = engine.run("image", "inspect", "--format", "{{.Digest}}", image).strip()
    return engine, f"localhost/pcp-agent-test@{digest}"


def _runner(engine: oci.Podman, a: Assignment, ref: str, tmp: Path,
            args: tuple[str, ...]) -> container.ContainerRunner:
    a = Assignment(**{**a.__dict__, "args": args})
    out = tmp / "output"
    out.mkdir(exist_ok=True)
    eng = container.Engine(engine.argv)
    env = {**os.environ, **engine.env, **a.env(str(out))}
    argv = container.run_argv(eng, a, parse_image(ref), a.env(str(out)), str(out), 0, 2.0)
    argv[argv.index(parse_image(ref).by_digest)] = ref
    return container.ContainerRunner(eng, container.container_name(a), argv, env, tmp,
                                     tmp / "stdout.log", tmp / "stderr.log")


def test_a_stop_is_sigterm_through_init_and_the_container_is_removed(
        podman: tuple[oci.Podman, str], tmp_path: Path) -> None:
    engine, ref = podman
    a = assignment("worker", run_id="agent-stop")
    # `sleep` as the role makes the trainer wait on its TERM trap (the test image's variant)
    runner = _runner(engine, a, ref, tmp_path, ())
    runner.argv[runner.argv.index("worker")] = "sleep"
    runner.start()
    assert _until(lambda: oci.containers_of("agent-stop", engine), 30)
    runner.terminate(2.0)
    while runner.poll() is None:
        runner.tick()
        time.sleep(0.1)
    runner.reap_group()
    result = runner.exit()
    assert (result.exit_code, result.signal) == (42, "SIGTERM")  # the trainer's own trap ran
    assert "got-term" in (tmp_path / "stderr.log").read_text()
    assert _until(lambda: not oci.containers_of("agent-stop", engine), 30)  # --rm


def test_a_stop_before_the_container_exists_still_stops_it(
        podman: tuple[oci.Podman, str], tmp_path: Path) -> None:
    engine, ref = podman
    runner = _runner(engine, assignment("worker", run_id="agent-early"), ref, tmp_path, ())
    runner.argv[runner.argv.index("worker")] = "sleep"
    runner.start()
    runner.terminate(2.0)  # at once: the engine has not created the container yet
    deadline = time.monotonic() + 60
    while runner.poll() is None and time.monotonic() < deadline:
        runner.tick()
        time.sleep(0.1)
    assert runner.poll() is not None, "the client never exited"
    runner.reap_group()
    assert runner.exit().signal == "SIGTERM"
    assert _until(lambda: not oci.containers_of("agent-early", engine), 30)


def test_a_container_left_by_a_killed_agent_is_removed(podman: tuple[oci.Podman, str],
                                                       tmp_path: Path) -> None:
    engine, ref = podman
    a = assignment("worker", run_id="agent-killed")
    runner = _runner(engine, a, ref, tmp_path, ())
    runner.argv[runner.argv.index("worker")] = "sleep"
    runner.start()
    assert _until(lambda: oci.containers_of("agent-killed", engine), 30)
    assert runner.proc is not None
    os.killpg(runner.proc.pid, signal.SIGKILL)  # the agent and its client die; conmon stays
    runner.proc.wait()
    assert oci.containers_of("agent-killed", engine), "the container outlived its client"
    gone = container.remove_leftovers(container.Engine(engine.argv), "worker-0")
    assert gone
    assert _until(lambda: not oci.containers_of("agent-killed", engine), 30)


def _until(probe, timeout: float) -> object:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    return probe()


def test_podman_exit_code_is_the_containers(podman: tuple[oci.Podman, str],
                                            tmp_path: Path) -> None:
    engine, ref = podman
    out = tmp_path / "o"
    out.mkdir()
    proc = subprocess.run([*engine.argv, "run", "--rm", "--network", "host", "-e",
                           "PCP_OUTPUT_DIR", ref, "worker", "--head-node=127.0.0.1:1",
                           "--fail-worker", "9"], env={**os.environ, **engine.env,
                                                       "PCP_OUTPUT_DIR": "/tmp"},
                          capture_output=True, timeout=120, check=False)
    assert proc.returncode == 9, proc.stderr
