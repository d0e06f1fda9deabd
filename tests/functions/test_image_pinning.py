"""Pinning a tag to its digest through the registry HTTP API v2, against a real registry.

Debian's docker-registry (the CNCF distribution registry) on 127.0.0.1, an image pushed to it
by Podman, whose own `--digestfile` says what the digest must be.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pcp.adapters.registry import RegistryUnavailable, resolve_digest
from pcp.core.errors import PermanentError
from pcp.core.images import parse_image
from pcp.edge.images import pin_image
from pcp_dev.local import oci
from tests.conftest import require_emulator
from tests.core.helpers import policy, req


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(HOST/pcp/trainer:v1, the digest Podman pushed)."""
    reason = oci.missing()
    if reason is not None:
        require_emulator(f"containers ({oci.PACKAGES})", RuntimeError(reason))
    work: Path = tmp_path_factory.mktemp("pin")
    podman = oci.podman_engine(work)
    registry = oci.LocalRegistry(work / "registry").start()
    try:
        local = oci.contract_image(podman, work, "localhost/pcp-pin-test:1")
        ref = f"{registry.host}/pcp/trainer:v1"
        podman.run("push", "--tls-verify=false", "--digestfile", str(work / "digest"), local, ref)
        yield ref, (work / "digest").read_text().strip()
    finally:
        registry.stop()


def test_a_tag_resolves_to_the_pushed_digest(pushed: tuple[str, str]) -> None:
    ref, digest = pushed
    assert digest.startswith("sha256:")
    assert resolve_digest(parse_image(ref)) == digest


def test_an_unknown_tag_or_repository_is_a_permanent_refusal(pushed: tuple[str, str]) -> None:
    ref, _ = pushed
    host = parse_image(ref).registry
    for missing in (f"{host}/pcp/trainer:nope", f"{host}/pcp/nothing:v1"):
        with pytest.raises(PermanentError, match="no such repository or tag"):
            resolve_digest(parse_image(missing))


def test_an_unreachable_registry_is_worth_a_retry() -> None:
    with pytest.raises(RegistryUnavailable):
        resolve_digest(parse_image(f"127.0.0.1:{oci.free_port()}/pcp/trainer:v1"), timeout=2)


def test_pin_image_pins_the_request_or_the_stack_default(pushed: tuple[str, str]) -> None:
    ref, digest = pushed
    name = parse_image(ref).name
    pinned = pin_image(req("r1", image=ref), policy())
    assert pinned.pinned_image == f"{name}@{digest}" and pinned.image == ref
    default = pin_image(req("r2"), policy(default_image=ref))
    assert default.pinned_image == f"{name}@{digest}"
    # A request naming a binary replaces the stack's defaults: no image, nothing asked.
    assert pin_image(req("r3", binary="github:o/r#t"), policy(default_image=ref)).pinned_image == ""
    # A digest needs no registry at all (this one is not listening).
    offline = f"127.0.0.1:{oci.free_port()}/pcp/trainer@{digest}"
    assert pin_image(req("r4", image=offline), policy()).pinned_image == offline
