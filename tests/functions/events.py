"""CloudEvents for the function tests, built from the documented payloads in fixtures/.

Each builder loads a fixture shaped like what Eventarc or Pub/Sub really sends (base64 message
data, int64 fields as strings) and fills in the names under test.
"""

from __future__ import annotations

import base64
import copy
import itertools
import json
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures"
_ids = itertools.count(31000000000000001)


@cache
def _load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def fixture(name: str) -> dict[str, Any]:
    """A fresh copy of a fixture payload, safe to modify."""
    return copy.deepcopy(_load(name))


def next_id() -> str:
    return str(next(_ids))


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def pubsub_event(data: bytes | str | None, *, topic: str = "pcp-tiny-start",
                 message_id: str | None = None, attributes: dict[str, str] | None = None,
                 raw_data: str | None = None, project: str = "pcp-test") -> dict[str, Any]:
    """A messagePublished event. `raw_data` goes on the wire as is (to send bad base64)."""
    ev = fixture("pubsub_message_published.json")
    mid = message_id or next_id()
    ev["id"] = mid
    ev["source"] = f"//pubsub.googleapis.com/projects/{project}/topics/{topic}"
    message = ev["data"]["message"]
    message["messageId"] = message["message_id"] = mid
    message["attributes"] = dict(attributes or {})
    if raw_data is not None:
        message["data"] = raw_data
    elif data is None:
        del message["data"]
    else:
        message["data"] = b64(data)
    return ev


def finalized_event(bucket: str, name: str, generation: int | str,
                    metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """Eventarc's google.cloud.storage.object.v1.finalized with the object resource."""
    ev = fixture("storage_object_finalized.json")
    ev["id"] = next_id()
    ev["source"] = f"//storage.googleapis.com/projects/_/buckets/{bucket}"
    ev["subject"] = f"objects/{name}"
    obj = ev["data"]
    obj.update(name=name, bucket=bucket, generation=str(generation),
               id=f"{bucket}/{name}/{generation}")
    if metadata:
        obj["metadata"] = metadata
    return ev


def notification_event(bucket: str, name: str, generation: int | str,
                       event_type: str = "OBJECT_FINALIZE",
                       metadata: dict[str, str] | None = None, topic: str = "pcp-tiny-markers",
                       project: str = "pcp-test") -> dict[str, Any]:
    """A GCS Pub/Sub notification (JSON_API_V1) delivered as messagePublished."""
    ev = fixture("storage_notification.json")
    mid = next_id()
    ev["id"] = mid
    ev["source"] = f"//pubsub.googleapis.com/projects/{project}/topics/{topic}"
    message = ev["data"]["message"]
    message["messageId"] = mid
    obj = json.loads(base64.b64decode(message["data"]))
    obj.update(name=name, bucket=bucket, generation=str(generation),
               id=f"{bucket}/{name}/{generation}")
    if metadata:
        obj["metadata"] = metadata
    message["data"] = b64(json.dumps(obj))
    message["attributes"].update(bucketId=bucket, objectId=name,
                                 objectGeneration=str(generation), eventType=event_type)
    return ev


def post(client: Any, event: dict[str, Any], *, binary: bool = False) -> Any:
    """POST a CloudEvent to a functions-framework test client, structured or binary mode."""
    if not binary:
        return client.post("/", data=json.dumps(event),
                           headers={"Content-Type": "application/cloudevents+json"})
    headers = {f"ce-{k}": str(v) for k, v in event.items()
               if k not in ("data", "datacontenttype")}
    headers["Content-Type"] = "application/json"
    return client.post("/", data=json.dumps(event["data"]), headers=headers)
