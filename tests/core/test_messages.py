"""Every validation rule of the wire messages, each with the message a person will read."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from pcp.core.errors import PermanentError
from pcp.core.messages import (
    TORCHRUN_PREFIX,
    Assignment,
    NodeMarker,
    ShepherdCommand,
    StartRequest,
    StopRequest,
    SweepTick,
    is_torchrun,
    run_id_from_message_id,
    run_layout,
    torchrun_target,
)

pytestmark = pytest.mark.core
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def start(body: object, message_id: str | None = "1234") -> StartRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return StartRequest.from_json(raw, message_id)


def rejects(body: object, fragment: str, message_id: str | None = "1234") -> None:
    with pytest.raises(PermanentError) as info:
        start(body, message_id)
    assert fragment in str(info.value)


def test_bare_request_starts_with_defaults_and_derived_id() -> None:
    req = start({}, message_id="2070443601311540")
    assert req.run_id == "run-2070443601311540"
    assert req.keep_vm_alive is False
    assert req.training_args == ()
    assert req.max_restarts == 0


def test_empty_body_is_an_empty_request() -> None:
    assert start(b"", "77").run_id == "run-77"


def test_redelivery_derives_the_same_run_id() -> None:
    assert start({}, "abc-9").run_id == start({}, "abc-9").run_id


def test_no_run_id_and_no_message_id() -> None:
    rejects({}, "no run_id and no message id", message_id=None)


def test_round_trip() -> None:
    req = start({"run_id": "exp-1", "keep_vm_alive": True, "training_config": "--lr 0.1 'a b'",
                 "binary": {"x86_64-linux": "/nix/store/abc-t"}, "max_hours": 2,
                 "max_restarts": 2, "requested_by": "ada", "stack": "tiny"})
    assert req.training_args == ("--lr", "0.1", "a b")
    again = StartRequest.from_json(req.to_json())
    assert again == req


@pytest.mark.parametrize(
    ("run_id", "fragment"),
    [
        ("", "is invalid"),
        ("9lives", "starting with a letter"),
        ("Upper", "is invalid"),
        ("has_underscore", "is invalid"),
        ("a" * 64, "1-63 characters"),
        ("a/b", "is invalid"),
        (5, "must be a string"),
    ],
)
def test_run_id_rules(run_id: object, fragment: str) -> None:
    rejects({"run_id": run_id}, fragment)


def test_run_id_of_63_chars_is_fine() -> None:
    assert start({"run_id": "a" * 63}).run_id == "a" * 63


def test_unknown_field_names_the_typo_and_suggests() -> None:
    rejects({"keep_vm_alvie": True}, "unknown field 'keep_vm_alvie' in start request "
            "(did you mean 'keep_vm_alive'?)")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"keep_vm_alive": "yes"}, "keep_vm_alive must be true or false, got 'yes'"),
        ({"max_hours": 0}, "max_hours must be positive"),
        ({"max_hours": -1}, "max_hours must be positive"),
        ({"max_hours": "3"}, "max_hours must be a number"),
        ({"max_hours": True}, "max_hours must be a number"),
        ({"max_restarts": 11}, "max_restarts must be between 0 and 10"),
        ({"max_restarts": 1.5}, "max_restarts must be a whole number"),
        ({"training_config": 5}, "training_config must be a string or a list of strings"),
        ({"training_config": ["ok", 3]}, "must hold only strings"),
        ({"training_config": "--name 'unclosed"}, "training_config has unbalanced quotes"),
        ({"training_config": "x" * (16 * 1024 + 1)}, "the limit is 16384 (16 KiB)"),
        ({"binary": ""}, "binary must be a non-empty single line"),
        ({"binary": "a\nb"}, "binary must be a non-empty single line"),
        ({"binary": {}}, "binary map must name at least one platform"),
        ({"binary": {"linux": "/nix/store/x"}}, "must look like x86_64-linux"),
        ({"binary": 3}, "binary must be a string or a platform map"),
        ({"stack": "Tiny!"}, "is not a valid stack name"),
        ({"requested_by": "x" * 300}, "requested_by is longer than 256 bytes"),
    ],
)
def test_field_rules(body: dict[str, object], fragment: str) -> None:
    rejects(body, fragment)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b"{not json", "start request is not valid JSON: Expecting property name"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b"\xff\xfe", "is not UTF-8 text"),
        (b"{" + b" " * (70 * 1024) + b"}", "the limit is 65536"),
    ],
)
def test_malformed_bodies(raw: bytes, fragment: str) -> None:
    rejects(raw, fragment)


def test_training_config_with_shell_metacharacters_stays_literal() -> None:
    req = start({"training_config": "--tag '; rm -rf /' $(id) `x` && echo"})
    assert req.training_args == ("--tag", "; rm -rf /", "$(id)", "`x`", "&&", "echo")


def test_training_config_exactly_16_kib_is_accepted() -> None:
    assert len(start({"training_config": "x" * 16 * 1024}).training_args[0]) == 16 * 1024


def test_run_id_from_odd_message_ids() -> None:
    assert run_id_from_message_id("ABC_123") == "run-abc-123"
    with pytest.raises(PermanentError, match="cannot derive a run id"):
        run_id_from_message_id("___")


def test_stop_request() -> None:
    stop = StopRequest.from_json(b'{"run_id": "exp-1", "reason": "workflow cancelled"}')
    assert stop == StopRequest("exp-1", "workflow cancelled")
    assert StopRequest.from_json(stop.to_json()) == stop
    with pytest.raises(PermanentError, match="stop request must name a run_id"):
        StopRequest.from_json(b"{}")
    with pytest.raises(PermanentError, match="unknown field 'why'"):
        StopRequest.from_json(b'{"run_id": "a", "why": "x"}')


def marker_body(**fields: object) -> bytes:
    return json.dumps({"attempt": 1, "at": "2026-11-29T12:00:00Z", **fields}).encode()


def test_marker_round_trip() -> None:
    m = NodeMarker.from_json(marker_body(exit_code=0, duration_s=12.5),
                             "markers/exp-1/worker-0/done.json")
    assert (m.run_id, m.node, m.kind, m.exit_code, m.at) == ("exp-1", "worker-0", "done", 0, T0)
    assert m.succeeded
    assert NodeMarker.from_json(m.to_json(), m.path) == m


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("runs/exp-1/worker-0/done.json", "is not a node marker"),
        ("markers/exp-1/worker-0/started.json", "is not a node marker"),
        ("markers/exp-1/worker-0/extra/done.json", "is not a node marker"),
        ("markers/exp-1/gpu-box/done.json", "must be shepherd or worker-<n>"),
        ("markers/Exp/worker-0/done.json", "marker run id 'Exp' is invalid"),
    ],
)
def test_marker_paths(path: str, fragment: str) -> None:
    with pytest.raises(PermanentError) as info:
        NodeMarker.from_json(marker_body(exit_code=0), path)
    assert fragment in str(info.value)


def test_marker_bodies() -> None:
    path = "markers/exp-1/worker-0/done.json"
    with pytest.raises(PermanentError, match="a done marker needs an exit_code or a signal"):
        NodeMarker.from_json(marker_body(), path)
    with pytest.raises(PermanentError, match="exit_code must be a whole number"):
        NodeMarker.from_json(marker_body(exit_code="0"), path)
    with pytest.raises(PermanentError, match="body names exp-2/worker-0"):
        NodeMarker.from_json(marker_body(exit_code=0, run_id="exp-2"), path)
    with pytest.raises(PermanentError, match="not an ISO 8601 timestamp"):
        NodeMarker.from_json(marker_body(exit_code=0, at="yesterday"), path)


def test_sweep_tick() -> None:
    assert SweepTick.from_json(b'{"op": "tick"}') == SweepTick()
    assert SweepTick.from_json(b"") == SweepTick()
    with pytest.raises(PermanentError, match="op must be 'tick'"):
        SweepTick.from_json(b'{"op": "boom"}')


def assignment(**over: object) -> Assignment:
    base = dict(run_id="exp-1", attempt=1, stack="tiny", node="worker-0", role="worker", rank=1,
                num_nodes=2, head_host="mac.example", port=9000, binary="/nix/store/x-t",
                args=("--lr", "0.1"), deadline=T0, boot_deadline=T0)
    base.update(over)
    return Assignment(**base)  # type: ignore[arg-type]


def test_assignment_argv_and_env() -> None:
    worker = assignment()
    assert worker.argv("/bin/t") == ["/bin/t", "worker", "--head-node=mac.example:9000",
                                     "--lr", "0.1"]
    shepherd = assignment(node="shepherd", role="shepherd", rank=0)
    assert shepherd.argv("/bin/t")[:3] == ["/bin/t", "shepherd", "--port=9000"]
    env = worker.env("/out")
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "9000"
    assert env["PCP_HEAD_NODE"] == "mac.example:9000" and env["PCP_OUTPUT_DIR"] == "/out"
    assert Assignment.from_json(worker.to_json()) == worker


TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
              "GROUP_WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT")
PCP_RANKS = ("PCP_LAYOUT", "PCP_NODE_RANK", "PCP_NUM_NODES", "PCP_WORKER_RANK",
             "PCP_NUM_WORKERS")


def layout_env(layout: str, node: str, rank: int) -> dict[str, str]:
    a = assignment(node=node, role="shepherd" if node == "shepherd" else "worker", rank=rank,
                   num_nodes=4, layout=layout)
    env = a.env("/out")
    assert Assignment.from_json(a.to_json()) == a
    return {k: env[k] for k in TORCH_VARS + PCP_RANKS if k in env}


def test_all_nodes_layout_numbers_the_shepherd_rank_0() -> None:
    assert layout_env("all-nodes", "shepherd", 0) == {
        "RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "9000", "PCP_LAYOUT": "all-nodes", "PCP_NODE_RANK": "0",
        "PCP_NUM_NODES": "4", "PCP_NUM_WORKERS": "3"}
    assert layout_env("all-nodes", "worker-2", 3) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "3", "GROUP_WORLD_SIZE": "4", "MASTER_ADDR": "mac.example",
        "MASTER_PORT": "9000", "PCP_LAYOUT": "all-nodes", "PCP_NODE_RANK": "3",
        "PCP_NUM_NODES": "4", "PCP_WORKER_RANK": "2", "PCP_NUM_WORKERS": "3"}


def test_workers_only_layout_leaves_the_shepherd_no_rank() -> None:
    assert layout_env("workers-only", "shepherd", 0) == {
        "WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9000",
        "PCP_LAYOUT": "workers-only", "PCP_NODE_RANK": "0", "PCP_NUM_NODES": "4",
        "PCP_NUM_WORKERS": "3"}
    assert layout_env("workers-only", "worker-0", 1) == {
        "RANK": "0", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "3", "TORCHELASTIC_USE_AGENT_STORE": "True",
        "MASTER_ADDR": "mac.example", "MASTER_PORT": "9000", "PCP_LAYOUT": "workers-only",
        "PCP_NODE_RANK": "1", "PCP_NUM_NODES": "4", "PCP_WORKER_RANK": "0",
        "PCP_NUM_WORKERS": "3"}


def test_layout_is_a_start_request_field() -> None:
    req = StartRequest.from_json(b'{"run_id": "exp-1", "layout": "workers-only"}')
    assert req.layout == "workers-only"
    assert StartRequest.from_json(req.to_json()) == req
    assert StartRequest.from_json(b'{"run_id": "exp-1"}').layout is None
    with pytest.raises(PermanentError, match="layout must be one of all-nodes, workers-only"):
        StartRequest.from_json(b'{"run_id": "exp-1", "layout": "gpus-only"}')
    with pytest.raises(PermanentError, match="layout must be one of"):
        Assignment.from_dict({**assignment().to_dict(), "layout": "x"})


def test_shepherd_command_round_trip_and_rules() -> None:
    cmd = ShepherdCommand("start", "exp-1", 1, assignment(node="shepherd", role="shepherd",
                                                          rank=0))
    assert ShepherdCommand.from_json(cmd.to_json()) == cmd
    with pytest.raises(PermanentError, match="start needs an assignment"):
        ShepherdCommand.from_json(b'{"action": "start", "run_id": "exp-1"}')
    with pytest.raises(PermanentError, match="action must be start or stop"):
        ShepherdCommand.from_json(b'{"action": "pause", "run_id": "exp-1"}')


def test_metrics_node_is_a_start_request_field() -> None:
    req = StartRequest.from_json(b'{"run_id": "exp-1", "metrics_node": "worker-2"}')
    assert req.metrics_node == "worker-2" and StartRequest.from_json(req.to_json()) == req
    with pytest.raises(PermanentError, match="metrics_node 'gpu-1' must be shepherd or worker"):
        StartRequest.from_json(b'{"run_id": "exp-1", "metrics_node": "gpu-1"}')


# ---------------------------------------------------------------- the torchrun launcher

TORCHRUN_OK = ("torchrun:/srv/train.py", "torchrun:pkg.train", "torchrun:train",
               "torchrun:/nix/store/abc-env/bin/train", "torchrun:/nix/store/abc-env!train",
               "torchrun:github:org/repo?dir=x#env!train", "torchrun:.#env!train",
               "torchrun:/opt/bin/trainer")


@pytest.mark.parametrize("binary", TORCHRUN_OK)
def test_torchrun_binaries_are_accepted_and_imply_workers_only(binary: str) -> None:
    req = start({"run_id": "exp-1", "binary": binary})
    assert req.binary == binary and is_torchrun(req.binary)
    assert torchrun_target(binary) == binary.removeprefix(TORCHRUN_PREFIX)
    assert run_layout(req.layout, req.binary, "all-nodes") == "workers-only"
    assert StartRequest.from_json(req.to_json()) == req


@pytest.mark.parametrize(("binary", "fragment"), [
    ("torchrun:", "must name one word after torchrun:"),
    ("torchrun:/srv/my train.py", "must name one word"),
    ("torchrun:--standalone", "must not start with '-'"),
    ("torchrun:-m", "torchrun would read it as one of its options"),
    ("torchrun:train.py", "a script must be an absolute path"),
    ("torchrun:/srv/../etc/x.py", "must not contain '..'"),
    ("torchrun:/srv/train.py!x", "'!PROGRAM' applies only to a Nix store path or a flake"),
    ("torchrun:github:org/repo#env", "must name its program, FLAKE#PKG!PROGRAM"),
    ("torchrun:.#env!", "after '!' must come a program name"),
    ("torchrun:.#env!a/b", "after '!' must come a program name"),
    ("torchrun:1bad", "neither an absolute path, a dotted module name nor a Nix reference"),
])
def test_torchrun_binaries_are_checked_strictly(binary: str, fragment: str) -> None:
    rejects({"run_id": "exp-1", "binary": binary}, fragment)
    rejects({"run_id": "exp-1", "binary": {"x86_64-linux": binary}}, fragment)


def test_torchrun_refuses_the_all_nodes_layout_and_mixed_maps() -> None:
    rejects({"run_id": "exp-1", "binary": "torchrun:pkg.train", "layout": "all-nodes"},
            "layout all-nodes cannot apply to a torchrun: binary")
    req = start({"run_id": "exp-1", "binary": "torchrun:pkg.train", "layout": "workers-only"})
    assert req.layout == "workers-only"
    rejects({"run_id": "exp-1", "binary": {"x86_64-linux": "torchrun:.#env!train",
                                           "aarch64-darwin": ".#train"}},
            "binary map mixes torchrun: and other binaries")
    both = start({"run_id": "exp-1", "binary": {"x86_64-linux": "torchrun:.#env!train",
                                               "aarch64-darwin": "torchrun:.#env!train"}})
    assert is_torchrun(both.binary)
    assert not is_torchrun("python:pkg.train") and not is_torchrun(None)
    assert run_layout(None, ".#train", "all-nodes") == "all-nodes"
    assert run_layout("workers-only", ".#train", "all-nodes") == "workers-only"


def test_a_torchrun_node_gets_only_pcp_variables() -> None:
    """torchrun numbers the processes; the launcher itself reads no RANK or MASTER_*."""
    worker = assignment(binary="torchrun:pkg.train", num_nodes=4, rank=2,
                        layout="workers-only")
    assert worker.launcher == "torchrun" and assignment().launcher == "contract"
    env = worker.env("/out")
    assert not set(TORCH_VARS) & set(env)
    assert env["PCP_LAUNCHER"] == "torchrun" and env["PCP_WORKER_RANK"] == "1"
    assert env["PCP_NUM_WORKERS"] == "3" and env["PCP_LAYOUT"] == "workers-only"
    assert "PCP_LAUNCHER" not in assignment().env("/out")
    assert Assignment.from_json(worker.to_json()) == worker
