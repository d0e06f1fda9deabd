"""The per-object mutation limit in front of fake-gcs-server (pcp_dev/local/gcs_proxy.py).

Raw HTTP where the answer itself is under test (the storage library would retry a 429), the
production GcsStore where what matters is how pcp lives with the limit.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from pcp.adapters.gcs_store import GcsStore
from pcp.core.errors import Conflict
from pcp_dev.local.emulators import storage_client
from pcp_dev.local.gcs_proxy import GcsProxy, mutated_object
from tests.conftest import TEST_PROJECT, GcsBucket

pytestmark = [pytest.mark.adapters, pytest.mark.emulator]


@pytest.fixture
def proxy(gcs_bucket: GcsBucket) -> Iterator[GcsProxy]:
    with GcsProxy(gcs_bucket.endpoint) as p:
        yield p


def upload(proxy: GcsProxy, bucket: str, name: str, body: bytes = b"{}") -> tuple[int, dict]:
    url = f"{proxy.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={name}"
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_second_update_of_one_object_within_a_second_gets_the_real_429(
        proxy: GcsProxy, gcs_bucket: GcsBucket) -> None:
    assert upload(proxy, gcs_bucket.name, "control/stack.json")[0] == 200
    status, body = upload(proxy, gcs_bucket.name, "control/stack.json")
    assert status == 429
    error = body["error"]
    assert error["code"] == 429 and error["errors"][0]["reason"] == "rateLimitExceeded"
    assert error["errors"][0]["domain"] == "usageLimits"
    assert f"{gcs_bucket.name}/control/stack.json exceeded the rate limit" in error["message"]
    assert proxy.limited_snapshot() == {"control/stack.json": 1}


def test_different_objects_are_not_limited(proxy: GcsProxy, gcs_bucket: GcsBucket) -> None:
    codes = [upload(proxy, gcs_bucket.name, f"markers/r/worker-{i}/booted.json")[0]
             for i in range(8)]
    assert codes == [200] * 8
    assert proxy.limited_snapshot() == {}


def test_the_same_object_is_accepted_again_after_the_interval(gcs_bucket: GcsBucket) -> None:
    with GcsProxy(gcs_bucket.endpoint, mutation_interval=0.3) as proxy:
        assert upload(proxy, gcs_bucket.name, "x.json")[0] == 200
        assert upload(proxy, gcs_bucket.name, "x.json")[0] == 429
        time.sleep(0.35)
        assert upload(proxy, gcs_bucket.name, "x.json")[0] == 200


def test_the_limit_can_be_turned_off(gcs_bucket: GcsBucket) -> None:
    with GcsProxy(gcs_bucket.endpoint, mutation_interval=None) as proxy:
        assert [upload(proxy, gcs_bucket.name, "x.json")[0] for _ in range(3)] == [200] * 3


def test_reads_and_listings_are_never_limited(proxy: GcsProxy, gcs_bucket: GcsBucket) -> None:
    store = GcsStore(gcs_bucket.name, client=storage_client(proxy.endpoint, TEST_PROJECT))
    store.put("a.json", b"{}")
    for _ in range(5):
        assert store.get("a.json") is not None
        assert store.list("") == ["a.json"]
    assert proxy.limited_snapshot() == {}


def test_the_storage_library_backs_off_and_the_write_lands(
        proxy: GcsProxy, gcs_bucket: GcsBucket) -> None:
    store = GcsStore(gcs_bucket.name, client=storage_client(proxy.endpoint, TEST_PROJECT))
    first = store.put("control/stack.json", b'{"n": 1}', if_generation_match=0)
    started = time.monotonic()
    store.put("control/stack.json", b'{"n": 2}', if_generation_match=first)
    assert time.monotonic() - started >= 0.5, "the second write had to wait out the limit"
    assert proxy.limited_snapshot()["control/stack.json"] >= 1
    blob = store.get("control/stack.json")
    assert blob is not None and blob.data == b'{"n": 2}'


@pytest.mark.parametrize(("method", "target", "body", "expected"), [
    ("POST", "/upload/storage/v1/b/b1/o?uploadType=media&name=a%2Fb.json", None,
     ("b1", "a/b.json")),
    ("POST", "/upload/storage/v1/b/b1/o?uploadType=resumable", b'{"name": "r.log"}',
     ("b1", "r.log")),
    ("POST", "/upload/storage/v1/b/b1/o?uploadType=multipart",
     b'--x\r\ncontent-type: application/json\r\n\r\n{"name": "m.json", "metadata": {"k": "v"}}'
     b'\r\n--x\r\n\r\nbody\r\n--x--', ("b1", "m.json")),
    ("PATCH", "/storage/v1/b/b1/o/a%2Fb.json", b"{}", ("b1", "a/b.json")),
    ("DELETE", "/storage/v1/b/b1/o/a%2Fb.json", None, ("b1", "a/b.json")),
    ("POST", "/storage/v1/b/b1/o/src/rewriteTo/b/b2/o/dst", None, ("b2", "dst")),
    ("GET", "/storage/v1/b/b1/o/a%2Fb.json", None, None),
    ("GET", "/download/storage/v1/b/b1/o/a.json?alt=media", None, None),
    ("GET", "/storage/v1/b/b1/o?prefix=runs/", None, None),
    ("PUT", "/upload/storage/v1/b/b1/o?uploadType=resumable&upload_id=7", b"data", None),
])
def test_which_requests_are_mutations(method: str, target: str, body: bytes | None,
                                      expected: tuple[str, str] | None) -> None:
    assert mutated_object(method, target, body) == expected


def test_a_conditional_write_that_would_fail_its_precondition_gets_412_not_429(
        proxy: GcsProxy, gcs_bucket: GcsBucket) -> None:
    """A lost race inside the window is answered as the lost race it is, so the loser re-reads
    at once instead of backing off; the winner's second write within the window is a 429."""
    store = GcsStore(gcs_bucket.name, client=storage_client(proxy.endpoint, TEST_PROJECT))
    first = store.put("control/stack.json", b'{"n": 1}', if_generation_match=0)
    with pytest.raises(Conflict):
        store.put("control/stack.json", b'{"n": 2}', if_generation_match=first + 1)
    assert proxy.limited_snapshot() == {}
    status, body = upload(proxy, gcs_bucket.name, f"control/stack.json&ifGenerationMatch={first}")
    assert status == 429 and body["error"]["errors"][0]["reason"] == "rateLimitExceeded"


def test_a_429_the_library_retries_is_logged_once_per_retry(
        proxy: GcsProxy, gcs_bucket: GcsBucket, capsys: pytest.CaptureFixture[str]) -> None:
    """The production store, through the limiter: the second write of one object within a
    second is answered 429, retried by the library (and then taken), and logged as the one
    line the `storage-429s` metric counts (fields: throttled, http_status, object)."""
    store = GcsStore(gcs_bucket.name, client=storage_client(proxy.endpoint, TEST_PROJECT),
                     stack="tiny")
    store.put("control/stack.json", b"{}")
    capsys.readouterr()
    store.put("control/stack.json", b'{"n": 2}')
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()
             if line.startswith("{")]
    throttled = [r for r in lines if r.get("throttled") is True]
    assert throttled, lines
    assert proxy.limited_snapshot().get("control/stack.json", 0) >= len(throttled)
    for r in throttled:
        assert (r["stack"], r["severity"], r["http_status"], r["object"]) == (
            "tiny", "WARNING", 429, "control/stack.json")
    assert store.get("control/stack.json").data == b'{"n": 2}'
    store.put("markers/r/worker-0/booted.json", b"{}")  # another object: not limited
    assert not [line for line in capsys.readouterr().out.splitlines() if "throttled" in line]
