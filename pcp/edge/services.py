"""The clock and the Service the functions call, built once per process."""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime

from pcp.service import Service
from pcp.settings import Settings


def now() -> datetime:
    """The one place an entry point reads the clock; the core receives the result."""
    return datetime.now(UTC)


def new_secret() -> str:
    """The one place an entry point draws randomness: a run's secret (256 bits, hex).

    decide() is pure, so the secret is drawn here, put on the accepted request, and kept by
    the run record from then on; its nodes receive it in their assignment.
    """
    return secrets.token_hex(32)


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
                GcsStore(settings.bucket, project=settings.project, stack=settings.stack),
                ComputeFleet(settings.project, settings.zone, settings.stack,
                             endpoint=settings.compute_endpoint,
                             op_timeout=settings.operation_timeout_seconds,
                             margin_seconds=settings.policy.hard_cap_margin_seconds),
                PubSubBus(settings.project, settings.stack),
                settings.policy,
                clock=now,
            )
            _services[key] = service
        return service


@contextmanager
def invocation(service: Service, settings: Settings) -> Iterator[None]:
    """One function invocation: the fleet's Compute Engine waits, all of them together, end
    `operation_timeout_seconds` after this point (the function's timeout less the margin), so
    the invocation still has time to save, publish and log."""
    budget = getattr(service.fleet, "invocation", None)
    with budget(settings.operation_timeout_seconds) if callable(budget) else nullcontext():
        yield
