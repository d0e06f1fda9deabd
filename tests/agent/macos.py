"""A pretend Mac for running infra/bootstrap/shepherd/install.sh under dash.

There is no launchd here, so the commands only macOS has (launchctl, plutil) and the ones whose
answer must look like a Mac's (uname, id, chown to root:wheel) are small stand-in scripts on
PATH that record their arguments. Everything else is real: dash runs the script, which really
creates directories, copies the credential file, renders and writes the plist under a fake
root (PCP_INSTALL_ROOT). `--python` names a stand-in interpreter whose venv "python" records
the pip commands, so the test shows what would be installed without reaching an index.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "infra" / "bootstrap" / "shepherd" / "install.sh"
LABEL = "dev.pcp.shepherd"

# Each stand-in appends "<name> <args...>" to $PCP_TEST_CALLS.
RECORD = 'printf "%s\\n" "$(basename "$0") $*" >>"$PCP_TEST_CALLS"\n'
STANDINS = {
    "uname": "#!/bin/sh\n" + RECORD + "echo Darwin\n",
    "id": '#!/bin/sh\nif [ "${1:-}" = -u ]; then echo 0; else exec /usr/bin/id "$@"; fi\n',
    "chown": "#!/bin/sh\n" + RECORD,
    # launchd's state is one file: the job is loaded while it exists.
    "launchctl": "#!/bin/sh\n" + RECORD + """\
state="$PCP_TEST_STATE/launchd-loaded"
case $1 in
  print) [ -f "$state" ] ;;
  bootstrap) : >"$state" ;;
  bootout) rm -f "$state" ;;
  enable) : ;;
  *) exit 64 ;;
esac
""",
    "plutil": f"#!{sys.executable}\n" + """\
import os, plistlib, sys
with open(os.environ["PCP_TEST_CALLS"], "a") as f:
    f.write("plutil " + " ".join(sys.argv[1:]) + "\\n")
assert sys.argv[1] == "-lint"
with open(sys.argv[2], "rb") as f:
    plistlib.load(f)
print(sys.argv[2] + ": OK")
""",
    # A Python 3.11+ whose venvs hold a recording "python".
    "python3-standin": "#!/bin/sh\n" + RECORD + """\
if [ "${1:-}" = -m ] && [ "${2:-}" = venv ]; then
  mkdir -p "$3/bin"
  printf '#!/bin/sh\\nprintf "%%s\\\\n" "venv-python $*" >>"$PCP_TEST_CALLS"\\n' >"$3/bin/python"
  chmod +x "$3/bin/python"
fi
exit 0
""",
}


def require_tool(name: str) -> str:
    """The tool's path; skip without it, fail when PCP_REQUIRE_EMULATORS=1 (CI)."""
    found = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                   else None)
    if found:
        return found
    message = f"{name} is not installed (apt-get install {PACKAGES.get(name, name)})"
    if os.environ.get("PCP_REQUIRE_EMULATORS") == "1":
        pytest.fail(f"{message}; PCP_REQUIRE_EMULATORS=1", pytrace=False)
    pytest.skip(message)


PACKAGES = {"dash": "dash", "sshd": "openssh-server", "ssh": "openssh-client",
            "ssh-keygen": "openssh-client", "shellcheck": "shellcheck"}


@dataclass
class Mac:
    """The pretend Mac: stand-ins, a fake root, the call record, launchd's state."""

    base: Path

    @property
    def bin(self) -> Path:
        return self.base / "bin"

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def calls_file(self) -> Path:
        return self.base / "calls.log"

    @property
    def python(self) -> Path:
        return self.bin / "python3-standin"

    @property
    def plist(self) -> Path:
        return self.root / "Library" / "LaunchDaemons" / f"{LABEL}.plist"

    @property
    def key(self) -> Path:
        return self.root / "etc" / "pcp" / "shepherd-key.json"

    def setup(self) -> Mac:
        self.bin.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(exist_ok=True)
        for name, text in STANDINS.items():
            path = self.bin / name
            path.write_text(text)
            path.chmod(0o755)
        return self

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.base),
                "PCP_INSTALL_ROOT": str(self.root), "PCP_TEST_CALLS": str(self.calls_file),
                "PCP_TEST_STATE": str(self.base)}

    def calls(self) -> list[str]:
        return self.calls_file.read_text().splitlines() if self.calls_file.exists() else []

    @property
    def loaded(self) -> bool:
        return (self.base / "launchd-loaded").exists()

    def written(self) -> list[str]:
        """Every file under the fake root, relative to it."""
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())

    def install(self, *args: str, shell: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run install.sh under dash (or `shell`) with these arguments."""
        return subprocess.run([shell or require_tool("dash"), str(INSTALL), *args],
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env(), cwd=self.base, check=False)
