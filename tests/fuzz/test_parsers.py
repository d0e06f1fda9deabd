"""Every parsing edge, fuzzed: a value or a `PermanentError`, nothing else, and nothing started.

The parsers are pure (no clock, no I/O: tests/core/test_purity.py), so "nothing started" holds
by construction here; tests/fuzz/test_runtime.py checks it through the functions' runtime.
A value a parser accepts must also survive its own writer: written and read back, it is the
same value (so what pcp stores from untrusted input can always be read again).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pytest
from cloudevents.http import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

from pcp.core.errors import CorruptState, PermanentError
from pcp.core.messages import (
    ASSIGNMENT_FIELDS,
    BUDGET_FIELDS,
    BUDGET_RESUME_FIELDS,
    MARKER_FIELDS,
    SHEPHERD_FIELDS,
    START_FIELDS,
    STOP_FIELDS,
    SWEEP_FIELDS,
    Assignment,
    BudgetNotification,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    StopRequest,
    SweepTick,
    parse_stop_topic,
    split_training_config,
)
from pcp.core.state import Run, StackState
from pcp.edge import events
from tests.core.helpers import Stack, marker, policy, req
from tests.fuzz import strategies as s
from tests.fuzz.conftest import fuzz_settings, tally

pytestmark = pytest.mark.fuzz
T = TypeVar("T")
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def outcome(target: str, parse: Callable[[], T]) -> T | None:
    """The parser's value, or None for a PermanentError; anything else fails the target."""
    try:
        value = parse()
    except PermanentError:
        tally(target, "rejected")
        return None
    tally(target, "value")
    return value


# ---------------------------------------------------------------- wire messages

START = {"run_id": "exp-1", "training_config": "--lr 0.1 --name 'a b'", "max_hours": 2,
         "keep_vm_alive": False, "binary": {"x86_64-linux": "/nix/store/abc-trainer"},
         "max_restarts": 1, "requested_by": "me@example.com", "stack": "tiny"}


@fuzz_settings()
@given(s.messages(START, START_FIELDS))
def test_start_request(data: bytes | str) -> None:
    request = outcome("start request", lambda: StartRequest.from_json(data, "1234567"))
    if request is not None:
        assert StartRequest.from_json(request.to_json()) == request


@fuzz_settings()
@given(s.messages({"run_id": "exp-1", "reason": "done", "requested_by": "me"}, STOP_FIELDS))
def test_stop_request(data: bytes | str) -> None:
    request = outcome("stop request", lambda: StopRequest.from_json(data))
    if request is not None:
        assert StopRequest.from_json(request.to_json()) == request


@fuzz_settings()
@given(s.messages({"op": "tick", "requested_by": "scheduler"}, SWEEP_FIELDS))
def test_sweep_tick(data: bytes | str) -> None:
    tick = outcome("sweep tick", lambda: SweepTick.from_json(data))
    if tick is not None:
        assert SweepTick.from_json(tick.to_json()) == tick


@fuzz_settings()
@given(st.one_of(
    st.lists(s.TEXT, max_size=6),
    s.TEXT.map(lambda t: f"--name {t} --lr '0.{t}'"),
    s.TEXT,
    s.JSON_VALUES,
))
def test_training_config_splitting(value: Any) -> None:
    args = outcome("training_config", lambda: split_training_config(value))
    if args is not None:
        assert all(isinstance(a, str) and "\x00" not in a for a in args)
        assert split_training_config(list(args)) == args  # the list form is taken as is


# ---------------------------------------------------------------- markers

MARKER_NAMES = st.one_of(
    st.builds(lambda r, n, k: f"markers/{r}/{n}/{k}.json",
              st.sampled_from(["run-1", "Run-1", "r" * 64, ""]) | s.TEXT,
              st.sampled_from(["shepherd", "worker-0", "worker-01", "worker-1000"]) | s.TEXT,
              st.sampled_from(["booted", "done", "notes"])),
    s.TEXT,
    s.JSON_VALUES,
)
MARKER_BODY = {"run_id": "run-1", "node": "worker-0", "attempt": 1,
               "at": "2026-11-29T12:00:00Z", "exit_code": 0, "signal": None,
               "duration_s": 1.5, "host": "worker-0"}


@fuzz_settings()
@given(MARKER_NAMES)
def test_marker_name(name: Any) -> None:
    outcome("marker name", lambda: NodeMarker.parse_path(name))


@fuzz_settings()
@given(s.messages(MARKER_BODY, MARKER_FIELDS),
       st.sampled_from(["markers/run-1/worker-0/done.json",
                        "markers/run-1/worker-0/booted.json"]))
def test_marker_body(data: bytes | str, name: str) -> None:
    found = outcome("marker body", lambda: NodeMarker.from_json(data, name))
    if found is not None:
        assert NodeMarker.from_json(found.to_json(), name) == found


@fuzz_settings()
@given(st.one_of(st.dictionaries(s.TEXT, s.JSON_VALUES, max_size=3),
                 s.messages(MARKER_BODY, MARKER_FIELDS).map(lambda b: {"pcp-marker": b}),
                 s.JSON_VALUES))
def test_marker_metadata(metadata: Any) -> None:
    outcome("marker metadata", lambda: NodeMarker.from_metadata(
        metadata, "markers/run-1/worker-0/done.json"))


# ---------------------------------------------------------------- the events themselves

ENVELOPE_DATA = st.one_of(
    st.builds(lambda payload, attrs: {"message": {
        "data": base64.b64encode(payload if isinstance(payload, bytes)
                                 else payload.encode("utf-8", "surrogatepass")).decode(),
        "attributes": attrs, "messageId": "42"}, "subscription": "projects/p/subscriptions/s"},
        s.messages(START, START_FIELDS), st.dictionaries(s.TEXT, s.TEXT, max_size=2)),
    st.fixed_dictionaries({"message": st.fixed_dictionaries(
        {}, optional={"data": st.one_of(s.TEXT, st.binary(max_size=60).map(
                          lambda b: base64.b64encode(b).decode()), s.JSON_VALUES),
                      "attributes": s.JSON_VALUES | st.dictionaries(s.TEXT, s.TEXT),
                      "messageId": s.JSON_VALUES, "message_id": s.JSON_VALUES}),
        "subscription": s.TEXT}),
    s.JSON_VALUES,
)
SOURCES = st.sampled_from([
    events.topic_source("pcp-test", "pcp-tiny-start"),
    events.topic_source("pcp-test", "pcp-tiny-start"),
    events.topic_source("pcp-test", "pcp-tiny-markers"),
    events.topic_source("pcp-test", "pcp-huge-start"),
    events.bucket_source("pcp-tiny-b"), "//pubsub.googleapis.com/", "",
]) | s.TEXT
TYPES = st.sampled_from([events.PUBSUB_EVENT, events.FINALIZED_EVENT,
                         "google.cloud.storage.object.v1.deleted"]) | s.TEXT


def cloud_event(kind: str, source: str, data: Any) -> CloudEvent | None:
    try:
        return CloudEvent({"type": kind, "source": source, "id": "1"}, data)
    except Exception:  # noqa: BLE001 - the SDK refuses it: the framework never would send it
        return None


@fuzz_settings()
@given(st.just(events.PUBSUB_EVENT) | TYPES,
       st.just(events.topic_source("pcp-test", "pcp-tiny-start")) | SOURCES, ENVELOPE_DATA)
def test_pubsub_envelope(kind: str, source: str, data: Any) -> None:
    event = cloud_event(kind, source, data)
    if event is None:
        return
    assert isinstance(events.event_id(event), str)
    found = outcome("Pub/Sub envelope", lambda: events.pubsub_payload(
        event, events.topic_source("pcp-test", "pcp-tiny-start")))
    if found is not None:
        data, _, _ = found
        outcome("start request", lambda: StartRequest.from_json(data, "42"))


OBJECT = st.fixed_dictionaries({}, optional={
    "bucket": st.sampled_from(["pcp-tiny-b", "other"]) | s.JSON_VALUES,
    "name": MARKER_NAMES, "generation": s.JSON_VALUES | st.just("17"),
    "metadata": s.JSON_VALUES | st.dictionaries(s.TEXT, s.TEXT)})


@fuzz_settings()
@given(TYPES, st.sampled_from([events.topic_source("pcp-test", "pcp-tiny-markers"),
                               events.bucket_source("pcp-tiny-b")]) | SOURCES,
       st.one_of(ENVELOPE_DATA, OBJECT, s.JSON_VALUES))
def test_storage_event(kind: str, source: str, data: Any) -> None:
    event = cloud_event(kind, source, data)
    if event is None:
        return
    try:
        outcome("storage event", lambda: events.marker_object(
            event, "pcp-tiny-b", events.topic_source("pcp-test", "pcp-tiny-markers")))
    except events.Ignored:
        tally("storage event", "value")


# ---------------------------------------------------------------- assignment and command

ASSIGNMENT = {"run_id": "exp-1", "attempt": 1, "stack": "tiny", "node": "worker-0",
              "role": "worker", "rank": 1, "num_nodes": 2, "head_host": "10.0.0.2",
              "port": 9000, "binary": "/nix/store/abc-trainer", "args": ["--lr", "0.1"],
              "deadline": "2026-11-29T18:00:00Z", "boot_deadline": "2026-11-29T12:15:00Z",
              "keep_vm_alive": False}


@fuzz_settings()
@given(s.messages(ASSIGNMENT, ASSIGNMENT_FIELDS))
def test_node_assignment(data: bytes | str) -> None:
    a = outcome("node assignment", lambda: Assignment.from_json(data))
    if a is not None:
        assert Assignment.from_json(a.to_json()) == a


@fuzz_settings()
@given(st.one_of(
    s.messages({"action": "start", "run_id": "exp-1", "attempt": 1,
                "assignment": {**ASSIGNMENT, "role": "shepherd", "node": "shepherd"}},
               SHEPHERD_FIELDS),
    s.messages({"action": "stop", "run_id": "exp-1", "attempt": 1, "reason": "x"},
               SHEPHERD_FIELDS),
    st.builds(lambda v: s.dumps({"action": "start", "run_id": "exp-1",
                                 "assignment": {**ASSIGNMENT, "role": "shepherd",
                                                "node": "shepherd", "args": v}}),
              s.JSON_VALUES),
))
def test_shepherd_command(data: bytes | str) -> None:
    command = outcome("shepherd command", lambda: ShepherdCommand.from_json(data))
    if command is not None:
        assert ShepherdCommand.from_json(command.to_json()) == command


# ---------------------------------------------------------------- stored documents


def _stack_doc() -> dict[str, Any]:
    stack = Stack(policy(workers=2))
    stack(req("r1", training_args=("--lr", "0.1")), 0)
    stack(marker("r1", "worker-0", "booted"), 1)
    stack(req("r2"), 2)
    return s.json.loads(stack.state.to_json())  # type: ignore[no-any-return]


STACK_DOC = _stack_doc()
RUN_DOC = STACK_DOC["active"]


@fuzz_settings()
@given(st.one_of(s.mutated(STACK_DOC), s.messages(STACK_DOC, tuple(STACK_DOC))))
def test_stack_document(data: bytes | str) -> None:
    """What the sweeper and the CLI read first: any document is a state or CorruptState."""
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    try:
        state = outcome("stack document", lambda: StackState.from_json(raw))
    except PermanentError as e:  # pragma: no cover - outcome() catches these
        raise AssertionError(e) from None
    if state is not None:
        assert StackState.from_json(state.to_json()) == state
    else:
        with pytest.raises(CorruptState):
            StackState.from_json(raw)


@fuzz_settings()
@given(st.one_of(s.mutated(RUN_DOC), s.messages(RUN_DOC, tuple(RUN_DOC))))
def test_run_record(data: bytes | str) -> None:
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    run = outcome("run record", lambda: Run.from_json(raw))
    if run is not None:
        assert Run.from_json(run.to_json()) == run


# ---------------------------------------------------------------- the budget kill switch

BUDGET = {"budgetDisplayName": "pcp-tiny", "alertThresholdExceeded": 1.0, "costAmount": 120.5,
          "costIntervalStart": "2026-11-01T07:00:00Z", "budgetAmount": 100,
          "budgetAmountType": "SPECIFIED_AMOUNT", "currencyCode": "USD"}
BUDGET_ATTRS = {"billingAccountId": "01D4EE-079462-DFD6EC", "budgetId": "b-1",
                "schemaVersion": "1.0"}


@fuzz_settings()
@given(s.messages(BUDGET, BUDGET_FIELDS),
       st.one_of(st.just(BUDGET_ATTRS),
                 st.dictionaries(st.sampled_from(sorted(BUDGET_ATTRS)), s.TEXT, max_size=3),
                 s.JSON_VALUES))
def test_budget_notification(data: bytes | str, attributes: Any) -> None:
    n = outcome("budget notification",
                lambda: BudgetNotification.from_message(data, attributes))
    if n is not None:
        assert BudgetNotification.from_message(*n.to_message()) == n
        n.over(1.0)  # a value, never an exception


@fuzz_settings()
@given(st.one_of(s.messages({"op": "budget_resume", "requested_by": "me"},
                            BUDGET_RESUME_FIELDS),
                 s.messages({"run_id": "exp-1", "reason": "done"}, STOP_FIELDS)))
def test_stop_topic(data: bytes | str) -> None:
    """What on_stop reads: a stop request or a budget resume."""
    parsed = outcome("stop topic (stop or budget resume)", lambda: parse_stop_topic(data))
    if parsed is not None:
        assert parse_stop_topic(parsed.to_json()) == parsed


def _held_doc() -> dict[str, Any]:
    from pcp.core.messages import BudgetResume

    stack = Stack(policy(workers=2, budget_id="b-1"))
    stack(req("r1", max_cost_usd=3.5), 0)
    stack(req("r2"), 1)
    stack(BudgetNotification.from_message(s.dumps(BUDGET).encode(), BUDGET_ATTRS), 2)
    stack(BudgetResume("me"), 3)
    stack(BudgetNotification.from_message(s.dumps(
        {**BUDGET, "costIntervalStart": "2026-12-01T08:00:00Z"}).encode(), BUDGET_ATTRS), 4)
    return s.json.loads(stack.state.to_json())  # type: ignore[no-any-return]


HELD_DOC = _held_doc()


@fuzz_settings()
@given(st.one_of(s.mutated(HELD_DOC), s.messages(HELD_DOC, tuple(HELD_DOC))))
def test_stack_document_on_budget_hold(data: bytes | str) -> None:
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    state = outcome("stack document (budget hold)", lambda: StackState.from_json(raw))
    if state is not None:
        assert StackState.from_json(state.to_json()) == state
    else:
        with pytest.raises(CorruptState):
            StackState.from_json(raw)


POLICY_DOC = s.json.loads(policy(max_cost_usd=12.5).to_doc())


@fuzz_settings()
@given(st.one_of(s.mutated(POLICY_DOC), s.messages(POLICY_DOC, tuple(POLICY_DOC))))
def test_policy_document(data: bytes | str) -> None:
    """control/policy.json, which `pcp run` reads to preview a deadline."""
    from pcp.core.policy import Policy

    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    found = outcome("control/policy.json", lambda: Policy.from_doc(raw))
    if found is not None:
        assert Policy.from_doc(found.to_doc()) == found
        found.run_limit(NOW, None, found.max_cost_usd)  # a deadline, never an exception
