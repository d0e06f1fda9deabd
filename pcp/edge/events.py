"""Decoding the CloudEvents the functions receive: Pub/Sub messages and new marker objects.

Two event shapes reach the marker function, and both are production shapes: the Pulumi
program wires a GCS Pub/Sub notification on `markers/` to the marker function's
`messagePublished` trigger (infra/pcp_infra/messaging.py), which is also what the local
replica's fake-gcs-server publishes; Eventarc's direct `storage.object.v1.finalized` event is
accepted too, so a trigger rewired to it keeps working. Either way the object is parsed once.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pcp.core.errors import PermanentError
from pcp.core.messages import NodeMarker, load_object, untrusted
from pcp.core.names import MARKERS

PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"
FINALIZED_EVENT = "google.cloud.storage.object.v1.finalized"
STORAGE_EVENTS = "google.cloud.storage.object.v1."
NOTIFICATION_FORMATS = ("JSON_API_V1", "NONE")
PUBSUB_SOURCE = "//pubsub.googleapis.com/"
STORAGE_SOURCE = "//storage.googleapis.com/"


def topic_source(project: str, topic: str) -> str:
    """The `source` of an event Eventarc (or a push to .../projects/P/topics/T) delivers."""
    return f"{PUBSUB_SOURCE}projects/{project}/topics/{topic}"


def bucket_source(bucket: str) -> str:
    """The `source` of Eventarc's direct storage events for `bucket`."""
    return f"{STORAGE_SOURCE}projects/_/buckets/{bucket}"


def check_source(cloud_event: Any, expected: str) -> None:
    """Refuse an event that did not come from this stack's topic or bucket.

    A trigger wired to another stack's topic would otherwise act on that stack's requests
    with this stack's VMs. The source is what Eventarc sets; a plain push subscription gets
    the same source when it pushes to a URL that ends in projects/<P>/topics/<T>
    (functions-framework reads the topic from the path), which is how the local replica
    pushes. A push to a bare URL has no topic in its source and is refused too.
    """
    source = _attr(cloud_event, "source")
    if source == expected:
        return
    if source is None or source.rstrip("/") + "/" in (PUBSUB_SOURCE, STORAGE_SOURCE):
        raise PermanentError(
            f"event source {source!r} names no topic or bucket; expected {expected!r} "
            "(a push subscription must push to <function URL>/projects/<P>/topics/<T>)"
        )
    raise PermanentError(
        f"event source {source!r} is not this stack's: expected {expected!r} "
        "(check the trigger: it is wired to another stack's topic or bucket)"
    )


class Ignored(Exception):
    """A well-formed event that asks for nothing (an object deleted, metadata changed).

    Acknowledged and logged at INFO; unlike a `PermanentError` it is not recorded as rejected.
    """


def _attr(cloud_event: Any, key: str) -> str | None:
    value = cloud_event.get(key) if hasattr(cloud_event, "get") else None
    return None if value is None else str(value)


def _data(cloud_event: Any) -> Any:
    return getattr(cloud_event, "data", None)


def _message(cloud_event: Any) -> Mapping[str, Any] | None:
    data = _data(cloud_event)
    message = data.get("message") if isinstance(data, Mapping) else None
    return message if isinstance(message, Mapping) else None


def event_id(cloud_event: Any) -> str:
    """The Pub/Sub message id (or else the CloudEvent id), never raising: used in rejections."""
    try:
        return _event_id(cloud_event)
    except Exception:  # noqa: BLE001 - an id for a log line must never fail the request
        return ""


def _event_id(cloud_event: Any) -> str:
    message = _message(cloud_event) or {}
    for key in ("messageId", "message_id"):
        value = message.get(key)
        if isinstance(value, str | int) and str(value):
            return str(value)
    return _attr(cloud_event, "id") or ""


@untrusted("Pub/Sub event")
def pubsub_payload(cloud_event: Any, source: str | None = None
                   ) -> tuple[bytes, dict[str, str], str]:
    """(data, attributes, message id) of a `messagePublished` CloudEvent.

    Pub/Sub carries the body base64-encoded; an event that cannot be decoded is permanent.
    With `source` (see `topic_source`), an event from any other topic is refused.
    """
    kind = _attr(cloud_event, "type")
    if kind is not None and kind != PUBSUB_EVENT:
        raise PermanentError(f"expected a {PUBSUB_EVENT} event, got {kind!r}")
    if source is not None:
        check_source(cloud_event, source)
    if not isinstance(_data(cloud_event), Mapping):
        raise PermanentError("Pub/Sub event has no data object (expected {message, subscription})")
    message = _message(cloud_event)
    if message is None:
        raise PermanentError("Pub/Sub event has no message object in its data")
    raw = message.get("data")
    if raw is None:
        raw = ""  # a message with attributes only
    if not isinstance(raw, str):
        raise PermanentError(
            f"Pub/Sub message data must be a base64 string, got {type(raw).__name__}"
        )
    try:
        body = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PermanentError(f"Pub/Sub message data is not valid base64: {e}") from None
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, Mapping):
        raise PermanentError("Pub/Sub message attributes must be an object")
    return body, {str(k): str(v) for k, v in attributes.items()}, event_id(cloud_event)


@dataclass(frozen=True)
class MarkerObject:
    """A new object under markers/, parsed once from either storage event shape."""

    bucket: str
    name: str
    metadata: dict[str, str]  # the object's custom metadata: agents describe markers there

    @property
    def run_id(self) -> str | None:
        """The run the marker path names, for log lines; None when the path is malformed."""
        try:
            return NodeMarker.parse_path(self.name)[0]
        except PermanentError:
            return None


@untrusted("storage event", keep=(Ignored,))
def marker_object(cloud_event: Any, bucket: str | None = None, topic: str | None = None
                  ) -> MarkerObject:
    """The new marker an event announces, from either event shape.

    With `bucket`, an object of any other bucket is refused, and so is a direct storage event
    whose source is another bucket; with `topic` (see `topic_source`), a notification that
    arrived on another topic. Only `markers/` may raise events
    (a notification filter keeps checkpoints and logs away); anything else is refused, so a
    misconfigured trigger shows up in `pcp status` instead of silently costing invocations.
    Raises `Ignored` for notifications other than "finalized".
    """
    kind = _attr(cloud_event, "type")
    if kind == PUBSUB_EVENT:
        found = _notification(cloud_event, topic)
    elif kind == FINALIZED_EVENT:
        found = _finalized(cloud_event)
    elif kind is not None and kind.startswith(STORAGE_EVENTS):
        raise Ignored(f"{kind} event: only a finalized object is a new marker")
    else:
        raise PermanentError(f"expected a storage event, got type {kind!r}")
    if bucket is not None and found.bucket != bucket:
        raise PermanentError(
            f"object gs://{found.bucket}/{found.name} is in another bucket; this stack's is "
            f"{bucket}"
        )
    if bucket is not None and kind == FINALIZED_EVENT:
        check_source(cloud_event, bucket_source(bucket))
    if not found.name.startswith(MARKERS):
        raise PermanentError(
            f"object {found.name!r} is outside {MARKERS}: only markers may raise events "
            "(check the trigger's path filter)"
        )
    return found


def _custom_metadata(obj: object) -> dict[str, str]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def _finalized(cloud_event: Any) -> MarkerObject:
    """Eventarc: data is the JSON-API object resource (int64 fields arrive as strings)."""
    obj = _data(cloud_event)
    if not isinstance(obj, Mapping):
        raise PermanentError("storage event has no object resource in its data")
    _generation(obj.get("generation"))
    return MarkerObject(_name(obj.get("bucket"), "bucket"), _name(obj.get("name"), "object name"),
                        _custom_metadata(obj))


def _notification(cloud_event: Any, topic: str | None) -> MarkerObject:
    """A GCS Pub/Sub notification: facts in the attributes, the object resource in the data."""
    data, attrs, _ = pubsub_payload(cloud_event, topic)
    kind = attrs.get("eventType")
    if kind is None:
        raise PermanentError("Pub/Sub message is not a storage notification (no eventType)")
    if kind != "OBJECT_FINALIZE":
        raise Ignored(f"{kind} notification for {attrs.get('objectId')!r}: "
                      "only OBJECT_FINALIZE is a new marker")
    fmt = attrs.get("payloadFormat", "NONE")
    if fmt not in NOTIFICATION_FORMATS:
        raise PermanentError(f"storage notification payloadFormat {fmt!r} is not supported; "
                             f"use {' or '.join(NOTIFICATION_FORMATS)}")
    obj = load_object(data, "storage notification payload") if fmt == "JSON_API_V1" else {}
    bucket = _name(attrs.get("bucketId") or obj.get("bucket"), "bucketId")
    name = _name(attrs.get("objectId") or obj.get("name"), "objectId")
    if obj.get("name", name) != name or obj.get("bucket", bucket) != bucket:
        raise PermanentError(f"storage notification names gs://{bucket}/{name} in its attributes "
                             f"but gs://{obj.get('bucket')}/{obj.get('name')} in its payload")
    _generation(attrs.get("objectGeneration", obj.get("generation")))
    return MarkerObject(bucket, name, _custom_metadata(obj))


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise PermanentError(f"storage event has no {what} (got {value!r})")
    return value


def _generation(value: object) -> int | None:
    """Generations are int64, sent as strings by the JSON API; ints are tolerated."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PermanentError(f"object generation must be a number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise PermanentError(f"object generation must be a number, got {value!r}") from None
