"""`pcp run --layout`: the rank layout rides on the start request (docs/agent.md)."""

from __future__ import annotations

import pytest

from pcp.core.messages import StartRequest

pytestmark = pytest.mark.cli


@pytest.mark.parametrize("layout", ["all-nodes", "workers-only", None])
def test_run_layout_flag(stack, invoke, layout: str | None) -> None:
    flags = ["--layout", layout] if layout else []
    result = invoke(["run", "--stack", "tiny", *flags], obj=stack.context)
    assert result.exit_code == 0, result.output
    [data] = stack.published("start")
    assert StartRequest.from_json(data).layout == layout


def test_run_rejects_an_unknown_layout(stack, invoke) -> None:
    result = invoke(["run", "--stack", "tiny", "--layout", "gpus-only"], obj=stack.context)
    assert result.exit_code != 0 and "gpus-only" in result.output
    assert stack.published("start") == []
