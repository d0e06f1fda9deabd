"""The parsing boundary in pcp/core/messages.py, by example (tests/fuzz/ searches wider)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pcp.core.errors import CorruptState, PermanentError
from pcp.core.messages import (
    Assignment,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    StopRequest,
    SweepTick,
    decode_json,
    untrusted,
    utf8,
)
from pcp.core.state import Run, StackState

pytestmark = pytest.mark.core

DEEP = b"[" * 30000 + b"]" * 30000
HUGE = b'{"run_id": "r", "attempt": ' + b"9" * 5000 + b"}"
SURROGATE = b'{"run_id": "r", "reason": "\\ud800", "requested_by": "\\udfff"}'
PARSERS = {
    "start": lambda d: StartRequest.from_json(d, "1"),
    "stop": StopRequest.from_json,
    "tick": SweepTick.from_json,
    "marker": lambda d: NodeMarker.from_json(d, "markers/r/worker-0/done.json"),
    "assignment": Assignment.from_json,
    "shepherd": ShepherdCommand.from_json,
}


@pytest.mark.parametrize("parse", PARSERS.values(), ids=PARSERS)
@pytest.mark.parametrize(("data", "reason"), [
    (DEEP, "nested too deeply"),
    (HUGE, "4300"),
    (b"\xff\xfe", "not UTF-8"),
    ("\ud800", "not valid Unicode text"),
], ids=["deep", "huge-integer", "not-utf8", "raw-surrogate"])
def test_every_parser_turns_the_parser_breakers_into_a_reason(parse, data, reason) -> None:
    with pytest.raises(PermanentError, match=reason):
        parse(data)


def test_a_lone_surrogate_in_a_string_field_is_refused_by_name() -> None:
    with pytest.raises(PermanentError, match="reason is not valid Unicode text"):
        StopRequest.from_json(SURROGATE)
    with pytest.raises(PermanentError, match="training_config is not valid Unicode"):
        StartRequest.from_json(b'{"run_id": "r", "training_config": ["\\ud800"]}')


@pytest.mark.parametrize("doc", [DEEP, b'{"schema": 1, "queue": ' + DEEP + b"}",
                                 b'{"schema": 1, "active": {"request": 1}}',
                                 b'{"schema": 1, "queue": [' + HUGE + b"]}"])
def test_stored_documents_are_corrupt_state_whatever_is_wrong(doc: bytes) -> None:
    with pytest.raises(CorruptState, match="control/stack.json cannot be read"):
        StackState.from_json(doc)
    with pytest.raises(CorruptState, match="run record cannot be read"):
        Run.from_json(doc)


def test_decode_json_and_utf8() -> None:
    assert decode_json(b'{"a": [1]}', "x") == {"a": [1]}
    with pytest.raises(PermanentError, match="x is 11 bytes; the limit is 10"):
        decode_json(b" " * 11, "x", limit=10)
    with pytest.raises(PermanentError, match="at character 2"):
        utf8("ab\udc80", "x")


def test_untrusted_lets_only_permanent_errors_and_kept_answers_out() -> None:
    class Answer(Exception):
        pass

    @untrusted("thing", keep=(Answer,))
    def parse(kind: str) -> None:
        raise {"type": TypeError("t"), "answer": Answer(), "key": KeyError("k")}[kind]

    with pytest.raises(PermanentError, match="thing cannot be parsed: TypeError: t"):
        parse("type")
    with pytest.raises(PermanentError, match="KeyError"):
        parse("key")
    with pytest.raises(Answer):
        parse("answer")


AT = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def assignment(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "run_id": "r", "node": "worker-0", "role": "worker", "head_host": "h",
        "deadline": "2026-11-29T18:00:00Z", "boot_deadline": "2026-11-29T12:15:00Z"}
    return {**base, **over}


def test_the_secret_travels_in_the_assignment_and_reaches_the_binary_only() -> None:
    a = Assignment.from_dict(assignment(secret="ab" * 32))
    assert a.secret == "ab" * 32 and Assignment.from_json(a.to_json()) == a
    assert a.env("/o")["PCP_RUN_SECRET"] == "ab" * 32
    assert "ab" * 32 not in repr(a)
    assert "PCP_RUN_SECRET" not in Assignment.from_dict(assignment()).env("/o")


@pytest.mark.parametrize("secret", ["short", "AB" * 32, "zz" * 32, 7, "ab" * 65])
def test_a_malformed_secret_is_refused(secret: object) -> None:
    with pytest.raises(PermanentError, match="secret must be 32-128 lowercase hex"):
        Assignment.from_dict(assignment(secret=secret))


def test_a_request_never_carries_a_secret_on_the_wire() -> None:
    from dataclasses import replace

    request = replace(StartRequest(run_id="r"), secret="ab" * 32)
    assert "secret" not in request.to_dict() and request == StartRequest(run_id="r")
    with pytest.raises(PermanentError, match="unknown field 'secret'"):
        StartRequest.from_json(b'{"run_id": "r", "secret": "' + b"ab" * 32 + b'"}')
