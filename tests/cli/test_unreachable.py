"""A backend that stops answering during `pcp watch` is said in seconds, and the view goes on
when it answers again (issue 16, item 2).

The bucket is fake-gcs-server behind a TCP relay the test controls; "dead" means the relay
still accepts connections (so a connect check passes, as with a hung or black-holed Cloud
Storage endpoint) but never answers a byte, on new and on kept-alive connections alike.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pcp.adapters.gcs_store import GcsStore
from pcp.cli.context import unreachable
from tests.cli.conftest import POLICY, T0, Stack

pytestmark = [pytest.mark.cli, pytest.mark.emulator]

REPO = Path(__file__).resolve().parents[2]


class Relay:
    """127.0.0.1:port -> upstream, until `dead` is set: then it swallows every byte."""

    def __init__(self, upstream: str) -> None:
        url = urlsplit(upstream)
        self.upstream = (url.hostname or "127.0.0.1", url.port or 80)
        self.dead = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.sockets: list[socket.socket] = []

    def start(self) -> Relay:
        self._spawn(self._accept)
        return self

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.sockets.append(client)
            self._spawn(self._relay, client)

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self.sockets.append(upstream)
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, client)
        while not self.stopping.is_set():
            for key, _ in sel.select(0.2):
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                except OSError:
                    return
                if not data:
                    return
                if not self.dead.is_set():
                    key.data.sendall(data)

    def stop(self) -> None:
        self.stopping.set()
        self.server.close()
        for s in self.sockets:
            s.close()
        for t in self.threads:
            t.join(2)


@pytest.fixture
def relay(gcs_bucket) -> Iterator[Relay]:
    r = Relay(gcs_bucket.endpoint).start()
    try:
        yield r
    finally:
        r.stop()


def test_a_backend_that_stops_answering_is_said_in_seconds_and_the_wait_goes_on(
        tmp_path, gcs_bucket, relay) -> None:
    store = GcsStore(gcs_bucket.name, client=gcs_bucket.client)
    stack = Stack(store=store)  # type: ignore[arg-type]
    stack.start("r-hang")
    (tmp_path / "tiny.json").write_text(json.dumps({
        "stack": "tiny", "project": "pcp-test", "bucket": gcs_bucket.name,
        "storage_endpoint": f"http://127.0.0.1:{relay.port}",
        "pubsub_host": f"127.0.0.1:{relay.port}"}))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PCP_") and k not in ("STORAGE_EMULATOR_HOST",)}
    env.update({"PCP_LOCAL_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"})
    proc = subprocess.Popen([sys.executable, "-m", "pcp.cli", "watch", "r-hang", "--poll",
                             "0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_for(text: str, within: float) -> float:
        start = time.monotonic()
        while not any(text in line for line in lines):
            assert proc.poll() is None or reader.is_alive(), "\n".join(lines)
            assert time.monotonic() - start < within, f"no {text!r}:\n" + "\n".join(lines)
            time.sleep(0.05)
        return time.monotonic() - start

    try:
        wait_for("run r-hang: starting", 30)
        relay.dead.set()
        took = wait_for("cannot reach the stack bucket", 20)
        line = next(line for line in lines if "cannot reach" in line)
        assert f"gs://{gcs_bucket.name} at http://127.0.0.1:{relay.port}" in line
        assert "(last error: " in line and "retrying" in line and "pcp doctor" in line
        relay.dead.clear()
        wait_for("the backend answers again", 30)
        for node in POLICY.node_names:
            stack.marker("r-hang", node, "booted", T0 + timedelta(minutes=1))
            stack.marker("r-hang", node, "done", T0 + timedelta(minutes=2), exit_code=0,
                         duration_s=60.0)
        assert proc.wait(60) == 0, "\n".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reader.join(5)
    assert any("run r-hang: succeeded" in line for line in lines), "\n".join(lines)
    # A read times out after READ_TIMEOUT_S (5 s), not the library's 60 s and 120 s.
    assert took < 15, took


def test_what_counts_as_an_unanswered_backend() -> None:
    import requests
    from google.api_core import exceptions as api

    from pcp.cli.context import ReplicaDown

    assert unreachable(requests.exceptions.ReadTimeout("read timed out"))
    assert unreachable(requests.exceptions.ConnectionError("refused"))
    assert unreachable(api.ServiceUnavailable("503"))
    assert unreachable(TimeoutError())
    assert not unreachable(api.Forbidden("403"))  # an answer: a refusal, said as it is
    assert not unreachable(ValueError("a bug"))
    assert not unreachable(ReplicaDown("gone"))
