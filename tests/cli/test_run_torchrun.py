"""`pcp run --torchrun TARGET`: the binary `torchrun:TARGET`, checked by the core's parser."""

from __future__ import annotations

import pytest

from pcp.core.messages import StartRequest

pytestmark = pytest.mark.cli


@pytest.mark.parametrize("target", ["/srv/train.py", "pkg.train", ".#env!train"])
def test_run_torchrun_flag(stack, invoke, target: str) -> None:
    result = invoke(["run", "--stack", "tiny", "--torchrun", target], obj=stack.context)
    assert result.exit_code == 0, result.output
    [data] = stack.published("start")
    assert StartRequest.from_json(data).binary == f"torchrun:{target}"


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--torchrun", "train.py"], "a script must be an absolute path"),
    (["--torchrun", "--standalone"], "must not start with '-'"),
    (["--torchrun", "pkg.train", "--layout", "all-nodes"], "layout all-nodes cannot apply"),
    (["--torchrun", "pkg.train", "--binary", ".#train"], "give one"),
])
def test_run_torchrun_refusals_publish_nothing(stack, invoke, flags: list[str],
                                               fragment: str) -> None:
    result = invoke(["run", "--stack", "tiny", *flags], obj=stack.context)
    assert result.exit_code != 0 and fragment in result.output, result.output
    assert stack.published("start") == []
