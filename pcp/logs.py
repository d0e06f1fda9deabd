"""Structured logs: one JSON object per line on stdout.

Cloud Functions hands stdout to Cloud Logging, which parses a JSON line into a structured entry:
`severity` becomes the entry's level and `message` its summary line, and every other key is
searchable (`jsonPayload.run_id="..."`). The same lines are what the tests capture.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import Any

SEVERITIES = ("DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL")

# One write per line under a lock, so lines from concurrent requests never interleave.
_lock = threading.Lock()


def log(severity: str, event: str, *, stack: str, run_id: str | None = None, reason: str,
        **fields: Any) -> None:
    """Print one structured line: severity, stack, run_id, event, reason, then `fields`."""
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    record: dict[str, Any] = {
        "severity": severity,
        "stack": stack,
        "run_id": run_id,
        "event": event,
        "reason": reason,
    }
    for key, value in fields.items():
        record.setdefault(key, value)
    record.setdefault("message", f"{event}: {reason}")
    line = json.dumps(record, default=str, separators=(",", ":"), ensure_ascii=False)
    # A lone surrogate from hostile input cannot be written as UTF-8: escape it, keep the line.
    line = line.encode("utf-8", "backslashreplace").decode("utf-8")
    with _lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
