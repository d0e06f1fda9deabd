"""pcp/edge and pcp/logs.py on their own: event shapes, rejections, log lines.

No emulator is needed: parsing is pure, and rejections are written to the in-memory store.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from cloudevents.http import from_dict

from pcp.adapters.memory import MemoryBus, MemoryFleet, MemoryStore
from pcp.core.errors import PermanentError
from pcp.core.names import STACK_DOC
from pcp.core.policy import Policy
from pcp.edge import events as edge
from pcp.edge import rejections, services
from pcp.logs import log
from pcp.service import Service
from pcp.settings import Settings
from tests.functions import events

pytestmark = pytest.mark.functions

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
BUCKET = "pcp-tiny-example"
MARKER = "markers/run-1/worker-0/done.json"


def ce(event: dict) -> object:
    return from_dict(event)


def where(marker: edge.MarkerObject) -> tuple[str, str]:
    return marker.bucket, marker.name


# ---------------------------------------------------------------- Pub/Sub payloads


def test_pubsub_payload_decodes_data_attributes_and_message_id() -> None:
    ev = events.pubsub_event(b'{"run_id": "exp-1"}', message_id="4242",
                             attributes={"origin": "cli"})
    data, attrs, message_id = edge.pubsub_payload(ce(ev))
    assert (data, attrs, message_id) == (b'{"run_id": "exp-1"}', {"origin": "cli"}, "4242")


def test_pubsub_payload_tolerates_snake_case_message_id() -> None:
    ev = events.pubsub_event(b"{}", message_id="77")
    message = ev["data"]["message"]
    del message["messageId"]
    ev["id"] = "ce-id-not-the-message-id"
    assert edge.pubsub_payload(ce(ev))[2] == "77"


def test_pubsub_payload_without_data_is_empty() -> None:
    ev = events.pubsub_event(None)
    assert edge.pubsub_payload(ce(ev))[0] == b""


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda ev: ev["data"]["message"].update(data="%%%not base64"), "not valid base64"),
    (lambda ev: ev["data"]["message"].update(data="e30"), "not valid base64"),  # padding
    (lambda ev: ev["data"]["message"].update(data=123), "must be a base64 string"),
    (lambda ev: ev["data"].pop("message"), "no message"),
    (lambda ev: ev["data"]["message"].update(attributes=["a"]), "attributes must be"),
    (lambda ev: ev.update(type="google.cloud.storage.object.v1.finalized"), "expected a"),
])
def test_pubsub_payload_refuses_malformed_events(mutate, reason: str) -> None:
    ev = events.pubsub_event(b"{}")
    mutate(ev)
    with pytest.raises(PermanentError, match=reason):
        edge.pubsub_payload(ce(ev))


def test_event_id_never_raises() -> None:
    ev = events.pubsub_event(b"{}", message_id="55")
    ev["data"] = "not an object"
    assert edge.event_id(ce(ev)) == "55"  # the CloudEvent id, which the fixture sets alike


# ---------------------------------------------------------------- marker objects


def test_marker_object_from_eventarc_finalized_with_string_generation() -> None:
    ev = events.finalized_event(BUCKET, MARKER, "1795912258448915")
    assert where(edge.marker_object(ce(ev), BUCKET)) == (BUCKET, MARKER)


def test_marker_object_from_pubsub_notification() -> None:
    ev = events.notification_event(BUCKET, MARKER, 1795912258448915)
    assert where(edge.marker_object(ce(ev), BUCKET)) == (BUCKET, MARKER)


def test_marker_object_notification_without_payload() -> None:
    ev = events.notification_event(BUCKET, MARKER, 7)
    ev["data"]["message"]["data"] = ""
    ev["data"]["message"]["attributes"]["payloadFormat"] = "NONE"
    assert where(edge.marker_object(ce(ev), BUCKET)) == (BUCKET, MARKER)


@pytest.mark.parametrize("kind", ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE", "OBJECT_ARCHIVE"])
def test_other_notifications_are_ignored_not_rejected(kind: str) -> None:
    ev = events.notification_event(BUCKET, MARKER, 7, event_type=kind)
    with pytest.raises(edge.Ignored, match=kind):
        edge.marker_object(ce(ev), BUCKET)


def test_eventarc_deleted_event_is_ignored() -> None:
    ev = events.finalized_event(BUCKET, MARKER, "7")
    ev["type"] = "google.cloud.storage.object.v1.deleted"
    with pytest.raises(edge.Ignored):
        edge.marker_object(ce(ev), BUCKET)


@pytest.mark.parametrize("shape", [events.finalized_event, events.notification_event])
def test_object_outside_markers_is_refused(shape) -> None:
    ev = shape(BUCKET, "runs/run-1/worker-0/stdout.log", "7")
    with pytest.raises(PermanentError, match="outside markers/"):
        edge.marker_object(ce(ev), BUCKET)


@pytest.mark.parametrize("shape", [events.finalized_event, events.notification_event])
def test_object_of_another_bucket_is_refused(shape) -> None:
    ev = shape("someone-elses-bucket", MARKER, "7")
    with pytest.raises(PermanentError, match="another bucket"):
        edge.marker_object(ce(ev), BUCKET)


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda ev: ev["data"].update(generation="seven"), "generation must be a number"),
    (lambda ev: ev["data"].pop("name"), "no object name"),
    (lambda ev: ev["data"].update(bucket=None), "no bucket"),
    (lambda ev: ev.update(type="com.example.other"), "expected a storage event"),
])
def test_malformed_finalized_events_are_refused(mutate, reason: str) -> None:
    ev = events.finalized_event(BUCKET, MARKER, "7")
    mutate(ev)
    with pytest.raises(PermanentError, match=reason):
        edge.marker_object(ce(ev), BUCKET)


def test_notification_whose_payload_disagrees_with_its_attributes_is_refused() -> None:
    ev = events.notification_event(BUCKET, MARKER, 7)
    ev["data"]["message"]["attributes"]["objectId"] = "markers/run-1/worker-1/done.json"
    with pytest.raises(PermanentError, match="in its payload"):
        edge.marker_object(ce(ev), BUCKET)


def test_notification_in_an_unknown_format_is_refused() -> None:
    ev = events.notification_event(BUCKET, MARKER, 7)
    ev["data"]["message"]["attributes"]["payloadFormat"] = "PROTOBUF"
    with pytest.raises(PermanentError, match="payloadFormat"):
        edge.marker_object(ce(ev), BUCKET)


def test_plain_pubsub_message_is_not_a_notification() -> None:
    with pytest.raises(PermanentError, match="not a storage notification"):
        edge.marker_object(ce(events.pubsub_event(b"{}")), BUCKET)


# ---------------------------------------------------------------- rejections


def service() -> Service:
    policy = Policy(stack="tiny", worker_count=1, default_binary="trainer")
    return Service(MemoryStore(), MemoryFleet("tiny", policy.worker_vms), MemoryBus(), policy)


SETTINGS = Settings(stack="tiny", project="p", zone="z", bucket=BUCKET,
                    policy=Policy(stack="tiny", worker_count=1, default_binary="trainer"))


def test_record_rejection_writes_a_dated_record() -> None:
    store = MemoryStore()
    name = rejections.record_rejection(store, "marker", "id/with spaces", "bad marker", NOW)
    assert name == "control/rejected/2026-11-29T12:00:00.000Z-marker-id-with-spaces.json"
    blob = store.get(name)
    assert blob is not None
    assert json.loads(blob.data) == {"kind": "marker", "message_id": "id/with spaces",
                                     "detail": "bad marker", "at": "2026-11-29T12:00:00.000Z"}


def test_rejected_start_becomes_a_rejected_run_under_its_own_run_id() -> None:
    svc = service()
    rejections.reject_start(svc, SETTINGS, b'{"run_id": "exp-1", "keep_vm_alvie": true}', "9",
                       "unknown field", NOW)
    run = svc.load().state.find("exp-1")
    assert run is not None and run.status.value == "rejected"
    assert svc.store.list("control/rejected/") == []


def test_rejected_start_without_a_run_id_is_named_after_the_message() -> None:
    svc = service()
    rejections.reject_start(svc, SETTINGS, b"not json", "12345", "not valid JSON", NOW)
    run = svc.load().state.find("run-12345")
    assert run is not None and run.status.value == "rejected"


def test_rejection_that_repeats_a_live_run_id_is_still_recorded() -> None:
    svc = service()
    svc.handle(entry_request("exp-1"), NOW)
    before = svc.store.get(STACK_DOC)
    rejections.reject_start(svc, SETTINGS, b'{"run_id": "exp-1", "max_hours": "2"}', "10",
                       "max_hours must be a number", NOW)
    assert svc.load().state.find("exp-1").status.value == "starting"  # untouched
    assert svc.store.get(STACK_DOC) == before
    [name] = svc.store.list("control/rejected/")
    assert json.loads(svc.store.get(name).data)["detail"] == "max_hours must be a number"


def entry_request(run_id: str):
    from pcp.core.messages import StartRequest

    return StartRequest(run_id=run_id)


# ---------------------------------------------------------------- logs


def test_log_prints_one_json_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    log("WARNING", "start", stack="tiny", run_id="exp-1", reason="because", conflicts=2)
    log("INFO", "sweep", stack="tiny", reason="no change")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first == {"severity": "WARNING", "stack": "tiny", "run_id": "exp-1",
                     "event": "start", "reason": "because", "conflicts": 2,
                     "message": "start: because"}
    assert json.loads(lines[1])["run_id"] is None


def test_log_refuses_an_unknown_severity() -> None:
    with pytest.raises(ValueError, match="severity"):
        log("LOUD", "start", stack="tiny", reason="x")


def test_now_is_timezone_aware_utc() -> None:
    assert services.now().tzinfo is UTC


# ---------------------------------------------------------------- the source, as Google sends it


def test_the_expected_sources_have_the_format_of_googles_published_examples() -> None:
    """eventarc_*_example.json are verbatim examples of whole events as Google publishes
    them: the source the functions expect is built the same way."""
    pubsub = events.fixture("eventarc_pubsub_example.json")
    storage = events.fixture("eventarc_storage_example.json")
    assert edge.topic_source("test-project", "my-topic") == pubsub["source"]
    assert edge.bucket_source(storage["data"]["bucket"]) == storage["source"]
    edge.check_source(ce(pubsub), edge.topic_source("test-project", "my-topic"))
    edge.check_source(ce(storage), edge.bucket_source("sample-bucket"))
    with pytest.raises(PermanentError, match="is not this stack's"):
        edge.check_source(ce(pubsub), edge.topic_source("test-project", "pcp-tiny-start"))
    with pytest.raises(PermanentError, match="is not this stack's"):
        edge.check_source(ce(storage), edge.bucket_source("pcp-tiny-pcp-test"))
    data, attrs, message_id = edge.pubsub_payload(ce(pubsub),
                                                  edge.topic_source("test-project", "my-topic"))
    assert (data, attrs, message_id) == (b"test message 3", {"attr1": "attr1-value"},
                                         "message-id")
