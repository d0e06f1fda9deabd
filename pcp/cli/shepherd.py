"""`pcp shepherd install --ssh HOST`: install or upgrade the shepherd daemon on the Mac.

Over SSH, with the Mac's host key pinned (`--known-hosts FILE` or `--host-key 'TYPE KEY'`;
host key checking is never turned off): make a private directory on the Mac, copy
`install.sh`, the plist template, the agent archive and (optionally) the credential file into
it as one tar stream, run `install.sh` there with an argument list, and remove the directory.

SSH hands a remote command to the remote user's shell as one string, so every argument is
checked against a pattern first and then quoted with `shlex.quote`; nothing a user typed is
ever pasted into a command line unchecked. Locally no shell runs at all: `ssh` is started with
an argument list.
"""

from __future__ import annotations

import io
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path

import click

from pcp.cli.errors import EXIT_USAGE, PcpGroup, fail
from pcp.core.names import STACK_RE, STACKS

LABEL = "dev.pcp.shepherd"
#: user@host or host: a DNS name or an IPv4 address; never starts with "-" (no ssh option).
HOST_RE = re.compile(r"^(?:[a-z_][a-z0-9_.-]{0,31}@)?[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})$")
PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
HOST_KEY_RE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp(?:256|384|521)|ssh-rsa|"
                         r"sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) "
                         r"([A-Za-z0-9+/]+={0,3})(?: [^\n]*)?$")
REMOTE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/+-]+$")
ARCHIVE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.(?:tar\.gz|whl|zip)$")
REMOTE_DIR_RE = re.compile(r"^/tmp/pcp-shepherd\.[A-Za-z0-9]{6,}$")
CREDENTIALS = "credentials.json"
SSH_FAILED = 255  # ssh's own exit status: connection, authentication or host key failure


def bootstrap_dir() -> Path:
    """infra/bootstrap/shepherd of the checkout this CLI runs from."""
    return Path(__file__).resolve().parents[2] / "infra" / "bootstrap" / "shepherd"


def known_hosts_line(host: str, port: int, key: str) -> str:
    """A known_hosts line pinning `key` for host (and port, as ssh writes non-22 ports)."""
    name = host.rsplit("@", 1)[-1]
    match = HOST_KEY_RE.match(key.strip())
    if match is None:
        fail("--host-key must be 'TYPE BASE64' as in the Mac's /etc/ssh/ssh_host_*_key.pub, "
             "e.g. 'ssh-ed25519 AAAA...'", EXIT_USAGE)
    pattern = name if port == 22 else f"[{name}]:{port}"
    return f"{pattern} {match.group(1)} {match.group(2)}\n"


def remote(argv: Sequence[str]) -> str:
    """The remote command line: each argument checked by the caller, then quoted."""
    return " ".join(shlex.quote(a) for a in argv)


def payload(directory: Path, archive: Path, credentials: Path | None) -> bytes:
    """The tar stream copied to the Mac: the script, the plist, the agent, the credentials."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        files = [(directory / "install.sh", "install.sh", 0o755),
                 (directory / f"{LABEL}.plist", f"{LABEL}.plist", 0o644),
                 (archive, archive.name, 0o644)]
        if credentials is not None:
            files.append((credentials, CREDENTIALS, 0o600))
        for path, name, mode in files:
            data = path.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Ssh:
    """`ssh` with the host key pinned, batch mode, and an argument list."""

    def __init__(self, host: str, port: int, known_hosts: Path, identity: str | None,
                 ssh: str) -> None:
        self.host = host
        self.base = [ssh, "-p", str(port),
                     "-o", "BatchMode=yes",
                     "-o", "StrictHostKeyChecking=yes",
                     "-o", f"UserKnownHostsFile={known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null",
                     "-o", "UpdateHostKeys=no",
                     "-o", "ConnectTimeout=20",
                     "-o", "ServerAliveInterval=15"]
        if identity is not None:
            self.base += ["-i", identity, "-o", "IdentitiesOnly=yes"]

    def run(self, argv: Sequence[str], stdin: bytes | None = None, what: str = "",
            capture: bool = False) -> str:
        """Run `argv` on the Mac; its stderr goes to ours. Fails in one line."""
        cmd = [*self.base, "--", self.host, remote(argv)]
        done = subprocess.run(cmd, input=stdin if stdin is not None else b"",
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE, timeout=1800, check=False)
        err = done.stderr.decode(errors="replace")
        if done.returncode == SSH_FAILED and ("Host key verification failed" in err or
                                              "REMOTE HOST IDENTIFICATION HAS CHANGED" in err):
            fail(f"the host key of {self.host} does not match the pinned one: refusing to "
                 "connect (check --known-hosts/--host-key against the Mac's "
                 "/etc/ssh/ssh_host_ed25519_key.pub)")
        if err:
            click.echo(err, err=True, nl=False)
        if done.returncode == SSH_FAILED:
            last = err.strip().splitlines()[-1] if err.strip() else "no message"
            fail(f"ssh to {self.host} failed while {what}: {last}")
        if done.returncode != 0:
            fail(f"{what} failed on {self.host} (exit status {done.returncode})")
        return done.stdout.decode(errors="replace") if capture else ""


@click.group(cls=PcpGroup)
def shepherd() -> None:
    """The shepherd daemon on the head-node Mac."""


@shepherd.command("install")
@click.option("--ssh", "host", required=True, metavar="[USER@]HOST", help="the Mac")
@click.option("--port", type=click.IntRange(1, 65535), default=22, show_default=True)
@click.option("--identity", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="SSH private key (default: ssh's own choice)")
@click.option("--known-hosts", type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="a known_hosts file that pins the Mac's host key")
@click.option("--host-key", metavar="'TYPE KEY'",
              help="the Mac's host public key itself, e.g. 'ssh-ed25519 AAAA...'")
@click.option("--stack", envvar="PCP_STACK", default="tiny", show_default=True,
              help="the stack this Mac serves [env PCP_STACK]")
@click.option("--project", envvar="PCP_PROJECT", required=True,
              help="Google Cloud project [env PCP_PROJECT]")
@click.option("--agent", "archive", required=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False),
              help="the agent distribution to install (pcp-agent-*.tar.gz, or a wheel)")
@click.option("--key", "credentials", type=click.Path(exists=True, dir_okay=False),
              metavar="FILE", help="credential file to install (a service account key or a "
              "workload identity federation configuration); default: keep the installed one")
@click.option("--python", metavar="PATH", help="Python 3.11+ on the Mac (default: install.sh "
              "looks in the usual places)")
@click.option("--sudo/--no-sudo", default=True, show_default=True,
              help="run install.sh with `sudo -n` (the SSH user needs passwordless sudo); "
              "--no-sudo when connecting as root")
@click.option("--shell", "remote_shell", default="/bin/sh", show_default=True, metavar="PATH",
              help="the POSIX shell on the Mac that runs install.sh")
def install(host: str, port: int, identity: str | None, known_hosts: str | None,
            host_key: str | None, stack: str, project: str, archive: str,
            credentials: str | None, python: str | None, sudo: bool,
            remote_shell: str) -> None:
    """Install or upgrade the shepherd daemon on the Mac over SSH (between runs: it restarts
    the agent, which stops a binary that is running)."""
    if not HOST_RE.match(host):
        fail(f"--ssh {host!r} must be HOST or USER@HOST (a DNS name or an IPv4 address)",
             EXIT_USAGE)
    if stack not in STACKS or not STACK_RE.match(stack):
        fail(f"unknown stack {stack!r}: use one of {', '.join(STACKS)}", EXIT_USAGE)
    if not PROJECT_RE.match(project):
        fail(f"--project {project!r} is not a Google Cloud project id", EXIT_USAGE)
    if (known_hosts is None) == (host_key is None):
        fail("pin the Mac's host key with exactly one of --known-hosts FILE or --host-key "
             "'TYPE KEY' (host key checking is never turned off)", EXIT_USAGE)
    for name, value in (("--python", python), ("--shell", remote_shell)):
        if value is not None and not REMOTE_PATH_RE.match(value):
            fail(f"{name} {value!r} must be an absolute path of [A-Za-z0-9._/+-]", EXIT_USAGE)
    agent = Path(archive)
    if not ARCHIVE_RE.match(agent.name):
        fail(f"--agent {agent.name!r} must be a .tar.gz, .whl or .zip with a plain name",
             EXIT_USAGE)
    directory = bootstrap_dir()
    if not (directory / "install.sh").is_file():
        fail(f"install.sh is not at {directory}: run pcp from a checkout of the repository")
    ssh_bin = shutil.which("ssh")
    if ssh_bin is None:
        fail("ssh is not installed (OpenSSH client)")
    data = payload(directory, agent, Path(credentials) if credentials else None)

    with tempfile.TemporaryDirectory(prefix="pcp-ssh-") as tmp:
        if host_key is not None:
            pinned = Path(tmp) / "known_hosts"
            pinned.write_text(known_hosts_line(host, port, host_key))
        else:
            assert known_hosts is not None
            pinned = Path(known_hosts)
        ssh = Ssh(host, port, pinned.resolve(), identity, ssh_bin)
        made = ssh.run(["mktemp", "-d", "/tmp/pcp-shepherd.XXXXXXXX"], what="making a "
                       "directory", capture=True).strip()
        if not REMOTE_DIR_RE.match(made):
            fail(f"unexpected answer from mktemp on {host}: {made[:80]!r}")
        try:
            ssh.run(["tar", "-x", "-f", "-", "-C", made], stdin=data,
                    what="copying the agent and install.sh")
            argv = [remote_shell, f"{made}/install.sh", "--stack", stack, "--project", project,
                    "--source", f"{made}/{agent.name}"]
            if credentials:
                argv += ["--key", f"{made}/{CREDENTIALS}"]
            if python:
                argv += ["--python", python]
            if sudo:
                argv = ["sudo", "-n", *argv]
            click.echo(f"installing the shepherd of stack {stack} on {host} "
                       f"({agent.name})", err=True)
            ssh.run(argv, what="install.sh")
        finally:
            try:
                ssh.run(["rm", "-rf", made], what="removing the copied files")
            except click.ClickException as e:
                click.echo(f"pcp: warning: {e.format_message()}; remove {made} on {host}",
                           err=True)
    click.echo(f"the shepherd daemon of stack {stack} is installed on {host}: "
               f"`sudo launchctl print system/{LABEL}` there shows it")
