"""The Bus contract (pcp/core/ports.py), one suite over MemoryBus and PubSubBus.

PubSubBus publishes into the Pub/Sub emulator; what arrives is pulled back from a
subscription on each of the stack's topics, so the topic mapping `pcp-<stack>-<kind>` is
checked by where messages land, not by inspecting the adapter.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from google.api_core.exceptions import DeadlineExceeded, NotFound
from google.cloud import pubsub_v1

from pcp.adapters.memory import MemoryBus
from pcp.adapters.pubsub_bus import PubSubBus
from pcp.core.ports import Bus
from pcp_dev.local.emulators import (
    PubSubEmulator,
    ensure_subscription,
    ensure_topic,
    publisher,
    subscriber,
)
from tests.conftest import TEST_PROJECT

pytestmark = pytest.mark.adapters

KINDS = ("start", "stop", "sweep", "shepherd")
Received = tuple[bytes, dict[str, str]]


@dataclass
class PubSubClients:
    host: str
    publisher: pubsub_v1.PublisherClient
    subscriber: pubsub_v1.SubscriberClient


@pytest.fixture(scope="module")
def pubsub_clients(pubsub_emulator: PubSubEmulator) -> Iterator[PubSubClients]:
    clients = PubSubClients(pubsub_emulator.host, publisher(pubsub_emulator.host),
                            subscriber(pubsub_emulator.host))
    yield clients
    clients.publisher.stop()
    clients.subscriber.close()


@dataclass
class Case:
    """A bus under test plus a way to read back what reached topic kind `kind`."""

    bus: Bus
    stack: str
    memory: MemoryBus | None = None
    clients: PubSubClients | None = None
    subscriptions: dict[str, str] = field(default_factory=dict)

    def received(self, kind: str, expect: int, wait: float = 10.0) -> list[Received]:
        if self.memory is not None:
            return [(d, a) for t, d, a in self.memory.messages if t == kind]
        assert self.clients is not None
        got: list[Received] = []
        deadline = time.monotonic() + wait
        # Keep pulling until `expect` arrived, then once more to catch extras. The emulator
        # holds an empty pull for (timeout - 1 s), so a 1 s timeout answers at once; back
        # off a little between empty answers instead.
        while time.monotonic() < deadline:
            try:
                response = self.clients.subscriber.pull(
                    subscription=self.subscriptions[kind], max_messages=50, timeout=1.0)
                messages = list(response.received_messages)
            except DeadlineExceeded:
                messages = []
            if messages:
                self.clients.subscriber.acknowledge(
                    subscription=self.subscriptions[kind], ack_ids=[m.ack_id for m in messages])
                got += [(m.message.data, dict(m.message.attributes)) for m in messages]
            elif len(got) >= expect:
                break
            else:
                time.sleep(0.05)
        return got


def unique_stack() -> str:
    return f"c{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", pytest.param("pubsub", marks=pytest.mark.emulator)])
def case(request: pytest.FixtureRequest) -> Case:
    stack = unique_stack()
    if request.param == "memory":
        bus = MemoryBus()
        return Case(bus=bus, stack=stack, memory=bus)
    clients: PubSubClients = request.getfixturevalue("pubsub_clients")
    subscriptions = {}
    for kind in KINDS:
        ensure_topic(clients.host, TEST_PROJECT, f"pcp-{stack}-{kind}")
        subscriptions[kind] = ensure_subscription(clients.host, TEST_PROJECT,
                                                  f"pcp-{stack}-{kind}-probe",
                                                  f"pcp-{stack}-{kind}")
    return Case(bus=PubSubBus(TEST_PROJECT, stack, publisher=clients.publisher), stack=stack,
                clients=clients, subscriptions=subscriptions)


def test_publish_returns_a_non_empty_id(case: Case) -> None:
    first = case.bus.publish("start", b"{}")
    second = case.bus.publish("start", b"{}")
    assert isinstance(first, str) and first
    assert isinstance(second, str) and second
    assert first != second


def test_message_arrives_with_data_and_attributes(case: Case) -> None:
    case.bus.publish("shepherd", b'{"run_id": "r1"}', {"run_id": "r1", "attempt": "1"})
    assert case.received("shepherd", expect=1) == [
        (b'{"run_id": "r1"}', {"run_id": "r1", "attempt": "1"})]


def test_attributes_are_optional(case: Case) -> None:
    case.bus.publish("stop", b'{"run_id": "r1", "reason": "x"}')
    assert case.received("stop", expect=1) == [(b'{"run_id": "r1", "reason": "x"}', {})]


def test_each_kind_reaches_only_its_own_topic(case: Case) -> None:
    for kind in KINDS:
        case.bus.publish(kind, kind.encode(), {"kind": kind})
    for kind in KINDS:
        assert case.received(kind, expect=1) == [(kind.encode(), {"kind": kind})]


def test_topic_path_follows_the_naming_scheme() -> None:
    bus = PubSubBus("proj-1", "tiny")
    assert bus.topic_path("start") == "projects/proj-1/topics/pcp-tiny-start"
    assert bus.topic_path("shepherd") == "projects/proj-1/topics/pcp-tiny-shepherd"


@pytest.mark.emulator
def test_publish_to_a_missing_topic_raises(pubsub_clients: PubSubClients) -> None:
    bus = PubSubBus(TEST_PROJECT, unique_stack(), publisher=pubsub_clients.publisher,
                    timeout=30)
    with pytest.raises(NotFound):
        bus.publish("start", b"{}")


@pytest.mark.emulator
def test_publish_returns_the_server_message_id(pubsub_clients: PubSubClients) -> None:
    stack = unique_stack()
    ensure_topic(pubsub_clients.host, TEST_PROJECT, f"pcp-{stack}-start")
    sub = ensure_subscription(pubsub_clients.host, TEST_PROJECT, f"pcp-{stack}-probe",
                              f"pcp-{stack}-start")
    message_id = PubSubBus(TEST_PROJECT, stack, publisher=pubsub_clients.publisher).publish(
        "start", b"{}")
    response = pubsub_clients.subscriber.pull(subscription=sub, max_messages=1, timeout=10)
    assert [m.message.message_id for m in response.received_messages] == [message_id]


@pytest.mark.emulator
def test_default_publisher_honours_the_emulator_env(pubsub_clients: PubSubClients,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected client, PubSubBus builds one that follows PUBSUB_EMULATOR_HOST,
    which is how the local replica's functions reach the emulator."""
    stack = unique_stack()
    ensure_topic(pubsub_clients.host, TEST_PROJECT, f"pcp-{stack}-sweep")
    sub = ensure_subscription(pubsub_clients.host, TEST_PROJECT, f"pcp-{stack}-probe",
                              f"pcp-{stack}-sweep")
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_clients.host)
    bus = PubSubBus(TEST_PROJECT, stack)
    try:
        bus.publish("sweep", b"tick", {"source": "test"})
    finally:
        bus.publisher.stop()
    response = pubsub_clients.subscriber.pull(subscription=sub, max_messages=1, timeout=10)
    assert [(m.message.data, dict(m.message.attributes))
            for m in response.received_messages] == [(b"tick", {"source": "test"})]
