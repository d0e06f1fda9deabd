"""One stack behind the real functions, for the storm and the call counts.

The functions are functions/main.py loaded by `functions_framework.create_app` and called
through its test client (in-process: 257 server processes would measure the machine, not
the control plane). Behind them: fake-gcs-server holds the bucket, the Pub/Sub emulator the
shepherd topic, and the local Compute endpoint runs in a child process. Every adapter is the
production one (GcsStore, ComputeFleet, PubSubBus), built by the entry point from the same
environment variables a deployed function gets.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pcp.core.messages import NodeMarker
from pcp.core.names import marker_path
from pcp_dev.bench.remote_compute import RemoteCompute
from pcp_dev.local.emulators import (
    EmulatorFailed,
    EmulatorMissing,
    FakeGcs,
    PubSubEmulator,
    ensure_topic,
    storage_client,
)

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "functions" / "main.py"
PROJECT, ZONE = "pcp-bench", "us-central1-a"
_ids = itertools.count(41000000000000001)


class Emulators:
    """fake-gcs-server and the Pub/Sub emulator, started once for the whole benchmark."""

    def __init__(self) -> None:
        self.gcs: FakeGcs | None = None
        self.pubsub: PubSubEmulator | None = None
        self.missing: str | None = None  # not installed: the parts are skipped
        self.failed: str | None = None  # installed but did not come up: the parts broke

    def start(self) -> Emulators:
        try:
            self.gcs = FakeGcs().start()
            self.pubsub = PubSubEmulator(PROJECT).start()
        except EmulatorMissing as e:
            self.stop()
            self.missing = str(e)
        except EmulatorFailed as e:
            self.stop()
            self.failed = str(e)
        return self

    def stop(self) -> None:
        for server in (self.pubsub, self.gcs):
            if server is not None:
                server.stop()
        self.gcs = self.pubsub = None


def nodes_of(workers: int) -> list[str]:
    return ["shepherd", *(f"worker-{i}" for i in range(workers))]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def start_event(stack: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """A `messagePublished` CloudEvent from pcp-<stack>-start, as Eventarc delivers it."""
    mid = str(next(_ids))
    return {
        "specversion": "1.0", "id": mid, "time": _now(),
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": f"//pubsub.googleapis.com/projects/{PROJECT}/topics/pcp-{stack}-start",
        "datacontenttype": "application/json",
        "data": {"subscription": f"projects/{PROJECT}/subscriptions/eventarc-{stack}",
                 "message": {"data": base64.b64encode(json.dumps(body).encode()).decode(),
                             "attributes": {}, "messageId": mid, "publishTime": _now()}},
    }


def sweep_event(stack: str) -> dict[str, Any]:
    event = start_event(stack, {"op": "tick"})
    event["source"] = f"//pubsub.googleapis.com/projects/{PROJECT}/topics/pcp-{stack}-sweep"
    return event


def finalized_event(bucket: str, name: str, generation: int,
                    metadata: Mapping[str, str]) -> dict[str, Any]:
    """Eventarc's `storage.object.v1.finalized` for a new marker object."""
    return {
        "specversion": "1.0", "id": str(next(_ids)), "time": _now(),
        "type": "google.cloud.storage.object.v1.finalized",
        "source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "subject": f"objects/{name}", "datacontenttype": "application/json",
        "data": {"kind": "storage#object", "name": name, "bucket": bucket,
                 "generation": str(generation), "metageneration": "1",
                 "contentType": "application/json", "metadata": dict(metadata)},
    }


def post(client: Any, event: Mapping[str, Any]) -> int:
    """Deliver a CloudEvent (structured mode) to a functions-framework test client."""
    response = client.post("/", data=json.dumps(event),
                           headers={"Content-Type": "application/cloudevents+json"})
    return int(response.status_code)


@dataclass
class FnStack:
    """A stack of `workers` VMs served by the four functions."""

    stack: str
    workers: int
    bucket: str
    gcs_direct: Any  # storage client straight to fake-gcs-server: the bench's own I/O
    compute: RemoteCompute
    env: dict[str, str]
    apps: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes(self) -> list[str]:
        return nodes_of(self.workers)

    @property
    def vms(self) -> list[str]:
        return [f"pcp-{self.stack}-worker-{i}" for i in range(self.workers)]

    def write_marker(self, run_id: str, node: str, kind: str
                     ) -> tuple[str, int, dict[str, str]]:
        """Upload a marker as a node agent does (body and custom metadata); returns the object
        name, its generation and the metadata its storage event carries."""
        marker = NodeMarker(run_id=run_id, node=node, kind="done" if kind == "done" else "booted",
                            attempt=1, at=datetime.now(UTC),
                            exit_code=0 if kind == "done" else None,
                            duration_s=1.0 if kind == "done" else None, host=node)
        name = marker_path(run_id, node, kind)
        blob = self.gcs_direct.bucket(self.bucket).blob(name)
        blob.metadata = marker.to_metadata()
        blob.upload_from_string(marker.to_json(), content_type="application/json")
        return name, int(blob.generation), marker.to_metadata()

    def marker_event(self, run_id: str, node: str, kind: str) -> dict[str, Any]:
        """Upload one marker and return the event its upload raises."""
        return finalized_event(self.bucket, *self.write_marker(run_id, node, kind))

    def marker_events(self, run_id: str, kind: str) -> list[dict[str, Any]]:
        return [self.marker_event(run_id, n, kind) for n in self.nodes]

    def read(self, name: str) -> dict[str, Any] | None:
        blob = self.gcs_direct.bucket(self.bucket).get_blob(name)
        return None if blob is None else json.loads(blob.download_as_bytes())

    def service(self) -> Any:
        """The Service the functions of this stack use (the entry point's per-process one)."""
        from pcp.edge.services import build_service
        from pcp.settings import Settings

        with self.activated():
            return build_service(Settings.from_env(self.env))

    @contextmanager
    def activated(self) -> Iterator[None]:
        """The deployed function's environment, set for the process while it is used."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@contextmanager
def fn_stack(emulators: Emulators, stack: str, workers: int,
             gcs_endpoint: str | None = None) -> Iterator[FnStack]:
    """Make a stack: bucket, shepherd topic, VMs, environment, the functions loaded.

    `gcs_endpoint` is where the functions reach GCS (a counting proxy); the bench's own
    reads and writes always go straight to fake-gcs-server.
    """
    import functions_framework

    assert emulators.gcs is not None and emulators.pubsub is not None
    direct = storage_client(emulators.gcs.endpoint, PROJECT)
    bucket = f"pcp-{stack}-{uuid.uuid4().hex[:12]}"
    direct.create_bucket(bucket)
    ensure_topic(emulators.pubsub.host, PROJECT, f"pcp-{stack}-shepherd")
    with RemoteCompute(PROJECT, ZONE) as compute:
        compute.add_workers(stack, workers, {"pcp-stack": stack, "pcp-bucket": bucket,
                                             "pcp-project": PROJECT})
        env = {
            "PCP_STACK": stack, "PCP_PROJECT": PROJECT, "PCP_ZONE": ZONE,
            "PCP_BUCKET": bucket, "PCP_WORKER_COUNT": str(workers),
            "PCP_SHEPHERD_HOST": "shepherd.bench", "PCP_BINARY": "github:example/trainer",
            "PCP_COMPUTE_ENDPOINT": compute.endpoint,
            "STORAGE_EMULATOR_HOST": gcs_endpoint or emulators.gcs.endpoint,
            "PUBSUB_EMULATOR_HOST": emulators.pubsub.host,
        }
        fn = FnStack(stack, workers, bucket, direct, compute, env)
        with fn.activated():
            fn.apps = {t: functions_framework.create_app(  # type: ignore[no-untyped-call]
                t, source=str(MAIN), signature_type="cloudevent")
                       for t in ("on_start", "on_marker", "on_sweep")}
        yield fn


def check_run(fn: FnStack, run_id: str) -> dict[str, Any]:
    """Was anything lost? Every node DONE in the record, and the run ended exactly once."""
    state = fn.read("control/stack.json") or {}
    record = fn.read(f"runs/{run_id}/run.json") or {}
    done = sorted(n["name"] for n in record.get("nodes", []) if n.get("phase") == "done")
    ends = [h for h in record.get("history", []) if str(h.get("change", "")).endswith("-> ended")]
    recent = [r for r in state.get("recent", []) if r.get("run_id") == run_id]
    return {
        "status": record.get("status"),
        "nodes_done": len(done),
        "lost_updates": len(fn.nodes) - len(done),
        "ended_times": len(ends),
        "in_recent": len(recent),
        "active_cleared": state.get("active") is None,
        "ok": (record.get("status") == "succeeded" and len(done) == len(fn.nodes)
               and len(ends) == 1 and len(recent) == 1 and state.get("active") is None),
    }
