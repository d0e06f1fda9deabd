"""The emulator launchers (pcp/local/emulators.py) that the tests and the local replica share.

Checked here: clients bound to an explicit endpoint ignore the process environment, object
notifications flow from fake-gcs-server into the Pub/Sub emulator, push subscriptions
deliver over HTTP, a failed start reports the server's own words, and stop leaves no process.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import sys
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from threading import Thread

import pytest

from pcp_dev.local import emulators
from pcp_dev.local.emulators import (
    EmulatorFailed,
    EmulatorMissing,
    FakeGcs,
    PubSubEmulator,
    ensure_subscription,
    ensure_topic,
    publisher,
    storage_client,
    subscriber,
)
from tests.conftest import TEST_PROJECT, GcsBucket

pytestmark = pytest.mark.adapters


def refuses(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_free_port_is_bindable() -> None:
    port = emulators.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        assert s.getsockname()[1] == port


def test_missing_java_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmulatorMissing, match="openjdk-17-jre-headless"):
        PubSubEmulator().start()


def test_missing_gcloud_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CLOUDSDK_ROOT_DIR", raising=False)
    monkeypatch.delenv(emulators.JAR_ENV, raising=False)
    with pytest.raises(EmulatorMissing, match="pubsub-emulator"):
        emulators.pubsub_jar()


def test_jar_override_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(emulators.JAR_ENV, str(tmp_path / "nope.jar"))
    with pytest.raises(EmulatorMissing, match=emulators.JAR_ENV):
        emulators.pubsub_jar()


def test_notifications_need_a_pubsub_host() -> None:
    with pytest.raises(ValueError, match="pubsub_host"):
        FakeGcs(notify_project=TEST_PROJECT, notify_topic="pcp-x-markers")


@pytest.mark.emulator
def test_a_taken_port_is_refused_before_launch(fake_gcs: FakeGcs) -> None:
    """The readiness probe would be answered by the other server, so check first."""
    with pytest.raises(EmulatorFailed, match="already in use"):
        FakeGcs(port=fake_gcs.port).start()


@pytest.mark.emulator
def test_start_failure_carries_stderr(fake_gcs: FakeGcs) -> None:
    class Broken(FakeGcs):
        def argv(self, port: int) -> list[str]:
            return [*super().argv(port), "-no-such-flag"]

    with pytest.raises(EmulatorFailed, match="fake-gcs-server exited") as info:
        Broken().start()
    assert "no-such-flag" in str(info.value)


def test_readiness_timeout_stops_the_process() -> None:
    process = emulators._Process(
        "sleeper", [sys.executable, "-c", "import sys, time; print('waiting', "
                    "file=sys.stderr, flush=True); time.sleep(60)"])
    process.start()
    with pytest.raises(EmulatorFailed, match=r"sleeper not ready after .*waiting"):
        process.wait_ready(lambda: False, timeout=0.5)
    assert not process.running


@pytest.mark.emulator
def test_fake_gcs_stop_leaves_nothing(fake_gcs: FakeGcs) -> None:
    server = FakeGcs().start()
    assert server._process is not None and server._process.proc is not None
    pid = server._process.proc.pid
    assert server.running and not refuses(server.port)
    server.stop()
    assert not server.running
    assert pid_gone(pid)
    assert refuses(server.port)


@pytest.mark.emulator
def test_storage_client_ignores_the_env(gcs_bucket: GcsBucket,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # discard port
    client = storage_client(gcs_bucket.endpoint, TEST_PROJECT)
    client.bucket(gcs_bucket.name).blob("a.txt").upload_from_string(b"x")
    assert [b.name for b in client.list_blobs(gcs_bucket.name)] == ["a.txt"]


@pytest.mark.emulator
def test_pubsub_clients_ignore_the_env(pubsub_emulator: PubSubEmulator,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")
    name = f"t-{uuid.uuid4().hex[:8]}"
    topic = ensure_topic(pubsub_emulator.host, TEST_PROJECT, name)
    assert ensure_topic(pubsub_emulator.host, TEST_PROJECT, name) == topic  # idempotent
    sub = ensure_subscription(pubsub_emulator.host, TEST_PROJECT, f"{name}-sub", name)
    assert ensure_subscription(pubsub_emulator.host, TEST_PROJECT, f"{name}-sub", name) == sub
    pub = publisher(pubsub_emulator.host)
    pub.publish(topic, b"hi", k="v").result(timeout=30)
    pub.stop()
    client = subscriber(pubsub_emulator.host)
    try:
        got = client.pull(subscription=sub, max_messages=5, timeout=10).received_messages
    finally:
        client.close()
    assert [(m.message.data, dict(m.message.attributes)) for m in got] == [(b"hi", {"k": "v"})]


@pytest.mark.emulator
def test_subscription_filter_is_recorded(pubsub_emulator: PubSubEmulator) -> None:
    """The filter reaches the subscription. The emulator (0.8.x) stores filters but does not
    apply them, so delivery filtering is production-only and not asserted here."""
    name = f"f-{uuid.uuid4().hex[:8]}"
    ensure_topic(pubsub_emulator.host, TEST_PROJECT, name)
    sub = ensure_subscription(pubsub_emulator.host, TEST_PROJECT, f"{name}-sub", name,
                              filter='attributes.role = "shepherd"', ack_deadline=30)
    client = subscriber(pubsub_emulator.host)
    try:
        got = client.get_subscription(subscription=sub)
    finally:
        client.close()
    assert got.filter == 'attributes.role = "shepherd"'
    assert got.ack_deadline_seconds == 30
    assert got.topic == f"projects/{TEST_PROJECT}/topics/{name}"


@pytest.fixture
def push_sink() -> Iterator[tuple[str, queue.Queue[dict[str, object]]]]:
    """An HTTP endpoint on a free loopback port that records each pushed body."""
    bodies: queue.Queue[dict[str, object]] = queue.Queue()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            length = int(self.headers.get("Content-Length", 0))
            bodies.put(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", bodies
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.emulator
def test_gcs_notifications_are_pushed(pubsub_emulator: PubSubEmulator,
                                      push_sink: tuple[str, queue.Queue[dict[str, object]]]
                                      ) -> None:
    """The local replica's marker path: object finalize -> topic -> push subscription."""
    url, bodies = push_sink
    name = f"n-{uuid.uuid4().hex[:8]}"
    ensure_topic(pubsub_emulator.host, TEST_PROJECT, name)
    ensure_subscription(pubsub_emulator.host, TEST_PROJECT, f"{name}-push", name,
                        push_endpoint=url, ack_deadline=10)
    with FakeGcs(notify_project=TEST_PROJECT, notify_topic=name, notify_prefix="markers/",
                 pubsub_host=pubsub_emulator.host) as gcs:
        client = storage_client(gcs.endpoint, TEST_PROJECT)
        bucket = client.create_bucket("pcp-notify-test")
        bucket.blob("runs/r1/worker-0/stdout.log").upload_from_string(b"not notified")
        bucket.blob("markers/r1/worker-0/done.json").upload_from_string(b"{}")
        body = bodies.get(timeout=20)
        message = body["message"]
        assert isinstance(message, dict)
        attributes = message["attributes"]
        assert attributes["eventType"] == "OBJECT_FINALIZE"
        assert attributes["payloadFormat"] == "JSON_API_V1"
        assert attributes["bucketId"] == "pcp-notify-test"
        assert attributes["objectId"] == "markers/r1/worker-0/done.json"
        with pytest.raises(queue.Empty):  # the log upload raised nothing
            bodies.get(timeout=0.5)


@pytest.mark.emulator
def test_pubsub_emulator_stop_leaves_nothing(pubsub_emulator: PubSubEmulator) -> None:
    """Its own instance (the session one must live on): stop kills java and frees the port."""
    emulator = PubSubEmulator(TEST_PROJECT).start()
    assert emulator._process is not None and emulator._process.proc is not None
    pid = emulator._process.proc.pid
    assert not refuses(emulator.port)
    emulator.stop()
    assert pid_gone(pid)
    assert refuses(emulator.port)
