"""Signalling a process group: the agent's binary, and the local replica's processes.

Every child pcp starts is the leader of its own group (`start_new_session=True`), so one
signal reaches it and whatever it started.
"""

from __future__ import annotations

import os


def signal_group(pid: int, sig: int) -> bool:
    """Send `sig` to the process group led by `pid`; False when it is already gone."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True
