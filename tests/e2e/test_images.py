"""Runs whose nodes run an OCI image, through the tiny stack's replica.

The image is built here (`podman import` of a busybox root filesystem holding a `sh` trainer
that honours the contract, pcp_dev/local/oci.py), pushed to a real registry on 127.0.0.1
(Debian's docker-registry) under a tag, and named by that tag in the start request: the start
function pins it to the registry's digest, and both nodes' agents pull that digest and run it
with Podman, as they would from Artifact Registry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pcp.core.images import parse_image
from pcp_dev.local import oci
from pcp_dev.local.replica import Replica
from tests.conftest import require_emulator
from tests.e2e.helpers import archived, metrics, start, wait_all_terminated, wait_final, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """HOST/pcp/trainer:e2e on a loopback registry: the contract trainer."""
    reason = oci.missing()
    if reason is not None:
        require_emulator(f"containers ({oci.PACKAGES})", RuntimeError(reason))
    work: Path = tmp_path_factory.mktemp("images")
    podman = oci.podman_engine(work)
    registry = oci.LocalRegistry(work / "registry").start()
    try:
        local = oci.contract_image(podman, work, "localhost/pcp-e2e-trainer:1")
        yield registry.push(podman, local, "pcp/trainer", "e2e")
    finally:
        registry.stop()


def text(replica: Replica, name: str) -> str:
    blob = replica.store().get(name)
    return "" if blob is None else blob.data.decode()


def test_an_image_run_pins_the_tag_and_runs_the_contract_in_containers(
        tiny: Replica, image: str) -> None:
    run_id = "e2e-image-ok"
    start(tiny, run_id, "--exit 0 'two words'", image=image)
    done = wait_final(tiny, run_id, timeout=120)
    assert done.status.value == "succeeded", done.detail
    run = archived(tiny, run_id)
    pinned = parse_image(run.image)
    assert pinned.pinned and pinned.name == parse_image(image).name  # the tag, pinned
    assert run.request.image == image
    for node in ("shepherd", "worker-0"):
        assert metrics(tiny, run_id, node) == {"loss": 0.5, "node": node}
        env = dict(line.split("=", 1) for line in
                   text(tiny, f"runs/{run_id}/{node}/env.txt").splitlines())
        # Every contract variable reached the container; the output dir is the mounted path.
        assert env["PCP_RUN_ID"] == run_id and env["PCP_NODE"] == node
        assert env["PCP_OUTPUT_DIR"].endswith("/output")
        assert env["PCP_RUN_SECRET"] == "present"
        assert {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "PCP_NUM_NODES"} <= set(env)
        stdout = text(tiny, f"runs/{run_id}/{node}/stdout.log")
        assert "pcp-progress step=1" in stdout
        head = "shepherd --port=" if node == "shepherd" else "worker --head-node=127.0.0.1:"
        assert f"argv: {head}" in stdout  # IMAGE shepherd --port=P / IMAGE worker --head-...
        assert " --exit 0 two words\n" in stdout  # the training config as plain arguments
    assert wait_all_terminated(tiny) == {"pcp-tiny-worker-0": "TERMINATED"}


def test_a_failing_container_fails_the_run_fast_with_its_exit_code(
        tiny: Replica, image: str) -> None:
    run_id = "e2e-image-fails"
    start(tiny, run_id, "--fail-worker 7", image=image)
    done = wait_final(tiny, run_id, timeout=120)
    assert done.status.value == "failed", done.detail
    assert done.summary is not None
    nodes = {n["name"]: n for n in done.summary["nodes"]}
    assert nodes["worker-0"]["exit_code"] == 7
    # The shepherd's container was waiting for the worker: the run's end stopped it the way
    # it stops a native binary (SIGTERM through the container's init), and it wrote done.
    done_marker = wait_for("the shepherd's done marker", lambda: text(
        tiny, f"markers/{run_id}/shepherd/done.json"), 60)
    shepherd = json.loads(done_marker)
    assert (shepherd["exit_code"], shepherd["signal"]) == (143, "SIGTERM"), shepherd
    assert "shepherd: SIGTERM" in text(tiny, f"runs/{run_id}/shepherd/stderr.log")
    assert "failing with exit code 7" in text(tiny, f"runs/{run_id}/worker-0/stderr.log")
    wait_for("no container of the run left", lambda: not oci.containers_of(run_id), 30)


def test_a_tag_the_registry_does_not_have_is_rejected_with_the_reason(
        tiny: Replica, image: str) -> None:
    run_id = "e2e-image-missing"
    start(tiny, run_id, image=image.rsplit(":", 1)[0] + ":no-such-tag")
    done = wait_final(tiny, run_id, timeout=60)
    assert done.status.value == "rejected"
    assert "no such repository or tag" in done.detail
