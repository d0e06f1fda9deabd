"""Errors shared by the core, the ports and the entry points."""

from __future__ import annotations


class PermanentError(ValueError):
    """Input that can never succeed, however often it is retried.

    Entry points log it, record it where `pcp status` shows it, and acknowledge the event.
    """


class CorruptState(PermanentError):
    """A stored document that cannot be parsed."""


class Conflict(Exception):
    """A conditional write lost a race (HTTP 412): re-read and decide again."""


class CapacityError(Exception):
    """Compute refused a start for a reason retrying will not fix: no capacity in the zone
    (ZONE_RESOURCE_POOL_EXHAUSTED), quota, or a VM that does not exist.

    The run ends with this reason in plain words.
    """
