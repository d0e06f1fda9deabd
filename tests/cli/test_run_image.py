"""`pcp run --image`: an OCI reference rides on the start request, checked by the same parser
the start function uses (docs/trainers.md, "OCI images")."""

from __future__ import annotations

import pytest

from pcp.core.messages import StartRequest

pytestmark = pytest.mark.cli

REF = "us-central1-docker.pkg.dev/my-project/pcp-tiny/trainer:v1"


@pytest.mark.parametrize("image", [REF, f"{REF}@sha256:{'0' * 64}", None])
def test_run_image_flag(stack, invoke, image: str | None) -> None:
    flags = ["--image", image] if image else []
    result = invoke(["run", "--stack", "tiny", *flags], obj=stack.context)
    assert result.exit_code == 0, result.output
    [data] = stack.published("start")
    assert StartRequest.from_json(data).image == image


@pytest.mark.parametrize(("image", "fragment"), [
    ("trainer:v1", "names no registry"),
    (f"{REF} --privileged", "without spaces"),
    ("us-docker.pkg.dev/p/r/t@sha256:1234", "64 lowercase hex"),
])
def test_run_refuses_a_bad_image_before_publishing(stack, invoke, image: str,
                                                   fragment: str) -> None:
    result = invoke(["run", "--stack", "tiny", "--image", image], obj=stack.context)
    assert result.exit_code == 2, result.output
    assert fragment in result.output and "\n" == result.output[-1]
    assert stack.published("start") == []
