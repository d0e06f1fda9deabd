"""wandb on the nodes: the binary's WANDB_* environment, the API key from Secret Manager, and
no key anywhere the agent writes.

The production path (`metadata_token` + `access_secret`) runs against the metadata-server
stand-in's token endpoint and a Secret Manager stand-in that enforces the real request shape
(pcp_dev/local/secrets.py). The run test drives the real agents (shepherd with
`--wandb-key-file`, worker through Secret Manager) over fake-gcs-server and the Pub/Sub
emulator, with examples/wandb-trainer and the real `wandb` library offline.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pcp.agent.assignment import Metadata
from pcp.agent.log import Log
from pcp.agent.wandb import SecretError, access_secret, metadata_token, wandb_env
from pcp.core.messages import Assignment, ShepherdCommand
from pcp_dev import REPO
from pcp_dev.local.metadata import MetadataServer
from pcp_dev.local.secrets import SecretManagerStandIn
from tests.agent import test_agent
from tests.agent.test_agent import TRAIN, Harness, assignments, emulator, free_port, new_run
from tests.conftest import TEST_PROJECT

# The agent tests' fixtures: a harness of real agent processes, with the Pub/Sub emulator.
harness = test_agent.harness
cluster = test_agent.cluster

KEY = "wk" + "3f9c2a7d" * 5  # 42 characters, like a wandb key; never written anywhere
WANDB_TRAINER = REPO / "examples" / "wandb-trainer" / "wandb_trainer.py"


def assignment(**fields: object) -> Assignment:
    now = datetime.now(UTC)
    base: dict[str, object] = dict(
        run_id="r-1", attempt=1, stack="tiny", node="worker-0", role="worker", rank=1,
        num_nodes=2, head_host="127.0.0.1", port=9000, binary=None, args=(),
        deadline=now + timedelta(hours=1), boot_deadline=now + timedelta(minutes=5))
    return Assignment(**{**base, **fields})  # type: ignore[arg-type]


def test_no_wandb_project_means_no_wandb_variables() -> None:
    def never() -> str:
        raise AssertionError("the key must not be read for a run without wandb")

    assert wandb_env(assignment(), "/out", never, Log()) == {}


def test_the_binary_gets_project_entity_group_name_dir_and_key() -> None:
    env = wandb_env(assignment(wandb_project="p", wandb_entity="team"), "/out", lambda: KEY,
                    Log())
    assert env == {"WANDB_PROJECT": "p", "WANDB_ENTITY": "team", "WANDB_RUN_GROUP": "r-1",
                   "WANDB_NAME": "r-1-worker-0", "WANDB_DIR": "/out", "WANDB_API_KEY": KEY}


def test_an_unreadable_key_is_said_without_it_and_the_binary_still_runs(
        capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> str:
        raise SecretError("Secret Manager answered 404 NOT_FOUND for pcp-tiny-wandb-api-key")

    env = wandb_env(assignment(wandb_project="p"), "/out", fails, Log(stack="tiny"))
    assert "WANDB_API_KEY" not in env and env["WANDB_PROJECT"] == "p"
    [line] = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["event"] == "wandb_key_missing" and "404" in line["reason"]


@pytest.fixture
def secrets() -> SecretManagerStandIn:
    with SecretManagerStandIn(TEST_PROJECT) as s:
        yield s


def test_the_key_comes_from_secret_manager_with_the_metadata_token(
        secrets: SecretManagerStandIn) -> None:
    with MetadataServer(dict, "worker-0") as server:
        secrets.tokens.add(server.token)
        secrets.add_version("pcp-tiny-wandb-api-key", b"old")
        secrets.add_version("pcp-tiny-wandb-api-key", KEY.encode() + b"\n")
        token = metadata_token(Metadata(server.host))
        assert token == server.token
        got = access_secret(TEST_PROJECT, "pcp-tiny-wandb-api-key", token,
                            endpoint=secrets.endpoint)
    assert got == KEY  # the latest version, its trailing newline stripped
    [req] = secrets.requests
    assert req == {"method": "GET", "authorization": f"Bearer {server.token}",
                   "path": f"/v1/projects/{TEST_PROJECT}/secrets/pcp-tiny-wandb-api-key/"
                           "versions/latest:access"}


def test_secret_manager_refusals_are_clear_and_never_hold_a_key(
        secrets: SecretManagerStandIn) -> None:
    secrets.tokens.add("good")
    secrets.create("pcp-tiny-wandb-api-key")  # as Pulumi creates it: no version
    with pytest.raises(SecretError, match="404 NOT_FOUND.*gcloud secrets versions add"):
        access_secret(TEST_PROJECT, "pcp-tiny-wandb-api-key", "good", endpoint=secrets.endpoint)
    secrets.add_version("pcp-tiny-wandb-api-key", KEY.encode())
    with pytest.raises(SecretError, match="403 PERMISSION_DENIED") as denied:
        access_secret(TEST_PROJECT, "pcp-tiny-wandb-api-key", "other", endpoint=secrets.endpoint)
    assert KEY not in str(denied.value)
    with pytest.raises(SecretError, match="401 UNAUTHENTICATED"):
        access_secret(TEST_PROJECT, "pcp-tiny-wandb-api-key", "", endpoint=secrets.endpoint)
    secrets.add_version("pcp-tiny-wandb-api-key", b"two words")
    with pytest.raises(SecretError, match="spaces") as spaced:
        access_secret(TEST_PROJECT, "pcp-tiny-wandb-api-key", "good", endpoint=secrets.endpoint)
    assert "two" not in str(spaced.value)


def test_a_payload_failing_its_checksum_is_refused(secrets: SecretManagerStandIn,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    secrets.tokens.add("good")
    secrets.add_version("s", KEY.encode())
    real = secrets.answer

    def corrupt(*args: object) -> tuple[int, dict]:
        code, body = real(*args)  # type: ignore[arg-type]
        body["payload"]["data"] = base64.b64encode(b"tampered").decode()
        return code, body

    monkeypatch.setattr(secrets, "answer", corrupt)
    with pytest.raises(SecretError, match="dataCrc32c"):
        access_secret(TEST_PROJECT, "s", "good", endpoint=secrets.endpoint)


def wandb_run_records(data: bytes) -> list[object]:
    """The `Record`s of a wandb run file (run-<id>.wandb): a 7-byte header (`:W&B`, magic,
    version), then a LevelDB-style log of 32 KiB blocks whose chunks (4-byte checksum, 2-byte
    little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) hold protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B", data[:8]
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind in (2, 3):
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
            pending = b""
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def _wrapper(tmp: Path) -> str:
    """A binary that records a digest of the key it was given, then is the wandb trainer."""
    path = tmp / "key_digest_then_wandb_trainer.py"
    path.write_text(
        "import hashlib, os, pathlib, runpy, sys\n"
        "out = pathlib.Path(os.environ['PCP_OUTPUT_DIR']); out.mkdir(parents=True, exist_ok=True)\n"
        "key = os.environ.get('WANDB_API_KEY', '')\n"
        "(out / 'key.sha256').write_text(hashlib.sha256(key.encode()).hexdigest())\n"
        f"sys.argv = [{str(WANDB_TRAINER)!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({str(WANDB_TRAINER)!r}, run_name='__main__')\n")
    return f"python:{path}"


@emulator
def test_a_run_logs_to_wandb_offline_and_no_key_is_written_anywhere(
        cluster: Harness, secrets: SecretManagerStandIn, tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -r "
                        "requirements-dev.txt)")
    run_id, port = new_run(), free_port()
    key_file = tmp_path / "wandb-key"
    key_file.write_text(KEY + "\n")
    plan_ = [replace(a, wandb_project="pcp-test", wandb_entity="example-team")
             for a in assignments(run_id, cluster.stack, 1, port,
                                  (*TRAIN, "--wandb-mode", "offline"),
                                  binary=_wrapper(tmp_path))]
    secrets.add_version(f"pcp-{cluster.stack}-wandb-api-key", KEY.encode())
    secrets.tokens.add("ya29.local-worker-0")  # the worker's metadata stand-in token
    shepherd = cluster.shepherd("--once", "--wandb-key-file", str(key_file))
    cluster.publish(ShepherdCommand("start", run_id, 1, plan_[0]).to_json())
    worker = cluster.worker(plan_[1], "worker-0",
                            env={"PCP_SECRETMANAGER_ENDPOINT": secrets.endpoint})
    assert shepherd.wait() == 0, shepherd.text()
    assert worker.wait() == 0, worker.text()
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    names = cluster.store.list("")
    for node in ("shepherd", "worker-0"):
        # The binary had the key (from the file on the shepherd, Secret Manager on the worker).
        assert cluster.get(f"runs/{run_id}/{node}/key.sha256") == digest.encode(), node
        # The offline run directory is among the node's outputs; its run record (what
        # `wandb sync` would send) has the group, the name and the run id in its config.
        files = [n for n in names if n.startswith(f"runs/{run_id}/{node}/wandb/offline-run-")
                 and n.endswith(".wandb")]
        assert len(files) == 1, [n for n in names if "/wandb/" in n]
        [run] = [r.run for r in wandb_run_records(cluster.get(files[0]) or b"")  # type: ignore[attr-defined]
                 if r.WhichOneof("record_type") == "run"]  # type: ignore[attr-defined]
        assert (run.project, run.entity, run.run_group, run.display_name) == (
            "pcp-test", "example-team", run_id, f"{run_id}-{node}")
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert (config["pcp_run_id"], config["pcp_node"]) == (run_id, node), config
    assert [r for r in secrets.requests if r["path"].endswith(
        f"/secrets/pcp-{cluster.stack}-wandb-api-key/versions/latest:access")], secrets.requests
    # Nothing the agents wrote holds the key: every object (and its metadata), every log line.
    for name in names:
        assert KEY.encode() not in (cluster.get(name) or b""), name
    for listed in cluster.store.scan(""):
        assert KEY not in json.dumps(listed.metadata), listed.name
    for agent in (shepherd, worker):
        assert KEY not in agent.text()
        assert agent.console is None or KEY not in agent.console.read_text()
