"""Build the two code archives the stack uploads. Both are deterministic (sorted entries, fixed
timestamps, modes and owners), and both skip `__pycache__` and `*.pyc`.

- `build_function_archive`: the Cloud Functions source, `functions/*` at the zip root plus the
  parts of the `pcp/` package the functions run (`FUNCTION_PARTS`: core, adapters, edge,
  service, settings, logs; never the agent, the CLI or the development-only `pcp_dev`), so an
  edit to the CLI does not redeploy the functions. Its SHA-256 (over the files' relative paths
  and bytes) goes into the uploaded object's name: a changed archive under an unchanged name
  would be uploaded but never redeployed (hashicorp/terraform-provider-google#1938).
- `build_agent_sdist`: a pip-installable source distribution of the agent's parts of `pcp`
  (`AGENT_PARTS`) with a generated pyproject.toml whose dependencies are the `agent` extra
  alone, which the worker startup script installs as the node agent.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

#: Directories and suffixes never shipped.
EXCLUDED_DIRS = frozenset({"__pycache__"})
EXCLUDED_SUFFIXES = (".pyc", ".pyo")

#: Files the function runtime needs at the archive root.
REQUIRED_ROOT_FILES = ("main.py", "requirements.txt")

#: What each deployed artifact holds of the `pcp` package (paths under pcp/; a directory means
#: all of it). docs/architecture.md says where each part runs; tests/infra checks the lists.
FUNCTION_PARTS = ("__init__.py", "core", "adapters", "edge", "service.py", "progress.py",
                  "settings.py", "logs.py")
AGENT_PARTS = ("__init__.py", "core", "adapters/__init__.py", "adapters/gcs_store.py", "agent",
               "logs.py")

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644 << 16


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts):
            continue
        if path.is_file() and not path.name.endswith(EXCLUDED_SUFFIXES):
            yield path


def archive_entries(repo_root: Path) -> list[tuple[str, Path]]:
    """(name in the archive, source file), sorted by name."""
    functions_dir = repo_root / "functions"
    package_dir = repo_root / "pcp"
    if not functions_dir.is_dir():
        raise FileNotFoundError(f"{functions_dir} does not exist")
    for name in REQUIRED_ROOT_FILES:
        if not (functions_dir / name).is_file():
            raise FileNotFoundError(f"{functions_dir / name} does not exist")
    if not (package_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir} is not a Python package")

    entries: dict[str, Path] = {}
    for path in _walk(functions_dir):
        rel = path.relative_to(functions_dir).as_posix()
        if rel == "pcp" or rel.startswith("pcp/"):
            raise ValueError(f"functions/{rel} would shadow the pcp package in the archive")
        entries[rel] = path
    for path in _parts(package_dir, FUNCTION_PARTS):
        entries["pcp/" + path.relative_to(package_dir).as_posix()] = path
    return sorted(entries.items())


def _parts(package_dir: Path, parts: tuple[str, ...]) -> Iterator[Path]:
    """The files of the named parts of a package (files, or directories walked whole)."""
    for part in parts:
        path = package_dir / part
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path


def _bytes(source: Path | bytes) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def content_hash(entries: list[tuple[str, Path | bytes]]) -> str:
    """SHA-256 over each entry's name and bytes (length-prefixed, so it is unambiguous)."""
    digest = hashlib.sha256()
    for name, path in entries:
        data = _bytes(path)
        encoded = name.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big") + encoded)
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def build_function_archive(repo_root: Path, out_dir: Path) -> tuple[Path, str]:
    """Write `functions-<sha256>.zip` into out_dir and return (path, sha256 hex).

    Older `functions-*.zip` archives in out_dir are removed (out_dir is a build cache).
    """
    repo_root = Path(repo_root)
    entries = archive_entries(repo_root)
    sha = content_hash(entries)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"functions-{sha}.zip"
    tmp = target.with_suffix(".zip.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path in entries:
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.external_attr = _FILE_MODE
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # unix, so the mode above is honoured
            zf.writestr(info, path.read_bytes())
    tmp.replace(target)
    for stale in out_dir.glob("functions-*.zip"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target, sha


def agent_sdist_entries(repo_root: Path) -> tuple[str, list[tuple[str, Path | bytes]]]:
    """(top directory `pcp-<version>`, [(name in the archive, source file)]), sorted by name."""
    pyproject = repo_root / "pyproject.toml"
    package_dir = repo_root / "pcp"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject} does not exist")
    if not (package_dir / "__init__.py").is_file():
        raise FileNotFoundError(f"{package_dir} is not a Python package")
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    top = f"{project['name']}-{project['version']}"
    entries: list[tuple[str, Path | bytes]] = [(f"{top}/pyproject.toml", agent_pyproject(project))]
    readme = project.get("readme")
    if isinstance(readme, str) and (repo_root / readme).is_file():
        entries.append((f"{top}/{readme}", repo_root / readme))
    for path in _parts(package_dir, AGENT_PARTS):
        entries.append((f"{top}/pcp/" + path.relative_to(package_dir).as_posix(), path))
    return top, sorted(entries, key=lambda e: e[0])


def agent_pyproject(project: dict) -> bytes:
    """The agent distribution's pyproject.toml: the repository's name and version, the `agent`
    extra as its only dependencies, and the agent's packages listed explicitly."""
    deps = project.get("optional-dependencies", {}).get("agent", [])
    packages = sorted({"pcp", "pcp.core", "pcp.adapters", "pcp.agent"})
    lines = [
        "# Generated by infra/pcp_infra/packaging.py: the node agent's parts of pcp only.",
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {json.dumps(project['name'])}",
        f"version = {json.dumps(project['version'])}",
        f"requires-python = {json.dumps(project.get('requires-python', '>=3.11'))}",
        f"dependencies = {json.dumps(deps)}",
        "",
        "[tool.setuptools]",
        f"packages = {json.dumps(packages)}",
        "",
    ]
    return "\n".join(lines).encode()


def build_agent_sdist(repo_root: Path, out_dir: Path) -> tuple[Path, str]:
    """Write `pcp-agent-<sha256>.tar.gz` into out_dir and return (path, sha256 hex).

    The hash is `content_hash` over the entries (plus the generated PKG-INFO), so it does not
    depend on gzip or tar details. Older `pcp-agent-*.tar.gz` in out_dir are removed.
    """
    repo_root = Path(repo_root)
    top, entries = agent_sdist_entries(repo_root)
    name, version = top.rsplit("-", 1)
    pkg_info = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    sha = content_hash(entries)
    sha = hashlib.sha256(sha.encode() + pkg_info).hexdigest()

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"pcp-agent-{sha}.tar.gz"
    tmp = target.with_suffix(".gz.tmp")
    files = sorted([(f"{top}/PKG-INFO", pkg_info)] + [(n, _bytes(p)) for n, p in entries])
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for arcname, data in files:
                    info = tarfile.TarInfo(arcname)
                    info.size = len(data)
                    info.mtime = 0
                    info.mode = 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
    tmp.replace(target)
    for stale in out_dir.glob("pcp-agent-*.tar.gz"):
        if stale != target:
            stale.unlink(missing_ok=True)
    return target, sha
