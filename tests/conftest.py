"""Fixtures shared by every test tier: hypothesis profiles and session-wide emulators.

Emulators start once per session and only when a test asks for them. Without an emulator
a test skips with the reason; with PCP_REQUIRE_EMULATORS=1 (CI) it fails instead, so a
broken image cannot turn the contract suite into a row of silent skips.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import pytest
from hypothesis import HealthCheck, settings

from pcp_dev.local.emulators import EmulatorMissing, FakeGcs, PubSubEmulator, storage_client

if TYPE_CHECKING:
    from google.cloud import storage

TEST_PROJECT = "pcp-test"

# Property and stateful tests opt in to more examples with settings(parent=...) or the
# profile; "ci" is thorough, "dev" keeps the edit-test loop short. No deadlines: the
# machines are shared and timing is not what these tests check.
settings.register_profile("ci", max_examples=500, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def require_emulator(what: str, exc: BaseException) -> NoReturn:
    """Skip because `what` is missing, or fail when the run demands emulators."""
    if os.environ.get("PCP_REQUIRE_EMULATORS") == "1":
        pytest.fail(f"{what} not available (PCP_REQUIRE_EMULATORS=1): {exc}", pytrace=False)
    pytest.skip(f"{what} not available: {exc}")


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGcs]:
    """fake-gcs-server for the whole session, memory backend, no notifications."""
    try:
        server = FakeGcs().start()
    except EmulatorMissing as exc:
        require_emulator("fake-gcs-server", exc)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator for the whole session, project TEST_PROJECT."""
    try:
        emulator = PubSubEmulator(TEST_PROJECT).start()
    except EmulatorMissing as exc:
        require_emulator("Pub/Sub emulator", exc)
    try:
        yield emulator
    finally:
        emulator.stop()


@dataclass(frozen=True)
class GcsBucket:
    client: storage.Client
    name: str
    endpoint: str


@pytest.fixture
def gcs_bucket(fake_gcs: FakeGcs) -> GcsBucket:
    """A fresh, empty bucket on the session's fake-gcs-server."""
    client = storage_client(fake_gcs.endpoint, TEST_PROJECT)
    name = f"pcp-test-{uuid.uuid4().hex[:16]}"
    client.create_bucket(name)
    return GcsBucket(client=client, name=name, endpoint=fake_gcs.endpoint)
