"""`pcp shepherd install --ssh` end to end against a real OpenSSH server on 127.0.0.1.

The test starts Debian's sshd on a free port with its own configuration and freshly generated
host and client keys (`sshd -D -e`, stopped by the test). Behind it sits the pretend Mac of
tests/agent/macos.py: sshd's `SetEnv` gives the remote session the stand-ins' PATH and the
fake root, and install.sh runs under dash there. Everything between the CLI and install.sh is
real: ssh with the host key pinned, the tar stream, the remote argument list.
"""

from __future__ import annotations

import getpass
import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.agent.macos import Mac, require_tool
from tests.cli.conftest import run_cli

pytestmark = pytest.mark.cli
PROJECT = "my-project-1"


@dataclass
class Sshd:
    port: int
    user: str
    host_key: str  # "TYPE BASE64" of the server's host key
    identity: Path  # the client's private key
    mac: Mac
    log: Path

    @property
    def target(self) -> str:
        return f"{self.user}@127.0.0.1"


def keygen(path: Path) -> str:
    subprocess.run([require_tool("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", "",
                    "-f", str(path)], check=True, timeout=30)
    return " ".join(Path(f"{path}.pub").read_text().split()[:2])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    binary = require_tool("sshd")
    require_tool("ssh")
    dash = require_tool("dash")
    base = tmp_path / "sshd"
    base.mkdir()
    host_key = keygen(base / "host.key")
    keygen(base / "client.key")
    (base / "authorized_keys").write_text((base / "client.key.pub").read_text())
    mac = Mac(tmp_path / "mac").setup()
    env = {**mac.env(), "PCP_TEST_DASH": dash}
    port = free_port()
    config = base / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host.key'}",
        f"AuthorizedKeysFile {base / 'authorized_keys'}", "PidFile none", "UsePAM no",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "StrictModes no", "PermitUserEnvironment no",
        "SetEnv " + " ".join(f"{k}={v}" for k, v in sorted(env.items())), ""]))
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation dir
    log = base / "sshd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([binary, "-D", "-e", "-f", str(config)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not start: {log.read_text()}")
                time.sleep(0.1)
        yield Sshd(port, getpass.getuser(), host_key, base / "client.key", mac, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    key = tmp_path / "shepherd-key.json"
    key.write_text('{"type": "external_account"}\n')
    agent = tmp_path / "pcp-agent-0123abcd.tar.gz"
    agent.write_bytes(b"an agent archive (pip is a stand-in on the pretend Mac)\n")
    return {"key": key, "agent": agent}


def install(sshd: Sshd, files: dict[str, Path], *pin: str, extra: tuple[str, ...] = ()):  # noqa: ANN201
    return run_cli(["shepherd", "install", "--ssh", sshd.target, "--port", str(sshd.port),
                    "--identity", str(sshd.identity), *pin, "--stack", "tiny",
                    "--project", PROJECT, "--agent", str(files["agent"]),
                    "--python", str(sshd.mac.python), "--no-sudo",
                    "--shell", os.environ.get("PCP_TEST_DASH") or require_tool("dash"),
                    *extra])


def test_install_over_ssh_with_the_host_key_pinned(sshd: Sshd, files: dict[str, Path]) -> None:
    result = install(sshd, files, "--host-key", sshd.host_key,
                     extra=("--key", str(files["key"])))
    assert result.exit_code == 0, result.output + sshd.log.read_text()
    mac = sshd.mac
    assert "the shepherd daemon of stack tiny is installed" in result.stdout
    assert mac.key.read_text() == files["key"].read_text()
    assert mac.loaded and mac.plist.exists()
    calls = mac.calls()
    pip = [c for c in calls if c.startswith("venv-python -m pip install --quiet --upgrade /")]
    assert len(pip) == 1
    copied = re.fullmatch(r".* (/tmp/pcp-shepherd\.[A-Za-z0-9]+)/pcp-agent-0123abcd\.tar\.gz",
                          pip[0])
    assert copied is not None, pip
    assert not Path(copied.group(1)).exists()  # the copies, credentials included, are gone
    assert calls[-1] == f"launchctl bootstrap system {mac.plist}"

    # Again, pinned through a known_hosts file: an upgrade keeps the installed credentials.
    known = sshd.log.parent / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key}\n")
    again = install(sshd, files, "--known-hosts", str(known))
    assert again.exit_code == 0, again.output
    assert "launchctl bootout system/dev.pcp.shepherd" in mac.calls()
    assert mac.key.read_text() == files["key"].read_text()


def test_a_wrong_host_key_is_refused(sshd: Sshd, files: dict[str, Path],
                                     tmp_path: Path) -> None:
    other = keygen(tmp_path / "other.key")
    result = install(sshd, files, "--host-key", other, extra=("--key", str(files["key"])))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"pcp: error: the host key of {sshd.target} does not "
                                    "match the pinned one: refusing to connect")
    assert sshd.mac.written() == [] and sshd.mac.calls() == []
    # Not even a session was opened: sshd logged no accepted login.
    assert "Accepted publickey" not in sshd.log.read_text()


def test_an_unknown_host_is_refused_too(sshd: Sshd, files: dict[str, Path],
                                        tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    result = install(sshd, files, "--known-hosts", str(empty))
    assert result.exit_code == 1 and "does not match the pinned one" in result.stderr
    assert sshd.mac.written() == []


@pytest.mark.parametrize(("args", "message"), [
    ((), "exactly one of --known-hosts FILE or --host-key"),
    (("--host-key", "ssh-ed25519 AAAA; touch pwned"), "--host-key must be 'TYPE BASE64'"),
])
def test_the_host_key_must_be_pinned(args: tuple[str, ...], message: str,
                                     files: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli(["shepherd", "install", "--ssh", "admin@mac.example", *args,
                      "--project", PROJECT, "--agent", str(files["agent"])])
    assert result.exit_code == 2 and message in result.stderr
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--ssh", "-oProxyCommand=touch pwned", "must be HOST or USER@HOST"),
    ("--ssh", "mac.example; touch pwned", "must be HOST or USER@HOST"),
    ("--project", "p$(touch pwned)", "is not a Google Cloud project id"),
    ("--stack", "giant", "unknown stack"),
    ("--python", "python3; touch pwned", "must be an absolute path"),
    ("--shell", "/bin/sh -c id", "must be an absolute path"),
])
def test_hostile_arguments_never_reach_ssh(flag: str, value: str, message: str,
                                           files: dict[str, Path], tmp_path: Path) -> None:
    args = {"--ssh": "admin@mac.example", "--project": PROJECT, "--stack": "tiny",
            "--python": "/usr/bin/python3", "--shell": "/bin/sh", flag: value}
    argv = ["shepherd", "install", "--host-key", "ssh-ed25519 AAAAC3Nza",
            "--agent", str(files["agent"])]
    for name, v in args.items():
        argv += [name, v]
    result = run_cli(argv)
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
