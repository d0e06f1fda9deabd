"""`pcp local down` waits for the supervisor to exit. A supervisor that exited but that its
parent has not reaped (a zombie: `up` ran in a process that still runs) is gone, not alive:
before, `down` from another process waited out its whole minute for it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from pcp_dev.local.daemon import _alive

pytestmark = pytest.mark.cli

# A parent that starts a child which exits at once, and never reaps it.
PARENT = ("import subprocess, sys, time\n"
          "child = subprocess.Popen(['true'])\n"
          "print(child.pid, flush=True)\n"
          "time.sleep(30)\n")


def test_an_exited_process_its_parent_has_not_reaped_is_not_alive() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 10
        while _alive(pid):
            assert time.monotonic() < deadline, f"pid {pid} still reads as alive"
            time.sleep(0.05)
        assert _alive(parent.pid)  # ... while a running process is alive
    finally:
        parent.kill()
        parent.wait()
    assert not _alive(parent.pid)
