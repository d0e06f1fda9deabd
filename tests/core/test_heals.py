"""Which notes are heals, and the end fields of a log line."""

from __future__ import annotations

from pcp.core.heals import Heal, ended_fields, heal_of, heals
from pcp.core.lifecycle import Note, NoteKind
from pcp.core.state import Reason


def test_heals_count_what_a_sweep_repaired() -> None:
    notes = (Note(NoteKind.ORPHANS_STOPPED, None, "x"), Note(NoteKind.LEASE_EXPIRED, "r", "x"),
             Note(NoteKind.LEASE_TAKEN_OVER, "r", "x"), Note(NoteKind.QUEUED, "q", "x"),
             Note(NoteKind.RUN_ENDED, "a", "x", ended=Reason.TIMED_OUT),
             Note(NoteKind.RUN_ENDED, "b", "x", ended=Reason.CANCELLED),
             Note(NoteKind.RUN_ENDED, "c", "x", ended=Reason.SUCCEEDED))
    assert heals(notes) == {"orphans_stopped": 1, "lease_ended": 2, "deadline_enforced": 1,
                            "lost_marker": 1}
    assert heal_of(Note(NoteKind.RUN_ENDED, "d", "x", ended=Reason.BOOT_TIMEOUT)) is \
        Heal.DEADLINE_ENFORCED
    assert heal_of(Note(NoteKind.RUN_ENDED, "e", "x", ended=Reason.REJECTED)) is None
    assert heals(()) == {}


def test_ended_fields_prefer_the_lines_own_run() -> None:
    notes = (Note(NoteKind.RUN_ENDED, "a", "x", ended=Reason.NODE_LOST),
             Note(NoteKind.RUN_ENDED, "b", "x", ended=Reason.CANCELLED))
    assert ended_fields(notes, "b") == {"end_reason": "cancelled", "end_status": "cancelled",
                                        "ended": 2}
    assert ended_fields(notes, None) == {"end_reason": "node_lost", "end_status": "failed",
                                         "ended": 2}
    assert ended_fields((Note(NoteKind.QUEUED, "a", "x"),), "a") == {}
