"""Replicas shared by the end-to-end tests: one per stack, for the module that uses it.

A replica takes a few seconds to start (the Pub/Sub emulator, four function servers), so
the tests share one per stack and tell their runs apart by run id. Settings are short so
the whole tier stays within five minutes on two cores: a sweep tick every 2 s, a boot
timeout of 21 s (generous for a loaded machine), a keep-alive lease of about 14 s and a
gpu_idle policy minute of one second on the tiny stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pcp_dev.local import oci
from pcp_dev.local.emulators import EmulatorMissing
from pcp_dev.local.replica import Options, Replica
from tests.conftest import require_emulator
from tests.e2e.helpers import settle


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each e2e test runs whole training runs on a replica shared with the module's other
    tests, on two loaded cores; a failure is run once more, and both are reported (`R` in
    the progress line, `rerun` in the summary). A test that fails twice fails the tier."""
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.flaky(reruns=1))


def launch(options: Options) -> Replica:
    try:
        return Replica(options).start()
    except EmulatorMissing as exc:
        require_emulator("the local replica's emulators", exc)


def container_options(state: Path) -> dict[str, Any]:
    """The agents' Podman, set up as these machines need it (pcp_dev/local/oci.py), when it
    is installed; runs that name an image skip otherwise (tests/e2e/test_images.py)."""
    if oci.missing() is not None:
        return {}
    podman = oci.podman_engine(state / "podman")
    return {"container_engine": podman.command, "agent_extra_env": podman.env}


@pytest.fixture(scope="module")
def tiny_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    state: Path = tmp_path_factory.mktemp("replica-tiny")
    replica = launch(Options(stack="tiny", state_dir=state, boot_timeout_minutes=0.35,
                             keep_alive_hours=0.004, sweep_interval=2.0, agent_interval=0.5,
                             grace=3.0, gpu_minute_seconds=1.0,
                             **container_options(state)))
    try:
        yield replica
    finally:
        replica.stop()


@pytest.fixture(scope="module")
def small_replica(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replica]:
    state: Path = tmp_path_factory.mktemp("replica-small")
    replica = launch(Options(stack="small", state_dir=state, boot_timeout_minutes=1.0,
                             sweep_interval=2.0, agent_interval=0.5, grace=3.0))
    try:
        yield replica
    finally:
        replica.stop()


@pytest.fixture
def tiny(tiny_replica: Replica) -> Iterator[Replica]:
    """The shared tiny replica, idle before and after the test."""
    settle(tiny_replica)
    try:
        yield tiny_replica
    finally:
        tiny_replica.hold_boot.clear()
        for vm in tiny_replica.vms:  # one idle GPU, as the replica starts with
            tiny_replica.set_gpus(vm, [(0, 0)])
        for kind, child in tiny_replica.functions.items():
            if not child.running:
                tiny_replica.start_function(kind)
        settle(tiny_replica)
