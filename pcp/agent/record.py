"""What a node needs from the run record (runs/<run_id>/run.json): is my attempt over?

Read loosely on purpose: the agent only needs the phase, the attempt and the keep-alive
lease, and an agent older than the control plane must not stop a run because the record
grew a field. A missing or unreadable record means "no news", never "over".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pcp.core.errors import PermanentError
from pcp.core.messages import decode_json
from pcp.core.names import marker_path, run_doc
from pcp.core.ports import BlobStore
from pcp.core.timefmt import opt_time


@dataclass(frozen=True)
class RunView:
    phase: str
    attempt: int
    reason: str | None = None
    detail: str = ""
    keep_alive_until: datetime | None = None

    def over_for(self, attempt: int) -> str | None:
        """Why `attempt` is over according to this record, or None while it may go on."""
        if self.attempt > attempt:
            return f"the run moved on to attempt {self.attempt}"
        if self.attempt == attempt and self.phase == "ended":
            why = self.reason or "ended"
            return f"the run ended ({why}{': ' + self.detail if self.detail else ''})"
        return None


def read_run(store: BlobStore, run_id: str) -> RunView | None:
    blob = store.get(run_doc(run_id))
    if blob is None:
        return None
    try:
        d = decode_json(blob.data, "run record", limit=None)
        return RunView(
            phase=str(d["phase"]),
            attempt=int(d.get("attempt", 1)),
            reason=d.get("reason"),
            detail=str(d.get("detail") or ""),
            keep_alive_until=opt_time(d.get("keep_alive_until"), "keep_alive_until"),
        )
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, PermanentError):
        return None


def done_attempt(store: BlobStore, run_id: str, node: str) -> int | None:
    """The attempt of this node's done marker, if one exists (a rebooted VM must not re-run)."""
    blob = store.get(marker_path(run_id, node, "done"))
    if blob is None:
        return None
    try:
        return int(decode_json(blob.data, "done marker", limit=None).get("attempt", 1))
    except (ValueError, TypeError, AttributeError, RecursionError):
        return None
