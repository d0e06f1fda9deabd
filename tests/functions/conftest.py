"""A stack behind the real functions: fake-gcs-server, the Pub/Sub emulator, LocalCompute.

`make_stack` sets the environment the deployed functions get, loads functions/main.py through
`functions_framework.create_app` once per entry point (the environment is read at that
moment), and hands back helpers that post CloudEvents and read what the functions did. The
production adapters (GcsStore, ComputeFleet, PubSubBus) do the work: nothing is mocked.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import functions_framework
import pytest

from pcp.core.messages import NodeMarker, ShepherdCommand
from pcp.core.names import LABEL_STACK, STACK_DOC, marker_path
from pcp.core.state import StackState
from pcp.edge.services import build_service
from pcp.progress import observe
from pcp.service import Service
from pcp.settings import Settings
from pcp_dev.local.compute import LocalCompute, VmRecord
from pcp_dev.local.emulators import PubSubEmulator, ensure_subscription, ensure_topic, subscriber
from tests.conftest import TEST_PROJECT, GcsBucket
from tests.functions import events

MAIN = Path(__file__).resolve().parents[2] / "functions" / "main.py"
TARGETS = ("on_start", "on_stop", "on_marker", "on_sweep", "on_budget")
ZONE = "us-central1-a"
TOPICS = ("start", "stop", "sweep", "shepherd", "markers", "dead-letter", "budget")


@dataclass
class FnStack:
    """One stack served by the four functions, with its bucket, VMs and shepherd topic."""

    stack: str
    workers: int
    bucket: GcsBucket
    compute: LocalCompute
    pubsub: PubSubEmulator
    apps: dict[str, Any]
    shepherd_sub: str
    env: dict[str, str]
    _pulled: list[ShepherdCommand] = field(default_factory=list)

    # ------------------------------------------------------------ events in

    def post(self, target: str, event: dict[str, Any], *, binary: bool = False,
             client: Any = None) -> Any:
        return events.post(client or self.apps[target].test_client(), event, binary=binary)

    def start(self, body: dict[str, Any] | bytes | str, *, message_id: str | None = None,
              raw_data: str | None = None) -> Any:
        data = json.dumps(body) if isinstance(body, dict) else body
        return self.post("on_start", events.pubsub_event(
            data, topic=f"pcp-{self.stack}-start", message_id=message_id, raw_data=raw_data))

    def stop(self, body: dict[str, Any] | bytes) -> Any:
        data = json.dumps(body) if isinstance(body, dict) else body
        return self.post("on_stop", events.pubsub_event(data, topic=f"pcp-{self.stack}-stop"))

    def budget(self, data: bytes, attributes: dict[str, str]) -> Any:
        return self.post("on_budget", events.pubsub_event(
            data, topic=f"pcp-{self.stack}-budget", attributes=attributes))

    def sweep(self) -> Any:
        return self.post("on_sweep", events.pubsub_event(b'{"op": "tick"}',
                                                         topic=f"pcp-{self.stack}-sweep"))

    def write_marker(self, run_id: str, node: str, kind: str, *, exit_code: int = 0,
                     attempt: int = 1, body: bytes | None = None,
                     described: bool = False) -> tuple[str, int]:
        """Upload a marker as a node agent would; returns (object name, generation)."""
        marker = NodeMarker(run_id=run_id, node=node, kind="done" if kind == "done" else "booted",
                            attempt=attempt, at=datetime(2026, 11, 29, 12, 0, tzinfo=UTC),
                            exit_code=exit_code if kind == "done" else None,
                            duration_s=60.0 if kind == "done" else None, host=node)
        name = marker_path(run_id, node, kind)
        blob = self.bucket.client.bucket(self.bucket.name).blob(name)
        if described:  # as the node agent writes it: the marker also in custom metadata
            blob.metadata = marker.to_metadata()
        blob.upload_from_string(marker.to_json() if body is None else body,
                                content_type="application/json")
        return name, int(blob.generation)

    def marker_event(self, name: str, generation: int, shape: str,
                     metadata: dict[str, str] | None = None) -> dict[str, Any]:
        if shape == "finalized":
            return events.finalized_event(self.bucket.name, name, generation, metadata=metadata)
        return events.notification_event(self.bucket.name, name, generation, metadata=metadata,
                                         topic=f"pcp-{self.stack}-markers")

    def marker(self, run_id: str, node: str, kind: str, *, shape: str = "finalized",
               exit_code: int = 0) -> Any:
        name, generation = self.write_marker(run_id, node, kind, exit_code=exit_code)
        return self.post("on_marker", self.marker_event(name, generation, shape))

    def service(self) -> Service:
        """The per-process Service the functions of this stack use (built on first use)."""
        return build_service(Settings.from_env(self.env))

    # ------------------------------------------------------------ what happened

    def read(self, name: str) -> dict[str, Any] | None:
        blob = self.bucket.client.bucket(self.bucket.name).get_blob(name)
        return None if blob is None else json.loads(blob.download_as_bytes())

    def read_metadata(self, name: str) -> dict[str, str]:
        """The object's custom metadata as the storage service reports it."""
        blob = self.bucket.client.bucket(self.bucket.name).get_blob(name)
        assert blob is not None
        return dict(blob.metadata or {})

    def names(self, prefix: str) -> list[str]:
        return sorted(b.name for b in self.bucket.client.list_blobs(self.bucket.name,
                                                                    prefix=prefix))

    def state(self) -> dict[str, Any]:
        """The stack state as every reader sees it: control/stack.json, with the active run's
        node phases derived from its markers (pcp.progress.observe)."""
        doc = self.read(STACK_DOC)
        assert doc is not None, "control/stack.json was never written"
        state, _ = observe(self.service().store, StackState.from_json(json.dumps(doc)))
        return json.loads(state.to_json())

    @property
    def vm_names(self) -> list[str]:
        return [f"pcp-{self.stack}-worker-{i}" for i in range(self.workers)]

    def vm(self, name: str) -> VmRecord:
        return self.compute.vm(name)

    def running(self) -> list[str]:
        return [n for n in self.vm_names if self.vm(n).status == "RUNNING"]

    def pull_shepherd(self, want: int = 1, timeout: float = 10.0) -> list[ShepherdCommand]:
        """Commands on the shepherd topic since the stack was made (acknowledged as pulled)."""
        client = subscriber(self.pubsub.host)
        deadline = time.monotonic() + timeout
        try:
            while len(self._pulled) < want and time.monotonic() < deadline:
                response = client.pull(subscription=self.shepherd_sub, max_messages=50,
                                       timeout=5)
                if not response.received_messages:
                    continue
                self._pulled += [ShepherdCommand.from_json(m.message.data)
                                 for m in response.received_messages]
                client.acknowledge(subscription=self.shepherd_sub,
                                   ack_ids=[m.ack_id for m in response.received_messages])
        finally:
            client.close()
        return list(self._pulled)


def log_lines(text: str) -> list[dict[str, Any]]:
    """The structured lines in captured stdout (anything else is not ours)."""
    out = []
    for line in text.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "severity" in obj:
            out.append(obj)
    return out


MakeStack = Callable[..., FnStack]


@pytest.fixture
def make_stack(gcs_bucket: GcsBucket, pubsub_emulator: PubSubEmulator,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeStack]:
    """Build stacks; the first uses `gcs_bucket`, later ones get a bucket of their own."""
    made: list[FnStack] = []

    def make(workers: int = 1, stack: str = "tiny", **env: str) -> FnStack:
        bucket = gcs_bucket
        if made:
            name = f"pcp-test-{uuid.uuid4().hex[:16]}"
            gcs_bucket.client.create_bucket(name)
            bucket = GcsBucket(client=gcs_bucket.client, name=name,
                               endpoint=gcs_bucket.endpoint)
        compute = LocalCompute(TEST_PROJECT, ZONE).start()
        for i in range(workers):
            compute.add_instance(
                f"pcp-{stack}-worker-{i}",
                labels={LABEL_STACK: stack, "pcp-role": "worker", "pcp-node": f"worker-{i}"},
                metadata={"pcp-stack": stack, "pcp-bucket": bucket.name,
                          "pcp-project": TEST_PROJECT})
        for topic in TOPICS:
            ensure_topic(pubsub_emulator.host, TEST_PROJECT, f"pcp-{stack}-{topic}")
        sub = ensure_subscription(pubsub_emulator.host, TEST_PROJECT,
                                  f"pcp-{stack}-shepherd-host-{uuid.uuid4().hex[:8]}",
                                  f"pcp-{stack}-shepherd")
        settings = {
            "PCP_STACK": stack,
            "PCP_PROJECT": TEST_PROJECT,
            "PCP_ZONE": ZONE,
            "PCP_BUCKET": bucket.name,
            "PCP_WORKER_COUNT": str(workers),
            "PCP_SHEPHERD_HOST": "shepherd.test",
            "PCP_BINARY": "github:example/trainer",
            "PCP_COMPUTE_ENDPOINT": compute.endpoint,
            "STORAGE_EMULATOR_HOST": bucket.endpoint,
            "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
            **env,
        }
        for key, value in settings.items():
            monkeypatch.setenv(key, value)
        apps = {t: functions_framework.create_app(t, source=str(MAIN),
                                                  signature_type="cloudevent")
                for t in TARGETS}
        fn = FnStack(stack, workers, bucket, compute, pubsub_emulator, apps, sub, settings)
        made.append(fn)
        return fn

    try:
        yield make
    finally:
        for fn in made:
            fn.compute.stop()
