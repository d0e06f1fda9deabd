"""`pcp events`: sweep audits, run records and dead-man records, merged and filtered."""

from __future__ import annotations

import json
from datetime import timedelta

from pcp.agent.deadman import record_power_off
from pcp.agent.log import Log
from pcp.core.messages import Assignment
from pcp.core.names import ASSIGNMENT_KEY, power_off_doc
from tests.cli.conftest import T0, Stack


def _events(invoke, stack: Stack, *args: str) -> list[dict]:
    result = invoke(["events", "--json", *args], obj=stack.context)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)["events"]


def _story(stack: Stack) -> None:
    vm = next(iter(stack.fleet.vms.values()))
    vm.status = "RUNNING"  # running with no run or lease: an orphan
    stack.service.sweep(T0)
    assert vm.status == "TERMINATED"
    stack.start("r1", T0 + timedelta(minutes=1))
    assignment = Assignment.from_json(vm.metadata[ASSIGNMENT_KEY].encode())
    stack.finish("r1", {})
    record_power_off(stack.store, assignment, "this node is done", T0 + timedelta(minutes=31),
                     Log(stack="tiny"))


def test_events_tell_the_orphan_stop_the_run_and_the_dead_man_stop(invoke, stack: Stack) -> None:
    _story(stack)
    rows = _events(invoke, stack)
    kinds = [r["kind"] for r in rows]
    assert kinds.index("orphans_stopped") < kinds.index("run_queued") < kinds.index("run_ended")
    assert kinds[-1] == "dead_man_power_off"
    orphan = next(r for r in rows if r["kind"] == "orphans_stopped")
    assert (orphan["heal"], orphan["source"], orphan["run_id"]) == ("orphans_stopped", "sweep",
                                                                    None)
    assert "pcp-tiny-worker-0" in orphan["text"]
    ended = next(r for r in rows if r["kind"] == "run_ended")
    assert ended["text"].startswith("succeeded") and ended["run_id"] == "r1"
    dead = rows[-1]
    assert (dead["run_id"], dead["source"]) == ("r1", "node")
    assert dead["text"].startswith("worker-0: ")
    assert stack.store.get(power_off_doc("r1", "worker-0")) is not None


def test_events_filter_by_run_and_kind(invoke, stack: Stack) -> None:
    _story(stack)
    only_r1 = _events(invoke, stack, "--run", "r1")
    assert only_r1 and all(r["run_id"] == "r1" for r in only_r1)
    assert "orphans_stopped" not in [r["kind"] for r in only_r1]
    heals = _events(invoke, stack, "--kind", "orphans_stopped")
    assert [r["kind"] for r in heals] == ["orphans_stopped"]
    two = _events(invoke, stack, "--kind", "run_ended", "--kind", "dead_man_power_off")
    assert [r["kind"] for r in two] == ["run_ended", "dead_man_power_off"]
    assert _events(invoke, stack, "--run", "nope") == []


def test_events_as_text(invoke, stack: Stack) -> None:
    _story(stack)
    result = invoke(["events", "--kind", "dead_man_power_off"], obj=stack.context)
    assert result.exit_code == 0, result.output
    assert "dead_man_power_off" in result.output and "r1" in result.output
    empty = invoke(["events", "--run", "nope"], obj=stack.context)
    assert empty.output.strip() == "no events on stack tiny for run nope"


def test_events_tell_a_hard_cap_stop_once(invoke, stack: Stack) -> None:
    """A VM that GCE's maxRunDuration stopped is one `hard_cap_stop` row: the sweep that
    follows the stop reports it, a later one (outside its interval) does not again."""
    stack.start("r1", T0)
    vm = next(iter(stack.fleet.vms.values()))
    vm.status = "TERMINATED"
    vm.capped_stop = int((T0 + timedelta(minutes=58)).timestamp())
    stack.service.sweep(T0 + timedelta(minutes=60))
    stack.service.sweep(T0 + timedelta(minutes=70))
    rows = _events(invoke, stack, "--kind", "hard_cap_stop")
    assert len(rows) == 1
    [row] = rows
    assert (row["run_id"], row["source"]) == ("r1", "sweep")
    assert row["at"].startswith((T0 + timedelta(minutes=58)).isoformat()[:16])
    assert row["text"].startswith("pcp-tiny-worker-0: ")


def test_events_read_only_the_audits_whose_metadata_says_they_hold_something(
        invoke, stack: Stack) -> None:
    """A month of quiet sweeps (8,640 audits at the default 5 minutes) must not be 8,640
    reads: each audit's object metadata names its notes' kinds, and a listing tells which to
    read. An audit written before that metadata existed is still read."""
    from pcp.core.names import AUDIT_KINDS, SWEEPS

    _story(stack)
    for minute in range(40, 60):  # quiet sweeps: nothing to say
        stack.service.sweep(T0 + timedelta(minutes=minute))
    audits = stack.store.scan(SWEEPS)
    quiet = [a.name for a in audits if a.metadata.get(AUDIT_KINDS) == "-"]
    assert len(quiet) >= 20
    orphan = [a for a in audits if "orphans_stopped" in a.metadata.get(AUDIT_KINDS, "").split()]
    assert len(orphan) == 1
    # An audit from before the metadata: a bare object, read and shown.
    old = {"at": (T0 - timedelta(minutes=5)).isoformat(), "notes": [
        {"kind": "orphans_stopped", "heal": "orphans_stopped", "run_id": None,
         "text": "stopped pcp-tiny-worker-0 (old audit)"}]}
    stack.store.put(f"{SWEEPS}{old['at']}.json", json.dumps(old).encode())
    reads: list[str] = []
    get = stack.store.get

    def counting_get(name: str):  # type: ignore[no-untyped-def]
        reads.append(name)
        return get(name)

    stack.store.get = counting_get  # type: ignore[method-assign]
    rows = _events(invoke, stack, "--kind", "orphans_stopped")
    assert [r["text"] for r in rows][0] == "stopped pcp-tiny-worker-0 (old audit)"
    assert len(rows) == 2
    assert not set(quiet) & set(reads)
    assert len([n for n in reads if n.startswith(SWEEPS)]) == 2  # the old one and the orphan's
    everything = _events(invoke, stack)
    assert [r["kind"] for r in everything].count("orphans_stopped") == 2
    assert not set(quiet) & set(reads)
