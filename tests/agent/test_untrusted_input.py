"""What the agents read from Pub/Sub and the metadata server is untrusted input too.

A malformed shepherd command is logged, acknowledged and skipped, and the daemon keeps
serving; a malformed assignment leaves the worker with "no current run" (it powers off)
instead of crashing it. Both through the real agent code: the daemon as a process on the
Pub/Sub emulator, the worker's fetch over HTTP from a metadata server.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pcp.agent.assignment import Metadata
from pcp.agent.worker import fetch
from pcp.core.messages import ShepherdCommand
from pcp_dev.local.metadata import MetadataServer
from tests.agent.test_agent import (  # noqa: F401 - fixtures
    SLEEPER,
    Harness,
    assignments,
    cluster,
    harness,
    new_run,
    script,
    wait_for,
)

pytestmark = pytest.mark.agent

DEEP = "[" * 30000 + "]" * 30000
HOSTILE = [
    ("deep-nesting", DEEP.encode(), "nested too deeply"),
    ("huge-integer", b'{"action": "stop", "run_id": "r", "attempt": ' + b"1" * 5000 + b"}",
     "4300"),
    ("lone-surrogate", b'{"action": "stop", "run_id": "r", "reason": "\\ud800"}',
     "not valid Unicode"),
    ("not-utf8", b'{"action": "stop", "run_id": "\xff"}', "not UTF-8"),
]


@pytest.mark.emulator
def test_hostile_shepherd_commands_are_acknowledged_and_the_daemon_keeps_serving(
        cluster: Harness, tmp_path: Path) -> None:  # noqa: F811
    sleeper = str(script(tmp_path / "sleeper", SLEEPER))
    run_id = new_run()
    a = assignments(run_id, cluster.stack, 1, 9, binary=sleeper)[0]
    agent = cluster.shepherd()
    for _, data, reason in HOSTILE:
        cluster.publish(data)
        wait_for(lambda r=reason: agent.logged("command_rejected", r),  # type: ignore[misc]
                 f"the command to be rejected with {reason!r}")
    cluster.publish(ShepherdCommand("start", run_id, 1, a).to_json())
    cluster.wait_marker(run_id, "shepherd", "booted")
    assert agent.proc.poll() is None
    # acknowledged: none is delivered again once the daemon has said why
    rejected = [r for r in agent.logs() if r.get("event") == "command_rejected"]
    assert len(rejected) == len(HOSTILE), rejected


@pytest.mark.parametrize(("raw", "reason"), [
    (DEEP, "nested too deeply"),
    ('{"run_id": "r", "role": "worker", "node": "worker-0", "head_host": "h", "port": '
     + "9" * 5000 + "}", "4300"),
    ('{"run_id": "r", "role": "worker", "node": "worker-0", "head_host": "h", '
     '"args": ["\\ud800"]}', "not valid Unicode"),
    ('{"run_id": "r", "role": "worker", "node": "worker-0", "head_host": "h", '
     '"args": [[[]]]}', "args must be a list of strings"),
], ids=["deep-nesting", "huge-integer", "lone-surrogate", "nested-args"])
def test_a_hostile_assignment_is_no_current_run(raw: str, reason: str) -> None:
    server = MetadataServer(lambda: {"pcp-assignment": raw}, "worker-0").start()
    try:
        assignment, why = fetch(Metadata(server.host))
    finally:
        server.stop()
    assert assignment is None
    assert "pcp-assignment is unusable" in why and reason in why
