"""OCI image references (the distribution grammar, strictly), and what a run's nodes run."""

from __future__ import annotations

import json

import pytest

from pcp.core.commands import CommandShepherd, StartNodes
from pcp.core.errors import PermanentError
from pcp.core.images import parse_image, program_of
from pcp.core.messages import Assignment, StartRequest
from pcp.core.state import Run, Status
from tests.core.helpers import Stack, of, policy, req

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
AR = "us-central1-docker.pkg.dev/my-project/pcp-tiny/trainer"


@pytest.mark.parametrize(("ref", "registry", "repository", "tag", "digest"), [
    (f"{AR}:v1", "us-central1-docker.pkg.dev", "my-project/pcp-tiny/trainer", "v1", None),
    (f"{AR}@{DIGEST}", "us-central1-docker.pkg.dev", "my-project/pcp-tiny/trainer", None,
     DIGEST),
    (f"{AR}:v1.2_rc-3@{DIGEST}", "us-central1-docker.pkg.dev", "my-project/pcp-tiny/trainer",
     "v1.2_rc-3", DIGEST),
    ("127.0.0.1:5000/pcp/trainer:e2e", "127.0.0.1:5000", "pcp/trainer", "e2e", None),
    ("localhost/trainer", "localhost", "trainer", None, None),
    ("[::1]:5000/a/b:c", "[::1]:5000", "a/b", "c", None),
    ("ghcr.io/org/a__b.c-d/e", "ghcr.io", "org/a__b.c-d/e", None, None),
    ("docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", None),
])
def test_valid_references(ref: str, registry: str, repository: str, tag: str | None,
                          digest: str | None) -> None:
    parsed = parse_image(ref)
    assert (parsed.registry, parsed.repository, parsed.tag, parsed.digest) == (
        registry, repository, tag, digest)
    assert str(parsed) == ref


@pytest.mark.parametrize(("ref", "fragment"), [
    ("trainer:v1", "names no registry"),
    ("busybox", "names no registry"),
    ("library/busybox:1", "is not a registry host"),
    (f"{AR}:v1@sha256:abc", "64 lowercase hex"),
    (f"{AR}@sha512:{'a' * 128}", "digest must be sha256"),
    (f"{AR}@{DIGEST.upper()}", "digest must be sha256"),
    (f"{AR}:-bad", "tag '-bad'"),
    (f"{AR}:{'t' * 129}", "1-128 characters"),
    ("us-docker.pkg.dev/My-Project/x", "must be lowercase"),
    ("us-docker.pkg.dev/a//b", "repository part ''"),
    ("us-docker.pkg.dev/a/b-", "repository part 'b-'"),
    ("us-docker.pkg.dev/a/b c", "without spaces"),
    ("us-docker.pkg.dev/a/b;rm -rf /", "without spaces"),
    ("us-docker.pkg.dev/a/$(id)", "must be lowercase"),
    ("-bad.io/a", "not a valid registry host"),
    ("", "must be one reference"),
    ("us-docker.pkg.dev/" + "a" * 300, "longer than 255"),
    ("us-docker.pkg.dev/a\n", "without spaces"),
])
def test_invalid_references_say_why(ref: str, fragment: str) -> None:
    with pytest.raises(PermanentError, match="image") as e:
        parse_image(ref)
    assert fragment in str(e.value)


def test_not_a_string_is_refused() -> None:
    with pytest.raises(PermanentError, match="must be a string"):
        parse_image(["us-docker.pkg.dev/a/b"])


def test_which_registries_get_the_nodes_google_credentials() -> None:
    assert parse_image(f"{AR}:v1").google
    assert parse_image("gcr.io/p/x:1").google and parse_image("eu.gcr.io/p/x:1").google
    assert not parse_image("ghcr.io/p/x:1").google
    assert not parse_image("evil-docker.pkg.dev.example.com/p/x:1").google
    assert parse_image("127.0.0.1:5000/p/x").loopback and parse_image("localhost/x").loopback
    assert not parse_image("127.0.0.1.example.com/p/x").loopback


def test_the_start_request_field_is_validated_and_round_trips() -> None:
    r = StartRequest.from_json(json.dumps({"run_id": "r1", "image": f"{AR}:v1"}))
    assert r.image == f"{AR}:v1"
    assert StartRequest.from_json(r.to_json()) == r
    with pytest.raises(PermanentError, match="start request: image 'trainer' names no registry"):
        StartRequest.from_json(json.dumps({"run_id": "r1", "image": "trainer"}))
    with pytest.raises(PermanentError, match="must be a string"):
        StartRequest.from_json(json.dumps({"run_id": "r1", "image": 3}))
    with pytest.raises(PermanentError, match="unknown field 'pinned_image'"):
        StartRequest.from_json(json.dumps({"run_id": "r1", "pinned_image": f"{AR}@{DIGEST}"}))


def test_an_assignment_carries_only_a_pinned_image() -> None:
    t = Stack(policy())(req("r1", image=f"{AR}@{DIGEST}"))
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes)
    a = start.assignments[0]
    assert Assignment.from_json(a.to_json()) == a and a.image == f"{AR}@{DIGEST}"
    body = json.loads(a.to_json())
    body["image"] = f"{AR}:v1"
    with pytest.raises(PermanentError, match="not pinned to a sha256 digest"):
        Assignment.from_dict(body)


@pytest.mark.parametrize(("binary", "image", "defaults", "shepherd", "worker"), [
    # the request names neither: both stack defaults (the Mac keeps the binary)
    (None, None, ("nix#b", "img"), ("nix#b", None), (None, "img")),
    (None, None, (None, "img"), (None, "img"), (None, "img")),
    (None, None, ("nix#b", None), ("nix#b", None), ("nix#b", None)),
    # a request naming one of them replaces both defaults
    (None, "req", ("nix#b", "img"), (None, "req"), (None, "req")),
    ("nix#r", None, ("nix#b", "img"), ("nix#r", None), ("nix#r", None)),
    ("nix#r", "req", (None, None), ("nix#r", None), (None, "req")),
])
def test_which_node_runs_what(binary: str | None, image: str | None,
                              defaults: tuple[str | None, str | None],
                              shepherd: tuple[str | None, str | None],
                              worker: tuple[str | None, str | None]) -> None:
    program = program_of(binary, image, *defaults)
    assert program.for_role("shepherd") == shepherd
    assert program.for_role("worker") == worker


def test_a_tag_the_function_pinned_reaches_every_node_by_digest() -> None:
    s = Stack(policy(workers=2))
    t = s(req("r1", image=f"{AR}:v1", pinned_image=f"{AR}@{DIGEST}"))
    start, shepherd = of(t, StartNodes)[0], of(t, CommandShepherd)[0]
    assert isinstance(start, StartNodes) and isinstance(shepherd, CommandShepherd)
    assert shepherd.command.assignment is not None
    nodes = (*start.assignments, shepherd.command.assignment)
    assert {(a.image, a.binary) for a in nodes} == {(f"{AR}@{DIGEST}", None)}
    active = s.state.active
    assert active is not None and active.image == f"{AR}@{DIGEST}"
    assert Run.from_json(active.to_json()).image == f"{AR}@{DIGEST}"  # the record keeps it


def test_the_shepherd_keeps_a_native_binary_while_workers_run_the_image() -> None:
    t = Stack(policy(workers=1, default_image=f"{AR}:v1"))(
        req("r1", pinned_image=f"{AR}@{DIGEST}"))
    start, shepherd = of(t, StartNodes)[0], of(t, CommandShepherd)[0]
    assert isinstance(start, StartNodes) and isinstance(shepherd, CommandShepherd)
    assert shepherd.command.assignment is not None
    assert (shepherd.command.assignment.binary, shepherd.command.assignment.image) == (
        "github:org/repo#trainer", None)
    assert (start.assignments[0].binary, start.assignments[0].image) == (None, f"{AR}@{DIGEST}")


@pytest.mark.parametrize("fields", [
    {"image": f"{AR}:v1"},  # a tag nobody resolved
    {"image": f"{AR}:v1", "pinned_image": f"us-docker.pkg.dev/other/repo@{DIGEST}"},
])
def test_an_image_that_is_not_pinned_is_rejected(fields: dict[str, str]) -> None:
    s = Stack(policy())
    t = s(req("r1", **fields))
    found = s.state.find("r1")
    assert found is not None and found.status is Status.REJECTED
    assert "was not resolved to a digest" in t.reason
    assert not of(t, StartNodes)


def test_a_stack_with_only_an_image_needs_no_binary() -> None:
    s = Stack(policy(default_binary=None, default_image=f"{AR}@{DIGEST}"))
    t = s(req("r1"))
    assert of(t, StartNodes)
    t = Stack(policy(default_binary=None))(req("r2"))
    assert "no binary: pass one (or an image)" in t.reason


def test_a_restart_runs_the_same_digest() -> None:
    s = Stack()
    s(req("r1", image=f"{AR}:v1", pinned_image=f"{AR}@{DIGEST}", max_restarts=1))
    s.boot_all()
    t = s(s.vms("TERMINATED"), minute=5)
    assert "will restart as attempt 2" in t.reason
    start = of(t, StartNodes)[0]
    assert isinstance(start, StartNodes) and start.attempt == 2
    assert {a.image for a in start.assignments} == {f"{AR}@{DIGEST}"}
