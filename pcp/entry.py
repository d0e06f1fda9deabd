"""What the Cloud Functions entry points share: event parsing, the service, rejections, logs.

The entry points in functions/main.py stay about fifteen lines each because everything that is
not "parse, call the service, log one line" lives here. Two event shapes reach the marker
function: Eventarc's `storage.object.v1.finalized` (production) and a GCS Pub/Sub notification
(the local replica, where fake-gcs-server publishes into the Pub/Sub emulator).

Nothing here builds a client at import time: the cold start pays only for what it uses, and
`google.cloud.compute_v1` (1.5 s to import) is never imported by the module itself.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from pcp.core.errors import PermanentError
from pcp.core.messages import (
    NodeMarker,
    dump,
    load_object,
    run_id_from_message_id,
    validate_run_id,
)
from pcp.core.ports import BlobStore
from pcp.core.state import Status
from pcp.core.timefmt import iso
from pcp.logs import log
from pcp.service import Outcome, Service
from pcp.settings import Settings

PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"
FINALIZED_EVENT = "google.cloud.storage.object.v1.finalized"
STORAGE_EVENTS = "google.cloud.storage.object.v1."
MARKERS = "markers/"
REJECTED = "control/rejected/"
NOTIFICATION_FORMATS = ("JSON_API_V1", "NONE")


class Ignored(Exception):
    """A well-formed event that asks for nothing (an object deleted, metadata changed).

    Acknowledged and logged at INFO; unlike a `PermanentError` it is not recorded as rejected.
    """


# ---------------------------------------------------------------- the clock


def now() -> datetime:
    """The one place an entry point reads the clock; the core receives the result."""
    return datetime.now(UTC)


# ---------------------------------------------------------------- CloudEvents


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
    message = _message(cloud_event) or {}
    for key in ("messageId", "message_id"):
        value = message.get(key)
        if isinstance(value, str | int) and str(value):
            return str(value)
    return _attr(cloud_event, "id") or ""


def pubsub_payload(cloud_event: Any) -> tuple[bytes, dict[str, str], str]:
    """(data, attributes, message id) of a `messagePublished` CloudEvent.

    Pub/Sub carries the body base64-encoded; an event that cannot be decoded is permanent.
    """
    kind = _attr(cloud_event, "type")
    if kind is not None and kind != PUBSUB_EVENT:
        raise PermanentError(f"expected a {PUBSUB_EVENT} event, got {kind!r}")
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


def marker_object(cloud_event: Any, bucket: str | None = None) -> tuple[str, str]:
    """(bucket, object name) of a new marker, from either event shape.

    With `bucket`, an object of any other bucket is refused. Only `markers/` may raise events
    (a notification filter keeps checkpoints and logs away); anything else is refused, so a
    misconfigured trigger shows up in `pcp status` instead of silently costing invocations.
    Raises `Ignored` for notifications other than "finalized".
    """
    kind = _attr(cloud_event, "type")
    if kind == PUBSUB_EVENT:
        got_bucket, name = _notification(cloud_event)
    elif kind == FINALIZED_EVENT:
        got_bucket, name = _finalized(cloud_event)
    elif kind is not None and kind.startswith(STORAGE_EVENTS):
        raise Ignored(f"{kind} event: only a finalized object is a new marker")
    else:
        raise PermanentError(f"expected a storage event, got type {kind!r}")
    if bucket is not None and got_bucket != bucket:
        raise PermanentError(
            f"object gs://{got_bucket}/{name} is in another bucket; this stack's is {bucket}"
        )
    if not name.startswith(MARKERS):
        raise PermanentError(
            f"object {name!r} is outside {MARKERS}: only markers may raise events "
            "(check the trigger's path filter)"
        )
    return got_bucket, name


def object_metadata(cloud_event: Any) -> dict[str, str]:
    """The object's custom metadata from either storage event shape ({} when absent).

    Node agents describe each marker there too, so the marker function need not read it.
    """
    try:
        if _attr(cloud_event, "type") == PUBSUB_EVENT:
            data, attrs, _ = pubsub_payload(cloud_event)
            fmt = attrs.get("payloadFormat")
            obj = load_object(data, "storage notification payload") if fmt == "JSON_API_V1" \
                else {}
        else:
            obj = _data(cloud_event)
    except PermanentError:
        return {}
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)}


def _finalized(cloud_event: Any) -> tuple[str, str]:
    """Eventarc: data is the JSON-API object resource (int64 fields arrive as strings)."""
    obj = _data(cloud_event)
    if not isinstance(obj, Mapping):
        raise PermanentError("storage event has no object resource in its data")
    _generation(obj.get("generation"))
    return _name(obj.get("bucket"), "bucket"), _name(obj.get("name"), "object name")


def _notification(cloud_event: Any) -> tuple[str, str]:
    """A GCS Pub/Sub notification: facts in the attributes, the object resource in the data."""
    data, attrs, _ = pubsub_payload(cloud_event)
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
    return bucket, name


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


def marker_run_id(object_name: str) -> str | None:
    """The run a marker path names, for log lines; None when the path is not a marker."""
    try:
        return NodeMarker.parse_path(object_name)[0]
    except PermanentError:
        return None


# ---------------------------------------------------------------- the service

_services: dict[tuple[Settings, str | None, str | None], Service] = {}
_services_lock = threading.Lock()


def build_service(settings: Settings) -> Service:
    """The Service over the Google Cloud adapters, built on first use and kept per process.

    Warm invocations reuse the clients (connection pools, credentials). The emulator variables
    are part of the key so a process that points at another emulator gets new clients.
    """
    key = (settings, os.environ.get("STORAGE_EMULATOR_HOST"),
           os.environ.get("PUBSUB_EMULATOR_HOST"))
    with _services_lock:
        service = _services.get(key)
        if service is None:
            # Imported here, not at the top: an entry point that never runs pays nothing.
            from pcp.adapters.compute_fleet import ComputeFleet
            from pcp.adapters.gcs_store import GcsStore
            from pcp.adapters.pubsub_bus import PubSubBus

            service = Service(
                GcsStore(settings.bucket, project=settings.project),
                ComputeFleet(settings.project, settings.zone, settings.stack,
                             endpoint=settings.compute_endpoint,
                             margin_seconds=settings.policy.hard_cap_margin_seconds),
                PubSubBus(settings.project, settings.stack),
                settings.policy,
            )
            _services[key] = service
        return service


# ---------------------------------------------------------------- rejections


def record_rejection(store: BlobStore, kind: str, message_id: str, detail: str,
                     now: datetime) -> str:
    """Write control/rejected/<time>-<kind>-<message id>.json, which `pcp status` lists.

    For events that are not start requests (those become rejected runs instead). Returns the
    object name.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", message_id)[:100] or "unknown"
    name = f"{REJECTED}{iso(now)}-{kind}-{safe}.json"
    store.put(name, dump({"kind": kind, "message_id": message_id, "detail": detail,
                          "at": iso(now)}))
    return name


def rejected_run_id(data: bytes | None, message_id: str) -> str | None:
    """The run a rejected start is recorded under: its own run_id if that much parsed,
    else one derived from the message id (so a redelivery is the same rejected run)."""
    if data is not None:
        try:
            raw = load_object(data, "start request").get("run_id")
            if raw is not None:
                return validate_run_id(raw)
        except PermanentError:
            pass
    try:
        return run_id_from_message_id(message_id)
    except PermanentError:
        return None


def reject_start(service: Service, settings: Settings, data: bytes | None, message_id: str,
                 detail: str, now: datetime) -> None:
    """Record a start request that can never succeed as a rejected run, and log it.

    When the run id already names a live or finished run, the core leaves that run alone; the
    rejection is then written to control/rejected/ so it is not lost.
    """
    run_id = rejected_run_id(data, message_id)
    recorded = False
    if run_id is not None:
        outcome = service.reject(run_id, detail, now)
        known = outcome.transition.state.find(run_id)
        recorded = known is not None and known.status is Status.REJECTED
    if not recorded:
        record_rejection(service.store, "start", message_id, detail, now)
    log("WARNING", "start", stack=settings.stack, run_id=run_id, reason=f"rejected: {detail}",
        message_id=message_id, rejected=True)


def reject_event(service: Service, settings: Settings, kind: str, message_id: str, detail: str,
                 now: datetime, run_id: str | None = None) -> None:
    """Record and log a stop, marker or sweep event that can never succeed."""
    record_rejection(service.store, kind, message_id, detail, now)
    log("WARNING", kind, stack=settings.stack, run_id=run_id, reason=f"rejected: {detail}",
        message_id=message_id, rejected=True)


# ---------------------------------------------------------------- log lines


def log_outcome(settings: Settings, event: str, outcome: Outcome, run_id: str | None,
                **fields: Any) -> None:
    """The entry point's one line: what the service decided and how many races it lost."""
    severity = "WARNING" if outcome.errors else "INFO"
    known = None if run_id is None else outcome.transition.state.find(run_id)
    if known is not None and known.status is Status.REJECTED:
        severity = "WARNING"
    log(severity, event, stack=settings.stack, run_id=run_id, reason=outcome.reason,
        conflicts=outcome.conflicts, commands=len(outcome.commands), saved=outcome.saved,
        errors=outcome.errors, **fields)


def log_ignored(settings: Settings, event: str, reason: str, **fields: Any) -> None:
    log("INFO", event, stack=settings.stack, reason=f"ignored: {reason}", **fields)


@contextmanager
def transient(settings: Settings, event: str, run_id: str | None) -> Iterator[None]:
    """Log a failure that is not permanent at ERROR, then let it propagate.

    The exception becomes HTTP 500, which makes Pub/Sub or Eventarc redeliver the event.
    """
    try:
        yield
    except PermanentError:
        raise
    except Exception as e:
        log("ERROR", event, stack=settings.stack, run_id=run_id,
            reason=f"transient failure, the trigger will retry: {type(e).__name__}: {e}")
        raise
