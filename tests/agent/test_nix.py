"""The binary from real Nix and a signed binary cache, with the worker's own Nix configuration.

A stand-in for Cachix: a `file://` binary cache made by `nix copy` (signed with a key from
`nix-store --generate-binary-cache-key`, or not signed at all), served over HTTP on 127.0.0.1.
The Nix configuration is the one the worker startup script writes: `write_nix_config` of
`infra/bootstrap/worker-startup.sh` renders it from a metadata stand-in that gives the cache's
URL and key, and Nix reads it through `NIX_CONF_DIR`. The paths are tiny derivations whose
builder is a static busybox added to the store, so nothing needs nixpkgs or the network.

Needs root and Nix without a daemon (Debian's `nix-bin`, 2.8, is what this ran on) and
`busybox`; skips without them, and fails instead when PCP_REQUIRE_EMULATORS=1.

The store is the machine's /nix/store (Nix 2.8 has no practical private store for paths that
must run at their /nix/store address); every test makes paths with names and contents of its
own, and keeps Nix's configuration, its narinfo cache and HOME in its own directory. Two
settings of the written file are overridden for the run, through `NIX_CONFIG`: `substitute =
true` (Nix turns substitution off when it sees no network but loopback) and `min-free = 0`
(the worker's garbage-collection threshold must not collect the test machine's store);
`test_the_worker_configuration_is_what_nix_uses` checks the written values themselves.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pcp.agent.binary import BinaryError, Realiser, host_platform
from pcp.core.names import META_CACHIX_KEY, META_NIX_SUBSTITUTER
from pcp_dev.local.metadata import MetadataServer
from tests.agent.test_agent import Harness, assignments, harness, head, new_run, wait_for
from tests.conftest import require_emulator

pytestmark = [pytest.mark.agent]
__all__ = ["harness", "head"]  # fixtures of the agent tests, used here

REPO = Path(__file__).resolve().parents[2]
STARTUP = REPO / "infra" / "bootstrap" / "worker-startup.sh"
FEATURES = ("--extra-experimental-features", "nix-command flakes")
#: What the image's own /etc/nix/nix.conf stands for here: Debian's package turns the sandbox
#: off, no default cache (no network), and an experimental feature pcp.conf must keep. As root
#: with no daemon, Nix builds as root itself: no `nixbld` build users (Nix's default for root
#: names that group, which only Debian's nix-setup-systemd creates).
BASE_CONF = ("sandbox = false\nsubstituters =\nexperimental-features = ca-derivations\n"
             "build-users-group =\n")
RUN_OVERRIDES = "substitute = true\nmin-free = 0\n"


@pytest.fixture(scope="session")
def nix_tools() -> dict[str, str]:
    """Paths of nix, nix-store, busybox and git; skip (or fail in CI) when one is missing."""
    found = {name: shutil.which(name) for name in ("nix", "nix-store", "busybox", "git")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        require_emulator("real Nix", RuntimeError(
            f"{', '.join(missing)} not on PATH (apt-get install nix-bin busybox-static git)"))
    if os.geteuid() != 0:
        require_emulator("real Nix", RuntimeError("the Nix tests run as root (no daemon)"))
    return {name: str(path) for name, path in found.items()}


@pytest.fixture
def nix_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Nix's HOME, caches and user configuration in this test's own directory."""
    home = tmp_path / "home"
    for sub in ("cache", "config"):
        (home / sub).mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "cache"))  # the narinfo cache
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    monkeypatch.setenv("NIX_CONFIG", RUN_OVERRIDES)
    monkeypatch.delenv("NIX_CONF_DIR", raising=False)
    monkeypatch.delenv("NIX_USER_CONF_FILES", raising=False)
    return home


def run(argv: list[str], conf_dir: Path,
        nix_config: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIX_CONF_DIR": str(conf_dir)}
    if nix_config is not None:
        env["NIX_CONFIG"] = nix_config
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env,
                          check=False)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


class QuietHandler(SimpleHTTPRequestHandler):
    def do_GET(self) -> None:
        stall: threading.Event | None = self.server.stall  # type: ignore[attr-defined]
        if stall is not None and self.path.startswith("/nar/"):
            self.server.requests.append(self.path)  # type: ignore[attr-defined]
            stall.wait(30)  # a download that hangs, until the test lets it go
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        self.server.requests.append(self.path)  # type: ignore[attr-defined]


@dataclass
class Cache:
    """A binary cache directory served on 127.0.0.1, with its signing key (or none)."""

    root: Path
    key_name: str
    signed: bool = True
    server: ThreadingHTTPServer | None = None
    requests: list[str] = field(default_factory=list)
    stall: threading.Event | None = None  # set: NAR downloads hang until it is set

    @property
    def secret(self) -> Path:
        return self.root / "key.sec"

    @property
    def public(self) -> str:
        return (self.root / "key.pub").read_text().strip()

    @property
    def dir(self) -> Path:
        return self.root / "cache"

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self, conf_dir: Path) -> Cache:
        self.dir.mkdir(parents=True)
        # What any binary cache serves, Cachix included, before anything is pushed.
        (self.dir / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n"
                                                 "Priority: 41\n")
        ok(run(["nix-store", "--generate-binary-cache-key", self.key_name, str(self.secret),
                str(self.root / "key.pub")], conf_dir))
        handler = functools.partial(QuietHandler, directory=str(self.dir))
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.requests = self.requests  # type: ignore[attr-defined]
        self.server.stall = self.stall  # type: ignore[attr-defined]
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def push(self, path: str, conf_dir: Path) -> None:
        """`nix copy` the path's closure into the cache, signed when the cache is."""
        url = f"file://{self.dir}?compression=none"
        if self.signed:
            url += f"&secret-key={self.secret}"
        ok(run(["nix", *FEATURES, "copy", "--to", url, path], conf_dir))

    def stop(self) -> None:
        if self.stall is not None:
            self.stall.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@dataclass
class NixWorld:
    """One test's Nix: a build configuration, caches, and the worker's rendered configuration."""

    tmp: Path
    tools: dict[str, str]
    token: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    caches: list[Cache] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        # The developer's side: builds allowed, no substituter (it makes what the cache holds).
        self.build_conf = self.tmp / "build-conf"
        self.build_conf.mkdir()
        (self.build_conf / "nix.conf").write_text(BASE_CONF + "max-jobs = 1\n")

    def cache(self, name: str = "pcp-test-cache-1", signed: bool = True,
              stall: bool = False) -> Cache:
        cache = Cache(self.tmp / f"cache-{len(self.caches)}", name, signed,
                      stall=threading.Event() if stall else None)
        self.caches.append(cache)
        return cache.start(self.build_conf)

    def flake(self, name: str, body: str = "", sleep: bool = False) -> Path:
        """A flake whose packages.<host>.trainer prints `trained <token> <name> <args>`."""
        src = self.tmp / f"flake-{name}"
        (src / "tools").mkdir(parents=True)
        shutil.copy(self.tools["busybox"], src / "tools" / "busybox")
        bb = "${./tools}/busybox"
        build = (f"mkdir -p $out/bin; echo '#!{bb} sh' > $out/bin/trainer; "
                 f"echo 'echo trained {self.token} {name} \"$@\"' >> $out/bin/trainer; "
                 f"chmod +x $out/bin/trainer")
        if sleep:
            build = f"echo building {self.token}; sleep 300; " + build
        (src / "flake.nix").write_text(f"""{{
  outputs = {{ self }}: {{
    packages.{host_platform()}.trainer = builtins.derivation {{
      name = "pcp-test-{name}-{self.token}";
      system = "{host_platform()}";
      builder = "{bb}";
      PATH = "${{./tools}}";
      args = [ "sh" "-c" {json.dumps(build)} ];{body}
    }};
  }};
}}
""")
        return src

    def build(self, src: Path) -> str:
        """Build the flake's trainer here and return its output path."""
        out = ok(run(["nix", *FEATURES, "build", "--no-link", "--json",
                      f"path:{src}#trainer"], self.build_conf))
        return str(json.loads(out)[0]["outputs"]["out"])

    def forget(self, path: str) -> None:
        """Delete a built path from the local store, so only a cache can bring it back."""
        ok(run(["nix-store", "--delete", path], self.build_conf))
        assert not Path(path).exists()

    def worker_conf(self, substituter: str, key: str) -> Path:
        """The worker's configuration, written by the startup script from metadata."""
        conf = self.tmp / f"worker-conf-{uuid.uuid4().hex[:6]}"
        conf.mkdir()
        (conf / "nix.conf").write_text(BASE_CONF)
        attrs = {"pcp-bucket": "pcp-tiny-my-project", META_NIX_SUBSTITUTER: substituter,
                 META_CACHIX_KEY: key}
        with MetadataServer(lambda: attrs, "pcp-tiny-worker-0") as md:
            done = subprocess.run(
                ["bash", "-c", 'source "$1"; set -euo pipefail; write_nix_config "$2"', "boot",
                 str(STARTUP), str(conf)],
                capture_output=True, text=True, timeout=30, check=False,
                env={"PATH": "/usr/bin:/bin", "GCE_METADATA_HOST": md.host})
        assert done.returncode == 0, done.stderr
        return conf

    def realiser(self, conf: Path, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> Realiser:
        monkeypatch.setenv("NIX_CONF_DIR", str(conf))
        self.log = self.tmp / f"nix-{uuid.uuid4().hex[:6]}.log"
        self.logs.append(self.log.open("ab"))
        return Realiser(log_to=self.logs[-1], **kw)

    def nix_said(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        for cache in self.caches:
            cache.stop()
        for log in self.logs:
            log.close()


@pytest.fixture
def world(tmp_path: Path, nix_tools: dict[str, str], nix_home: Path) -> Iterator[NixWorld]:
    w = NixWorld(tmp_path, nix_tools)
    try:
        yield w
    finally:
        w.close()


def runs(prefix: list[str], *args: str) -> str:
    done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def published(world: NixWorld, name: str, cache: Cache) -> tuple[Path, str]:
    """A trainer built, pushed to `cache` and then deleted here: (flake source, out path)."""
    src = world.flake(name)
    out = world.build(src)
    cache.push(out, world.build_conf)
    world.forget(out)
    return src, out


# ---------------------------------------------------------------- the configuration itself


def test_the_worker_configuration_is_what_nix_uses(world: NixWorld) -> None:
    conf = world.worker_conf("http://127.0.0.1:9", "pcp-test-cache-1:"
                             "qgYYuDTXzpmXwM8GHb9NNqWe7kqmCprVRblDJpNcVws=")
    assert (conf / "nix.conf").read_text().endswith(f"!include {conf}/pcp.conf\n")
    # The file alone, without this run's overrides.
    # (Plain show-config: Nix 2.8 prints experimental features as numbers in its --json.)
    shown = ok(run(["nix", *FEATURES, "show-config"], conf, nix_config=""))
    settings = dict(line.split(" = ", 1) for line in shown.splitlines() if " = " in line)
    assert {"nix-command", "flakes", "ca-derivations"} <= set(
        settings["experimental-features"].split())
    assert settings["substituters"].split() == ["http://127.0.0.1:9"]
    assert "pcp-test-cache-1:qgYYuDTXzpmXwM8GHb9NNqWe7kqmCprVRblDJpNcVws=" in \
        settings["trusted-public-keys"].split()
    assert settings["narinfo-cache-negative-ttl"] == "0"
    assert settings["max-jobs"] == "0"
    assert settings["min-free"] == str(15 * 2**30) and settings["max-free"] == str(30 * 2**30)
    assert settings["require-sigs"] == "true"
    again = world.worker_conf("http://127.0.0.1:9", "k:AAAA")  # every boot rewrites it
    assert (again / "nix.conf").read_text().count("!include") == 1


# ---------------------------------------------------------------- a signed cache


def test_a_store_path_comes_from_the_signed_cache(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = world.cache()
    _, out = published(world, "storepath", cache)
    conf = world.worker_conf(cache.url, cache.public)
    prefix = world.realiser(conf, monkeypatch).realise(out)
    assert prefix == [f"{out}/bin/trainer"]
    assert runs(prefix, "--x") == f"trained {world.token} storepath --x"
    assert f"/{Path(out).name[:32]}.narinfo" in cache.requests
    assert world.realiser(conf, monkeypatch).realise(f"{out}/bin/trainer") == prefix


def test_flake_references_come_from_the_signed_cache_without_building(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = world.cache()
    src, out = published(world, "flake", cache)
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for step in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "trainer"]):
        ok(subprocess.run([*git, *step], capture_output=True, text=True, check=False))
    conf = world.worker_conf(cache.url, cache.public)
    refs: list[str | dict[str, str]] = [
        f"path:{src}#trainer",
        f"git+file://{src}#trainer",
        {host_platform(): f"path:{src}#trainer!trainer", "aarch64-darwin": "/nix/store/x-mac"},
    ]
    for ref in refs:
        if Path(out).exists():  # substituted by the previous reference
            world.forget(out)
        prefix = world.realiser(conf, monkeypatch).realise(ref)
        assert prefix == [f"{out}/bin/trainer"], ref
        assert runs(prefix) == f"trained {world.token} flake"
        said = world.nix_said()
        assert "from 'http://127.0.0.1" in said and "building '" not in said, said


# ---------------------------------------------------------------- what must be refused


@pytest.mark.parametrize("how", ["wrong key", "unsigned"])
def test_a_path_not_signed_by_the_trusted_key_is_refused_and_never_built(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    if how == "unsigned":
        cache, trusted = world.cache(signed=False), world.cache("pcp-other-1").public
    else:
        cache, trusted = world.cache("pcp-test-cache-1"), world.cache("pcp-test-cache-1").public
    src, out = published(world, how.replace(" ", "-"), cache)
    conf = world.worker_conf(cache.url, trusted)
    with pytest.raises(BinaryError, match="failed with exit code"):
        world.realiser(conf, monkeypatch).realise(out)
    assert "is not signed by any of the keys" in world.nix_said()
    # A flake would fall back to building it here; max-jobs = 0 forbids that.
    with pytest.raises(BinaryError, match="failed with exit code"):
        world.realiser(conf, monkeypatch).realise(f"path:{src}#trainer")
    said = world.nix_said()
    assert "is not signed by any of the keys" in said and "unable to start any build" in said
    assert not Path(out).exists()


def test_a_path_pushed_after_a_first_miss_is_found_at_once(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = world.cache()
    src = world.flake("late")
    out = world.build(src)
    world.forget(out)
    conf = world.worker_conf(cache.url, cache.public)
    with pytest.raises(BinaryError, match="failed with exit code"):
        world.realiser(conf, monkeypatch).realise(out)
    misses = cache.requests.count(f"/{Path(out).name[:32]}.narinfo")
    assert misses >= 1
    world.build(src)
    cache.push(out, world.build_conf)
    world.forget(out)
    # With Nix's default negative TTL (3600 s) this would still fail for an hour.
    prefix = world.realiser(conf, monkeypatch).realise(out)
    assert runs(prefix) == f"trained {world.token} late"


def test_an_unreachable_cache_fails_with_the_reason(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = world.cache()
    _, out = published(world, "unreachable", cache)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    conf = world.worker_conf(f"http://127.0.0.1:{closed}", cache.public)
    started = time.monotonic()
    with pytest.raises(BinaryError, match="failed with exit code"):
        world.realiser(conf, monkeypatch).realise(out)
    assert time.monotonic() - started < 60
    said = world.nix_said()
    assert f"unable to download 'http://127.0.0.1:{closed}/nix-cache-info'" in said, said


# ---------------------------------------------------------------- stopping


def builders(token: str) -> list[int]:
    """Processes whose command line carries this test's build token."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if f"building {token}".encode() in cmdline:
            found.append(int(pid))
    return found


def kill_builders(token: str) -> None:
    """Cleanup after a failure: each builder leads its own session, `sleep` included."""
    for pid in builders(token):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_stopping_a_node_stops_its_nix_build(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build (the shepherd host builds what is not cached) is stopped with its builder."""
    src = world.flake("slow", sleep=True)
    seen: list[int] = []

    def cancelled() -> bool:
        seen.extend(builders(world.token))
        return bool(seen)

    realiser = world.realiser(world.build_conf, monkeypatch, cancelled=cancelled, grace=10.0)
    started = time.monotonic()
    try:
        with pytest.raises(BinaryError, match="told to stop"):
            realiser.realise(f"path:{src}#trainer")
        assert seen, "the build never started"
        deadline = time.monotonic() + 5
        while builders(world.token) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert builders(world.token) == [], "the builder outlived the stop"
        assert time.monotonic() - started < 10, "Nix needed SIGKILL: SIGTERM did not stop it"
        assert "interrupted by the user" in world.nix_said()
    finally:
        kill_builders(world.token)


# ---------------------------------------------------------------- the agent as a process


def test_stopping_a_node_stops_a_hanging_download(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a worker (which never builds) the long part is the download from the cache."""
    cache = world.cache(stall=True)
    _, out = published(world, "download", cache)
    conf = world.worker_conf(cache.url, cache.public)

    def cancelled() -> bool:
        return any(r.startswith("/nar/") for r in cache.requests)

    started = time.monotonic()
    with pytest.raises(BinaryError, match="told to stop"):
        world.realiser(conf, monkeypatch, cancelled=cancelled, grace=10.0).realise(out)
    assert time.monotonic() - started < 10, "Nix needed SIGKILL: SIGTERM did not stop it"
    assert not Path(out).exists()


def test_a_worker_agent_runs_a_flake_from_the_signed_cache(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch, harness: Harness, head: int) -> None:
    cache = world.cache()
    src, out = published(world, "agent", cache)
    monkeypatch.setenv("NIX_CONF_DIR", str(world.worker_conf(cache.url, cache.public)))
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head, ("--steps", "3"),
                    binary={host_platform(): f"path:{src}#trainer"})[1]
    agent = harness.worker(a)
    assert agent.wait() == 0, agent.text()
    assert harness.marker(run_id, "worker-0", "done")["exit_code"] == 0  # type: ignore[index]
    stdout = (harness.get(f"runs/{run_id}/worker-0/stdout.log") or b"").decode()
    assert stdout.startswith(f"trained {world.token} agent worker --head-node=127.0.0.1:")
    stderr = (harness.get(f"runs/{run_id}/worker-0/stderr.log") or b"").decode()
    assert f"copying path '{out}' from 'http://127.0.0.1" in stderr


def test_sigterm_to_an_agent_during_a_nix_build_stops_the_build(
        world: NixWorld, monkeypatch: pytest.MonkeyPatch, harness: Harness, head: int) -> None:
    src = world.flake("agent-slow", sleep=True)
    monkeypatch.setenv("NIX_CONF_DIR", str(world.build_conf))  # a host that builds
    run_id = new_run()
    a = assignments(run_id, harness.stack, 1, head, binary=f"path:{src}#trainer")[1]
    agent = harness.worker(a)
    try:
        wait_for(lambda: builders(world.token), "the Nix build to start", timeout=30)
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.wait() == 0, agent.text()
        assert builders(world.token) == [], "the builder outlived the agent"
        assert harness.marker(run_id, "worker-0", "done") is None  # stopped before it ran
        assert not agent.poweroff.exists()  # whoever sent SIGTERM owns the VM's fate
    finally:
        kill_builders(world.token)
