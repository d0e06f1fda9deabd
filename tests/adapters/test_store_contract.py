"""The BlobStore contract (pcp/core/ports.py), one suite over MemoryStore and GcsStore.

GcsStore runs against fake-gcs-server, which enforces generation preconditions on uploads
(the only conditional operation the port offers), so a CAS bug shows up here as a lost
update rather than hiding behind a fake.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import pytest

from pcp.adapters.gcs_store import GcsStore
from pcp.adapters.memory import MemoryStore
from pcp.core.errors import Conflict
from pcp.core.ports import BlobStore
from tests.conftest import TEST_PROJECT, GcsBucket

pytestmark = pytest.mark.adapters


@pytest.fixture(params=["memory", pytest.param("gcs", marks=pytest.mark.emulator)])
def store(request: pytest.FixtureRequest) -> BlobStore:
    if request.param == "memory":
        return MemoryStore()
    bucket: GcsBucket = request.getfixturevalue("gcs_bucket")
    return GcsStore(bucket.name, client=bucket.client)


def test_get_missing_is_none(store: BlobStore) -> None:
    assert store.get("control/stack.json") is None


def test_create_only_put_succeeds_once(store: BlobStore) -> None:
    generation = store.put("control/stack.json", b'{"v": 1}', if_generation_match=0)
    assert generation > 0
    with pytest.raises(Conflict):
        store.put("control/stack.json", b'{"v": 2}', if_generation_match=0)
    blob = store.get("control/stack.json")
    assert blob is not None
    assert (blob.data, blob.generation) == (b'{"v": 1}', generation)


def test_cas_with_current_generation_returns_a_larger_one(store: BlobStore) -> None:
    first = store.put("doc.json", b"a", if_generation_match=0)
    second = store.put("doc.json", b"b", if_generation_match=first)
    assert second > first
    blob = store.get("doc.json")
    assert blob is not None
    assert (blob.data, blob.generation) == (b"b", second)


def test_stale_generation_conflicts_and_keeps_the_winner(store: BlobStore) -> None:
    first = store.put("doc.json", b"a", if_generation_match=0)
    second = store.put("doc.json", b"b", if_generation_match=first)
    with pytest.raises(Conflict):
        store.put("doc.json", b"stale", if_generation_match=first)
    blob = store.get("doc.json")
    assert blob is not None
    assert (blob.data, blob.generation) == (b"b", second)


def test_cas_on_a_missing_object_conflicts(store: BlobStore) -> None:
    with pytest.raises(Conflict):
        store.put("gone.json", b"x", if_generation_match=12345)
    assert store.get("gone.json") is None


def test_unconditional_put_overwrites(store: BlobStore) -> None:
    first = store.put("runs/r1/run.json", b"old")
    second = store.put("runs/r1/run.json", b"new")
    assert second > first
    blob = store.get("runs/r1/run.json")
    assert blob is not None
    assert (blob.data, blob.generation) == (b"new", second)


@pytest.mark.parametrize("data", [b"", b"\x00\xff\x80binary", "µ-ünïcode".encode(),
                                  b"x" * 300_000])
def test_bytes_round_trip(store: BlobStore, data: bytes) -> None:
    generation = store.put("runs/r1/worker-0/blob.bin", data,
                           content_type="application/octet-stream")
    blob = store.get("runs/r1/worker-0/blob.bin")
    assert blob is not None
    assert blob.data == data
    assert blob.generation == generation


def test_list_is_sorted_and_isolated_by_prefix(store: BlobStore) -> None:
    names = ["runs/b/run.json", "runs/a/worker-0/stdout.log", "runs/a/run.json",
             "runsx/stray.json", "markers/a/worker-0/done.json", "control/stack.json"]
    for name in names:
        store.put(name, b"{}")
    assert store.list("runs/") == ["runs/a/run.json", "runs/a/worker-0/stdout.log",
                                   "runs/b/run.json"]
    assert store.list("runs/a/") == ["runs/a/run.json", "runs/a/worker-0/stdout.log"]
    assert store.list("markers/") == ["markers/a/worker-0/done.json"]
    assert store.list("nothing/") == []
    assert store.list("") == sorted(names)


def test_scan_reports_generation_and_custom_metadata_without_data(store: BlobStore) -> None:
    g1 = store.put("markers/a/worker-0/done.json", b'{"x": 1}',
                   metadata={"pcp-marker": '{"attempt": 1}', "note": "two words"})
    g2 = store.put("markers/a/shepherd/booted.json", b"{}")
    store.put("markers/b/worker-0/done.json", b"{}")
    listed = store.scan("markers/a/")
    assert [x.name for x in listed] == ["markers/a/shepherd/booted.json",
                                        "markers/a/worker-0/done.json"]
    assert [x.generation for x in listed] == [g2, g1]
    assert dict(listed[1].metadata) == {"pcp-marker": '{"attempt": 1}', "note": "two words"}
    assert dict(listed[0].metadata) == {}
    assert store.scan("nothing/") == []


def _increment(store: BlobStore, name: str) -> int:
    """One read-modify-write of a counter; returns how many races it lost first."""
    lost = 0
    while True:
        blob = store.get(name)
        count = 0 if blob is None else json.loads(blob.data)["n"]
        generation = 0 if blob is None else blob.generation
        try:
            store.put(name, json.dumps({"n": count + 1}).encode(),
                      if_generation_match=generation)
            return lost
        except Conflict:
            lost += 1


def _run_threads(workers: int, target: Callable[[], None]) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def body() -> None:
        try:
            barrier.wait()
            target()
        except BaseException as exc:  # noqa: BLE001 (handed back to the test thread)
            errors.append(exc)

    threads = [threading.Thread(target=body) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a CAS worker hung"
    return errors


def test_concurrent_cas_loses_no_update(store: BlobStore) -> None:
    """8 threads x 10 increments through CAS with retry: exactly 80, whoever wins."""
    lost: list[int] = []

    def work() -> None:
        for _ in range(10):
            lost.append(_increment(store, "control/counter.json"))

    errors = _run_threads(8, work)
    assert errors == []
    blob = store.get("control/counter.json")
    assert blob is not None
    assert json.loads(blob.data) == {"n": 80}
    assert len(lost) == 80


@pytest.mark.emulator
def test_gcs_store_keeps_content_type(gcs_bucket: GcsBucket) -> None:
    store = GcsStore(gcs_bucket.name, client=gcs_bucket.client)
    store.put("runs/r1/shepherd/stdout.log", b"hello\n", content_type="text/plain")
    blob = gcs_bucket.client.bucket(gcs_bucket.name).get_blob("runs/r1/shepherd/stdout.log")
    assert blob is not None
    assert blob.content_type == "text/plain"


@pytest.mark.emulator
def test_gcs_store_default_client_honours_the_emulator_env(
        gcs_bucket: GcsBucket, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an injected client, GcsStore builds one that follows STORAGE_EMULATOR_HOST,
    which is how the local replica's functions reach fake-gcs-server."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_bucket.endpoint)
    store = GcsStore(gcs_bucket.name, project=TEST_PROJECT)
    generation = store.put("control/stack.json", b"{}", if_generation_match=0)
    seen = GcsStore(gcs_bucket.name, client=gcs_bucket.client).get("control/stack.json")
    assert seen is not None
    assert seen.generation == generation
