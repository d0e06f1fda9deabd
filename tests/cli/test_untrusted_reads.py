"""What the CLI reads from the bucket is untrusted too: a pathological document (valid JSON
nested past the parser's depth, an integer past Python's digit limit, a lone surrogate) is
one line of error, or is skipped, never a traceback."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_commands import one_line_error

pytestmark = pytest.mark.cli

DEEP = b"[" * 30000 + b"]" * 30000
HUGE = b'{"schema": 1, "active": null, "queue": [], "n": ' + b"9" * 5000 + b"}"


@pytest.mark.parametrize("doc", [DEEP, b'{"schema": 1, "queue": ' + DEEP + b"}", HUGE],
                         ids=["deep", "deep-inside", "huge-integer"])
@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["queue"], ["runs"]])
def test_a_pathological_stack_document_is_one_line_of_error(stack, invoke, doc: bytes,
                                                            command: list[str]) -> None:
    stack.store.put("control/stack.json", doc)
    result = invoke(command, obj=stack.context)
    assert result.exit_code != 0
    assert "control/stack.json cannot be read" in one_line_error(result)


def test_a_pathological_run_record_is_one_line_of_error(stack, invoke) -> None:
    stack.start("r1")
    stack.finish("r1", {})
    stack.store.put("runs/r1/run.json", b'{"request": ' + DEEP + b"}")
    result = invoke(["status", "r1"], obj=stack.context)
    assert "run record cannot be read" in one_line_error(result)


def test_pathological_summaries_and_rejections_are_skipped(stack, invoke) -> None:
    stack.start("r1")
    stack.finish("r1", {})
    stack.store.put("runs/r1/summary.json", DEEP)
    stack.store.put("control/rejected/2026-11-29T12:00:00Z-stop-1.json", DEEP)
    stack.store.put("control/rejected/2026-11-29T12:00:01Z-stop-2.json",
                    b'{"detail": "\\ud800", "n": ' + b"9" * 5000 + b"}")
    for command in (["status"], ["runs"], ["status", "r1"], ["status", "--json"]):
        result = invoke(command, obj=stack.context)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
    shown = json.loads(invoke(["status", "r1", "--json"], obj=stack.context).stdout)
    assert shown["summary"] is None


def test_the_run_secret_is_never_shown(stack, invoke) -> None:
    from dataclasses import replace

    from pcp.core.messages import StartRequest

    secret = "c0" * 32
    stack.service.handle(replace(StartRequest(run_id="r1"), secret=secret), stack.t0)
    stack.service.handle(replace(StartRequest(run_id="r2"), secret="d1" * 32), stack.t0)
    assert secret in stack.store.get("control/stack.json").data.decode()
    for command in (["status"], ["status", "--json"], ["status", "r1"], ["status", "r1", "--json"],
                    ["queue"], ["queue", "--json"], ["runs", "--json"]):
        result = invoke(command, obj=stack.context)
        assert result.exit_code == 0, result.output
        assert secret not in result.output and "d1" * 32 not in result.output, command
