"""Input that can never succeed: recorded where `pcp status` shows it, logged, acknowledged."""

from __future__ import annotations

from datetime import datetime

from pcp.core.errors import PermanentError
from pcp.core.messages import dump, load_object, run_id_from_message_id, validate_run_id
from pcp.core.names import rejection_doc
from pcp.core.ports import BlobStore
from pcp.core.state import Status
from pcp.core.timefmt import iso
from pcp.logs import log
from pcp.service import Service
from pcp.settings import Settings


def record_rejection(store: BlobStore, kind: str, message_id: str, detail: str,
                     now: datetime) -> str:
    """Write control/rejected/<time>-<kind>-<message id>.json, which `pcp status` lists.

    For events that are not start requests (those become rejected runs instead). Returns the
    object name.
    """
    name = rejection_doc(iso(now), kind, message_id)
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
