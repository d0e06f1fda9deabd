"""Timestamps as they appear in documents: ISO 8601 in UTC with a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime

from pcp.core.errors import PermanentError


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise PermanentError(f"{what} must be an ISO 8601 timestamp string, got {value!r}")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PermanentError(f"{what} is not an ISO 8601 timestamp: {value!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def opt_time(value: object, what: str) -> datetime | None:
    return None if value is None else parse_time(value, what)


def opt_iso(t: datetime | None) -> str | None:
    return None if t is None else iso(t)
