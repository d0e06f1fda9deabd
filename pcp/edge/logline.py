"""The one structured log line each invocation writes, and the transient-failure guard."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pcp.core.errors import PermanentError
from pcp.core.heals import ended_fields, heals
from pcp.core.state import Status
from pcp.logs import log
from pcp.service import Outcome
from pcp.settings import Settings


def log_outcome(settings: Settings, event: str, outcome: Outcome, run_id: str | None,
                **fields: Any) -> None:
    """The entry point's one line: what the service decided and how many races it lost.

    Stable fields (docs/architecture.md, "Log lines and metrics"): `kinds`, `conflicts`,
    `end_reason`, `end_status` and `ended` when runs ended, and `heals` and
    `hard_cap_stops` (with `hard_cap_vms` when some) on a sweep's line.
    """
    severity = "WARNING" if outcome.errors else "INFO"
    known = None if run_id is None else outcome.transition.state.find(run_id)
    if known is not None and known.status is Status.REJECTED:
        severity = "WARNING"
    notes = outcome.transition.notes
    extra: dict[str, Any] = ended_fields(notes, run_id)
    if event == "sweep":
        extra["heals"] = heals(notes)
        extra["hard_cap_stops"] = len(outcome.hard_cap_stops)
        if outcome.hard_cap_stops:
            extra["hard_cap_vms"] = list(outcome.hard_cap_stops)
    log(severity, event, stack=settings.stack, run_id=run_id, reason=outcome.reason,
        kinds=[k.value for k in outcome.transition.kinds()], conflicts=outcome.conflicts,
        commands=len(outcome.commands), saved=outcome.saved,
        errors=outcome.errors, **extra, **fields)


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
            reason=f"transient failure, the trigger will retry: {type(e).__name__}: {e}",
            failure="transient", error_type=type(e).__name__)
        raise
