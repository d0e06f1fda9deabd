"""The CLI over emulator-backed adapters, found through the local replica's state file.

fake-gcs-server holds the stack bucket and the Pub/Sub emulator the topics; the CLI builds
its own clients for them from `.pcp-local/tiny.json` (here in a temporary directory), exactly
as after `pcp local up`. The control plane is the real Service over the real GcsStore.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from pcp.adapters.gcs_store import GcsStore
from pcp.core.messages import StartRequest, StopRequest, SweepTick
from pcp_dev.local.emulators import ensure_subscription, ensure_topic, subscriber

pytestmark = [pytest.mark.cli, pytest.mark.emulator]

KINDS = ("start", "stop", "sweep", "shepherd")


@dataclass
class LocalStack:
    project: str
    host: str
    store: GcsStore
    env: dict[str, str]
    subscriptions: dict[str, str]

    def pull(self, kind: str, expect: int = 1) -> list[Any]:
        """Messages published to pcp-tiny-<kind>, acknowledged."""
        client = subscriber(self.host)
        try:
            got: list[Any] = []
            for _ in range(20):
                response = client.pull(request={"subscription": self.subscriptions[kind],
                                                "max_messages": 10}, timeout=10)
                got += [m.message for m in response.received_messages]
                if response.received_messages:
                    client.acknowledge(request={
                        "subscription": self.subscriptions[kind],
                        "ack_ids": [m.ack_id for m in response.received_messages]})
                if len(got) >= expect:
                    return got
            return got
        finally:
            client.close()


@pytest.fixture
def local_stack(tmp_path, gcs_bucket, pubsub_emulator) -> LocalStack:
    project = f"pcp-cli-{uuid.uuid4().hex[:8]}"  # topics of its own in the shared emulator
    subscriptions = {}
    for kind in KINDS:
        ensure_topic(pubsub_emulator.host, project, f"pcp-tiny-{kind}")
        subscriptions[kind] = ensure_subscription(pubsub_emulator.host, project,
                                                  f"test-{kind}", f"pcp-tiny-{kind}")
    (tmp_path / "tiny.json").write_text(json.dumps({
        "stack": "tiny", "project": project, "bucket": gcs_bucket.name,
        "storage_endpoint": gcs_bucket.endpoint, "pubsub_host": pubsub_emulator.host}))
    store = GcsStore(gcs_bucket.name, client=gcs_bucket.client)
    return LocalStack(project, pubsub_emulator.host, store, {"PCP_LOCAL_DIR": str(tmp_path)},
                      subscriptions)


def test_run_publishes_to_the_emulator_topic(local_stack, invoke) -> None:
    result = invoke(["run", "--config", "--epochs 3", "--run-id", "r-emu"], env=local_stack.env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "r-emu"
    [message] = local_stack.pull("start")
    request = StartRequest.from_json(message.data)
    assert (request.run_id, request.training_args, request.stack) == (
        "r-emu", ("--epochs", "3"), "tiny")
    assert message.attributes["run_id"] == "r-emu"


def test_run_wait_end_to_end_over_emulators(local_stack, invoke, stack_over) -> None:
    """The start travels through the Pub/Sub emulator; the state through fake-gcs-server."""
    driver = stack_over(local_stack.store)

    def control_plane() -> None:
        [message] = local_stack.pull("start")
        request = StartRequest.from_json(message.data)
        driver.service.handle(request, driver.t0)
        driver.finish(request.run_id, {})

    thread = threading.Thread(target=control_plane, daemon=True)
    thread.start()
    result = invoke(["run", "--run-id", "r-e2e", "--wait", "--poll", "0.05", "--timeout", "60"],
                    env=local_stack.env)
    thread.join(30)
    assert result.exit_code == 0, result.output
    assert "run r-e2e: succeeded" in result.stdout and "loss" in result.stdout
    runs = json.loads(invoke(["runs", "--json"], env=local_stack.env).stdout)["runs"]
    assert [(r["run_id"], r["status"]) for r in runs] == [("r-e2e", "succeeded")]


def test_reads_stop_and_results(local_stack, invoke, stack_over, tmp_path) -> None:
    driver = stack_over(local_stack.store)
    driver.start("r-a", requested_by="alice")
    driver.start("r-b")
    env = local_stack.env
    status = json.loads(invoke(["status", "--json"], env=env).stdout)
    assert status["active"]["run_id"] == "r-a" and status["queue"][0]["run_id"] == "r-b"
    assert "r-b" in invoke(["queue"], env=env).stdout
    stopped = invoke(["stop", "r-b", "--reason", "not needed"], env=env)
    assert stopped.exit_code == 0, stopped.output
    [message] = local_stack.pull("stop")
    assert StopRequest.from_json(message.data).reason == "not needed"
    unknown = invoke(["stop", "r-zz"], env=env)
    assert unknown.exit_code == 1 and "unknown run 'r-zz'" in unknown.stderr
    driver.finish("r-a", {})
    result = invoke(["results", "r-a", "--dest", str(tmp_path / "res"), "--json"], env=env)
    assert result.exit_code == 0, result.output
    got = tmp_path / "res" / "r-a"  # DEST/RUN_ID/
    assert json.loads((got / "summary.json").read_text())["status"] == "succeeded"
    assert (got / "worker-0" / "stdout.log").read_text() == "worker-0: step 1\n"
    assert "worker-0: step 1" in invoke(["logs", "r-a", "--node", "worker-0"], env=env).stdout


def test_sweep_publishes_a_tick_without_a_scheduler(local_stack, invoke) -> None:
    result = invoke(["sweep"], env=local_stack.env)
    assert result.exit_code == 0, result.output
    assert "no Cloud Scheduler in the local replica" in result.stdout
    [message] = local_stack.pull("sweep")
    assert SweepTick.from_json(message.data).requested_by


def test_doctor_all_good(local_stack, invoke) -> None:
    result = invoke(["doctor"], env=local_stack.env)
    assert result.exit_code == 0, result.output
    for line in ("✓ credentials: not needed (local replica emulators)", "✓ bucket",
                 "✓ topics: pcp-tiny-start, pcp-tiny-stop, pcp-tiny-sweep, pcp-tiny-shepherd",
                 "– scheduler job: no Cloud Scheduler in the local replica"):
        assert line in result.stdout


def test_doctor_reports_missing_topics_and_bucket(tmp_path, fake_gcs, pubsub_emulator,
                                                  invoke) -> None:
    project = f"pcp-cli-{uuid.uuid4().hex[:8]}"
    ensure_topic(pubsub_emulator.host, project, "pcp-tiny-start")
    (tmp_path / "tiny.json").write_text(json.dumps({
        "project": project, "bucket": f"missing-{uuid.uuid4().hex[:8]}",
        "storage_endpoint": fake_gcs.endpoint, "pubsub_host": pubsub_emulator.host}))
    result = invoke(["doctor", "--json"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1, result.output
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["bucket"]["state"] == "fail" and "does not exist" in checks["bucket"]["detail"]
    assert checks["topics"]["state"] == "fail"
    assert checks["topics"]["detail"] == ("missing: pcp-tiny-stop, pcp-tiny-sweep, "
                                          "pcp-tiny-shepherd")
