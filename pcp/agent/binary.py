"""Turn the assignment's `binary` into an argument-list prefix: realise it via Nix if needed.

Accepted forms (docs/agent.md):
- a flake reference (`github:org/repo#trainer`, `path:/src#trainer`, `git+file:///src#trainer`;
  anything with `#` or a URL-like `scheme:`): `nix build --no-link --json REF` (the output paths
  are read from its JSON, which Nix 2.8 and later print alike; `--print-out-paths` came only in
  2.9), then the single executable in `<out>/bin` (or `REF!program` to name it);
- a Nix store path (`/nix/store/...`, optionally ending in `/bin/<program>`, or `PATH!program`):
  `nix-store --realise PATH`, then the same lookup;
- a map platform -> one of the above (`x86_64-linux` on workers, `aarch64-darwin` on the Mac);
- an absolute path to an executable file (local replica, tests);
- `python:<module>` or `python:/abs/path/script.py`: run the module or script with the agent's own
  interpreter (local replica and tests only; the reference trainer is
  `examples/reference-trainer/reference_trainer.py`);
- `torchrun:<target>`: a stock torchrun script, module or program, started under torchrun on
  the workers (pcp/agent/torchrun.py); the target is one of the forms above
  (`pcp.core.messages.torchrun_target` checks it), realised the same way.

Nix is always invoked with an argument list, never through a shell, in its own process group.
A stop while Nix runs sends SIGTERM to that group, waits `grace` seconds, then SIGKILLs it: as
root Nix builds in the caller's process tree, and only SIGTERM makes it stop its builder (a
SIGKILLed `nix` leaves the builder running). Where Nix lives is configurable (`--nix-bin-dir`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

from pcp.core.errors import PermanentError
from pcp.core.messages import TORCHRUN_PREFIX, torchrun_target

NOT_REALISED = 127  # the shell's "command not found": the node's exit code when this fails
STORE_DIR = "/nix/store/"
# Where the multi-user installer puts nix; systemd and launchd do not have it on PATH.
DEFAULT_NIX_DIRS = ("/nix/var/nix/profiles/default/bin", "/run/current-system/sw/bin")
MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
PROGRAM_RE = re.compile(r"^[A-Za-z0-9._+-]+$")
SCHEME_RE = re.compile(r"^[a-z][a-z0-9+.-]*:")
MACHINES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}

Kind = Literal["python", "path", "store", "flake"]


class BinaryError(Exception):
    """The binary cannot be realised; the node writes `done` with exit code 127."""


@dataclass(frozen=True)
class Plan:
    """What to do for a binary spec: pure, so the choice is testable without Nix."""

    kind: Kind
    target: str  # module, path, store path (root) or flake reference
    program: str | None = None  # executable name under <out>/bin, when given
    subpath: str = ""  # for a store path like /nix/store/x/bin/y: "bin/y"
    torchrun: bool = False  # a `torchrun:` binary: the target runs under torchrun


def host_platform(machine: str | None = None, sys_platform: str | None = None) -> str:
    """Nix's name for this host, e.g. x86_64-linux or aarch64-darwin."""
    m = (machine or platform.machine()).lower()
    m = MACHINES.get(m, m)
    s = sys_platform or sys.platform
    system = "darwin" if s == "darwin" else "linux" if s.startswith("linux") else s
    return f"{m}-{system}"


def plan(spec: str | dict[str, str] | None, host: str) -> Plan:
    """Classify a binary spec; raise BinaryError with what to fix when it is unusable."""
    if spec is None:
        raise BinaryError("the assignment names no binary and the stack has no default "
                          "(set pcp:binary or pass binary in the start request)")
    if isinstance(spec, dict):
        if host not in spec:
            raise BinaryError(f"the binary map has no entry for this platform {host} "
                              f"(it has {', '.join(sorted(spec))})")
        spec = spec[host]
    spec = spec.strip()
    if spec.startswith(TORCHRUN_PREFIX):
        try:
            target = torchrun_target(spec)
        except PermanentError as e:
            raise BinaryError(str(e)) from None
        assert target is not None
        if (target.endswith(".py") and not target.startswith(STORE_DIR)) \
                or MODULE_RE.match(target):
            return replace(plan(f"python:{target}", host), torchrun=True)
        return replace(plan(target, host), torchrun=True)
    if spec.startswith("python:"):
        module = spec.removeprefix("python:")
        if module.startswith("/") and module.endswith(".py") and ".." not in Path(module).parts:
            return Plan("python", module)
        if not MODULE_RE.match(module):
            raise BinaryError(f"python:{module} is neither a dotted module name nor an "
                              "absolute path to a .py file")
        return Plan("python", module)
    target, program = spec, None
    if "!" in spec:
        target, _, program = spec.rpartition("!")
        if not PROGRAM_RE.match(program) or not target:
            raise BinaryError(f"{spec!r}: after '!' must come a program name under bin/")
    if target.startswith(STORE_DIR):
        parts = Path(target).parts  # ('/', 'nix', 'store', '<hash>-<name>', ...rest)
        if len(parts) < 4 or ".." in parts:
            raise BinaryError(f"{target!r} is not a Nix store path")
        return Plan("store", str(Path(*parts[:4])), program, "/".join(parts[4:]))
    if "#" in target or SCHEME_RE.match(target):
        return Plan("flake", target, program)
    if target.startswith("/") and program is None:
        return Plan("path", target)
    raise BinaryError(
        f"cannot tell what binary {spec!r} is: use a flake reference (github:org/repo#pkg), "
        "a Nix store path (/nix/store/...), a platform map of those, an absolute path to an "
        "executable, or python:<module>")


def find_nix(name: str, bin_dir: str | None) -> str:
    """The path of `nix` or `nix-store`; a clear error when Nix is not installed."""
    if bin_dir:
        candidate = Path(bin_dir) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
        raise BinaryError(f"{name} not found in --nix-bin-dir {bin_dir}")
    found = shutil.which(name)
    if found:
        return found
    for d in DEFAULT_NIX_DIRS:
        candidate = Path(d) / name
        if os.access(candidate, os.X_OK):
            return str(candidate)
    raise BinaryError(f"Nix is not installed ({name} is neither on PATH nor in "
                      f"{', '.join(DEFAULT_NIX_DIRS)}); the worker startup script installs it, "
                      "on the shepherd host see docs/agent.md")


def pick_program(out: Path, program: str | None) -> str:
    """The executable inside a realised output: named, or the only one in bin/."""
    if program is None and out.is_file() and os.access(out, os.X_OK):
        return str(out)
    bin_dir = out / "bin"
    if program is not None:
        exe = bin_dir / program
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
        raise BinaryError(f"{out} has no executable bin/{program}")
    found = sorted(p.name for p in bin_dir.iterdir()
                   if p.is_file() and os.access(p, os.X_OK)) if bin_dir.is_dir() else []
    if len(found) == 1:
        return str(bin_dir / found[0])
    if not found:
        raise BinaryError(f"{out} has no executable in bin/")
    raise BinaryError(f"{out}/bin has several executables ({', '.join(found)}); "
                      "name one with REF!program")


def build_outputs(stdout: str) -> list[Path]:
    """The output paths in `nix build --json`'s answer: `[{"outputs": {"out": PATH}}, ...]`."""
    try:
        results = json.loads(stdout)
        if not isinstance(results, list):
            raise TypeError(type(results).__name__)
        return [Path(path) for result in results
                for _, path in sorted(result["outputs"].items(), key=lambda kv: kv[0] != "out")
                if isinstance(path, str) and path.startswith("/")]
    except (ValueError, TypeError, KeyError, AttributeError):
        raise BinaryError(f"nix build printed no JSON list of outputs: {stdout[:200]!r}") from None


def stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group led by `proc`, wait up to `grace` s, then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass  # the whole group has exited
        try:
            proc.communicate(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig is signal.SIGTERM:
            try:  # Nix has exited; anything it left in its group (git, curl) goes too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


@dataclass
class Realiser:
    """Runs Nix for a plan. `cancelled` is polled so a stop or deadline aborts a long build."""

    nix_bin_dir: str | None = None
    host: str = ""
    log_to: IO[bytes] | None = None  # where Nix's progress goes (the node's stderr.log)
    cancelled: Callable[[], bool] = lambda: False
    grace: float = 20.0  # after SIGTERM, how long Nix has to stop its build before SIGKILL

    def realise(self, spec: str | dict[str, str] | None) -> list[str]:
        p = plan(spec, self.host or host_platform())
        if p.kind == "python":
            if p.target.startswith("/"):
                if not Path(p.target).is_file():
                    raise BinaryError(f"{p.target} is not a file")
                return [sys.executable, p.target]
            return [sys.executable, "-m", p.target]
        if p.kind == "path":
            if not (Path(p.target).is_file() and os.access(p.target, os.X_OK)):
                raise BinaryError(f"{p.target} is not an executable file")
            return [p.target]
        if p.kind == "flake":
            nix = find_nix("nix", self.nix_bin_dir)
            argv = [nix, "--extra-experimental-features", "nix-command flakes", "build",
                    "--no-link", "--json", p.target]
            outs = build_outputs(self._run(argv))
        else:
            argv = [find_nix("nix-store", self.nix_bin_dir), "--realise", p.target]
            outs = [Path(line) for line in self._run(argv).splitlines() if line.startswith("/")]
        if not outs:
            raise BinaryError(f"{argv[0]} printed no store path for {p.target}")
        if p.subpath:
            exe = outs[0] / p.subpath
            if not (exe.is_file() and os.access(exe, os.X_OK)):
                raise BinaryError(f"{exe} is not an executable file")
            return [str(exe)]
        errors = []
        for out in outs:  # a flake may print several outputs; the first with a program wins
            try:
                return [pick_program(out, p.program)]
            except BinaryError as e:
                errors.append(str(e))
        raise BinaryError("; ".join(errors))

    def _run(self, argv: list[str]) -> str:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=self.log_to, start_new_session=True)
        except OSError as e:
            raise BinaryError(f"cannot run {argv[0]}: {e}") from None
        while True:
            try:
                out, _ = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.cancelled():
                    stop_group(proc, self.grace)
                    raise BinaryError(f"{Path(argv[0]).name} stopped: the node was told "
                                      "to stop before the binary was realised") from None
        if proc.returncode != 0:
            raise BinaryError(f"{Path(argv[0]).name} {argv[-1]} failed with exit code "
                              f"{proc.returncode} (its output is in stderr.log)")
        return out.decode("utf-8", "replace")
