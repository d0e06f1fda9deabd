"""What a decision healed and which runs it ended, as stable kinds for logs and audits.

The functions' log lines (pcp/edge/logline.py) and the sweep's audit record (pcp/service.py)
carry these fields; the log-based metrics (infra/pcp_infra/monitoring.py) and `pcp events`
read them. Values are stable: renaming one breaks a metric filter.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pcp.core.lifecycle import Note, NoteKind
from pcp.core.state import STATUS_OF_REASON, Reason


class Heal(StrEnum):
    """What a sweep repaired: the `heals` field of the sweep's log line and audit record."""

    ORPHANS_STOPPED = "orphans_stopped"  # VMs running with no run or lease, stopped
    START_REISSUED = "start_reissued"  # VMs of a starting run that were not up, started again
    SHEPHERD_RESENT = "shepherd_resent"
    LOST_MARKER = "lost_marker"  # a run transition a lost marker event should have made
    LEASE_ENDED = "lease_ended"  # a keep-alive lease expired or was taken over
    DEADLINE_ENFORCED = "deadline_enforced"  # a run ended timed_out or boot_timeout
    RECORD_REWRITTEN = "record_rewritten"


_HEAL_OF_KIND = {
    NoteKind.ORPHANS_STOPPED: Heal.ORPHANS_STOPPED,
    NoteKind.START_REISSUED: Heal.START_REISSUED,
    NoteKind.SHEPHERD_RESENT: Heal.SHEPHERD_RESENT,
    NoteKind.LEASE_EXPIRED: Heal.LEASE_ENDED,
    NoteKind.LEASE_TAKEN_OVER: Heal.LEASE_ENDED,
    NoteKind.RECORD_REWRITTEN: Heal.RECORD_REWRITTEN,
    NoteKind.RUN_RUNNING: Heal.LOST_MARKER,
}
_DEADLINES = (Reason.TIMED_OUT, Reason.BOOT_TIMEOUT)
#: Ends asked for (a person's stop, a bad request, the budget switch): nothing was healed.
_NOT_HEALS = (Reason.CANCELLED, Reason.REJECTED, Reason.BUDGET_EXCEEDED)


def heal_of(note: Note) -> Heal | None:
    """The heal a sweep's note stands for, or None (a sweep's note only: the same kinds made
    by a marker event are the event path working, not a heal)."""
    if note.kind is NoteKind.RUN_ENDED:
        if note.ended in _DEADLINES:
            return Heal.DEADLINE_ENFORCED
        return None if note.ended in _NOT_HEALS else Heal.LOST_MARKER
    return _HEAL_OF_KIND.get(note.kind)


def heals(notes: tuple[Note, ...]) -> dict[str, int]:
    """How many of each heal a sweep's notes record, by `Heal` value."""
    counts: dict[str, int] = {}
    for note in notes:
        heal = heal_of(note)
        if heal is not None:
            counts[heal.value] = counts.get(heal.value, 0) + 1
    return counts


def ended_fields(notes: tuple[Note, ...], run_id: str | None) -> dict[str, Any]:
    """`end_reason`, `end_status` and `ended` (how many) when the decision ended runs: the
    line's own run's end if it ended, else the first. Empty when no run ended."""
    ends = [n for n in notes if n.kind is NoteKind.RUN_ENDED and n.ended is not None]
    if not ends:
        return {}
    first = next((n for n in ends if n.run_id == run_id), ends[0])
    assert first.ended is not None
    return {"end_reason": first.ended.value,
            "end_status": STATUS_OF_REASON[first.ended].value, "ended": len(ends)}
