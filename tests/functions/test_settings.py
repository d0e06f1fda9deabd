"""The functions' settings: the function timeout and the fleet's operation timeout under it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcp.edge.services import build_service
from pcp.settings import (
    DEFAULT_FUNCTION_TIMEOUT_SECONDS,
    FUNCTION_TIMEOUT_MARGIN_SECONDS,
    Settings,
    SettingsError,
)

pytestmark = pytest.mark.functions

ENV = {
    "PCP_STACK": "tiny",
    "PCP_PROJECT": "pcp-test",
    "PCP_ZONE": "us-central1-a",
    "PCP_BUCKET": "pcp-tiny-pcp-test",
    "PCP_WORKER_COUNT": "1",
    "PCP_SHEPHERD_HOST": "shepherd.test",
}


def test_the_function_timeout_defaults_to_the_event_function_maximum() -> None:
    settings = Settings.from_env(ENV)
    assert DEFAULT_FUNCTION_TIMEOUT_SECONDS == 540
    assert settings.function_timeout_seconds == 540
    assert settings.operation_timeout_seconds == 540 - FUNCTION_TIMEOUT_MARGIN_SECONDS


@pytest.mark.parametrize(("timeout", "operations"), [("120", 90.0), ("300", 270.0),
                                                     ("540", 510.0), ("31", 1.0)])
def test_the_operation_timeout_leaves_the_margin(timeout: str, operations: float) -> None:
    settings = Settings.from_env({**ENV, "PCP_FUNCTION_TIMEOUT_SECONDS": timeout})
    assert settings.operation_timeout_seconds == operations
    assert settings.operation_timeout_seconds + 30 <= float(timeout)


@pytest.mark.parametrize("timeout", ["30", "0", "-5", "soon"])
def test_a_timeout_that_leaves_no_room_is_refused(timeout: str) -> None:
    with pytest.raises(SettingsError, match="PCP_FUNCTION_TIMEOUT_SECONDS"):
        Settings.from_env({**ENV, "PCP_FUNCTION_TIMEOUT_SECONDS": timeout})


def test_the_fleet_waits_no_longer_than_the_function_may_run() -> None:
    """build_service hands the derived timeout to the ComputeFleet it builds (no request is
    made: the clients are built on first use)."""
    settings = Settings.from_env({**ENV, "PCP_FUNCTION_TIMEOUT_SECONDS": "120"})
    fleet = build_service(settings).fleet
    assert fleet.op_timeout == 90.0  # type: ignore[attr-defined]


def test_the_first_boot_grace() -> None:
    assert Settings.from_env(ENV).policy.first_boot_grace_minutes == 30
    settings = Settings.from_env({**ENV, "PCP_FIRST_BOOT_GRACE_MINUTES": "45"})
    assert settings.policy.first_boot_grace_minutes == 45


def test_each_invocation_gets_the_operation_budget_once() -> None:
    """functions/main.py wraps every service call in `invocation`: the Compute Engine calls
    of one invocation share the budget (a sweep may list, stop and start)."""
    import time

    from pcp.edge.services import invocation

    settings = Settings.from_env({**ENV, "PCP_FUNCTION_TIMEOUT_SECONDS": "120"})
    service = build_service(settings)
    fleet = service.fleet
    with invocation(service, settings):
        time.sleep(0.2)
        left = fleet._until() - time.monotonic()  # type: ignore[attr-defined]
        assert 80.0 < left < 90.0 - 0.1
    assert fleet._until() - time.monotonic() > 89.9  # type: ignore[attr-defined]
    main = (Path(__file__).resolve().parents[2] / "functions" / "main.py").read_text()
    assert main.count("invocation(service, SETTINGS)") == 5  # one per entry point


def test_the_stack_gpu_idle_default_round_trips_and_bad_text_is_refused() -> None:
    from pcp.core.messages import GpuIdle
    from pcp.settings import Settings, SettingsError

    base = {"PCP_STACK": "tiny", "PCP_PROJECT": "p", "PCP_ZONE": "z", "PCP_BUCKET": "b",
            "PCP_WORKER_COUNT": "1", "PCP_SHEPHERD_HOST": "h"}
    s = Settings.from_env({**base, "PCP_GPU_IDLE": "2.5%:90s:1h"})
    assert s.policy.default_gpu_idle == GpuIdle(2.5, 1.5, 60)
    assert Settings.from_env(s.to_env()).policy.default_gpu_idle == GpuIdle(2.5, 1.5, 60)
    assert Settings.from_env(base).policy.default_gpu_idle is None
    with pytest.raises(SettingsError, match="PCP_GPU_IDLE"):
        Settings.from_env({**base, "PCP_GPU_IDLE": "5%"})
