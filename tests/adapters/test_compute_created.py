"""The VM's creation time as the sweeper's first-boot grace reads it (no API call needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from pcp.adapters.compute_fleet import created_epoch

pytestmark = pytest.mark.adapters


@pytest.mark.parametrize(("raw", "expected"), [
    # Compute Engine writes RFC 3339 with milliseconds and the zone's offset.
    ("2026-12-01T10:00:00.123-08:00", datetime(2026, 12, 1, 18, 0, tzinfo=UTC)),
    ("2026-12-01T18:00:00Z", datetime(2026, 12, 1, 18, 0, tzinfo=UTC)),
])
def test_the_creation_timestamp(raw: str, expected: datetime) -> None:
    assert created_epoch(SimpleNamespace(creation_timestamp=raw)) == int(expected.timestamp())


@pytest.mark.parametrize("raw", ["", "yesterday", None])
def test_no_usable_timestamp_means_no_grace(raw: str | None) -> None:
    assert created_epoch(SimpleNamespace(creation_timestamp=raw)) is None
    assert created_epoch(object()) is None
