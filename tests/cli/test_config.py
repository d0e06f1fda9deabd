"""Resource-name resolution: flags > environment > Pulumi outputs file > local replica file."""

from __future__ import annotations

import json

import pytest

from pcp.cli.config import (
    ConfigError,
    load_outputs,
    read_local_state,
    resolve,
    resolve_from,
)

pytestmark = pytest.mark.cli

OUTPUTS = {"stack": "tiny", "project": "out-proj", "bucket": "out-bucket", "region": "out-region",
           "zone": "europe-west4-a", "scheduler_job": "pcp-tiny-sweep",
           "topics": {"start": "pcp-tiny-start"}}
LOCAL = {"project": "local-proj", "bucket": "local-bucket",
         "storage_endpoint": "http://127.0.0.1:4443", "pubsub_host": "127.0.0.1:8085"}


def local_for(stack: str) -> dict[str, str] | None:
    return dict(LOCAL) if stack == "tiny" else None


def test_flags_beat_environment_beat_outputs() -> None:
    flags = {"project": "flag-proj", "bucket": None, "region": None}
    env = {"PCP_BUCKET": "env-bucket"}
    cfg = resolve(flags, env, OUTPUTS, local_for)
    assert (cfg.project, cfg.bucket, cfg.region) == ("flag-proj", "env-bucket", "out-region")
    assert cfg.sources == {"stack": "outputs", "project": "--project", "bucket": "PCP_BUCKET",
                           "region": "outputs"}
    assert not cfg.local and cfg.storage_endpoint is None and cfg.pubsub_host is None


def test_environment_beats_outputs_for_every_name() -> None:
    env = {"PCP_PROJECT": "env-proj", "PCP_BUCKET": "env-bucket", "PCP_REGION": "env-region",
           "PCP_STACK": "tiny"}
    cfg = resolve({}, env, OUTPUTS, local_for)
    assert (cfg.stack, cfg.project, cfg.bucket, cfg.region) == (
        "tiny", "env-proj", "env-bucket", "env-region")


def test_outputs_beat_the_local_replica() -> None:
    cfg = resolve({}, {}, OUTPUTS, local_for)
    assert (cfg.project, cfg.bucket, cfg.local) == ("out-proj", "out-bucket", False)
    assert cfg.job_name == "projects/out-proj/locations/out-region/jobs/pcp-tiny-sweep"


def test_local_replica_is_the_last_resort() -> None:
    cfg = resolve({}, {}, None, local_for)
    assert cfg.local
    assert (cfg.project, cfg.bucket) == ("local-proj", "local-bucket")
    assert cfg.storage_endpoint == "http://127.0.0.1:4443"
    assert cfg.pubsub_host == "127.0.0.1:8085"
    assert cfg.sources["project"] == "local replica"


def test_local_replica_is_ignored_once_anything_names_a_project() -> None:
    cfg = resolve({}, {"PCP_PROJECT": "real"}, None, local_for)
    assert not cfg.local and cfg.pubsub_host is None
    assert cfg.bucket == "pcp-tiny-real"  # the Pulumi program's naming
    assert cfg.sources["bucket"] == "default"


def test_local_replica_file_is_per_stack() -> None:
    with pytest.raises(ConfigError, match="no resource names for stack small"):
        resolve({"stack": "small"}, {}, None, local_for)


def test_local_replica_file_needs_its_endpoints() -> None:
    broken = {"project": "p", "bucket": "b", "storage_emulator_host": "http://127.0.0.1:1"}
    with pytest.raises(ConfigError, match="lacks pubsub_host"):
        resolve({}, {}, None, lambda stack: broken)
    # The emulator variables' names are accepted too.
    ok = {**broken, "pubsub_emulator_host": "127.0.0.1:2"}
    assert resolve({}, {}, None, lambda stack: ok).pubsub_host == "127.0.0.1:2"


def test_stack_defaults_to_tiny_and_must_be_known() -> None:
    assert resolve({}, {"PCP_PROJECT": "p"}).stack == "tiny"
    with pytest.raises(ConfigError, match="unknown stack 'medium': use one of tiny, small, "
                                          "large, huge"):
        resolve({}, {"PCP_STACK": "medium", "PCP_PROJECT": "p"})


def test_flag_stack_beats_environment_stack() -> None:
    assert resolve({"stack": "large"}, {"PCP_STACK": "small", "PCP_PROJECT": "p"}).stack == "large"


def test_outputs_of_another_stack_are_refused() -> None:
    with pytest.raises(ConfigError, match="outputs file is for stack 'tiny', not 'huge'"):
        resolve({"stack": "huge"}, {}, OUTPUTS)


def test_qualified_pulumi_stack_name() -> None:
    cfg = resolve({}, {}, {**OUTPUTS, "stack": "acme/pcp/small"})
    assert cfg.stack == "small"


def test_region_from_zone_and_full_job_name() -> None:
    outputs = {k: v for k, v in OUTPUTS.items() if k != "region"}
    assert resolve({}, {}, outputs).region == "europe-west4"
    full = "projects/x/locations/y/jobs/z"
    assert resolve({}, {}, {**OUTPUTS, "scheduler_job": full}).job_name == full


def test_no_region_means_no_job_name() -> None:
    assert resolve({}, {"PCP_PROJECT": "p"}).job_name is None


def test_nothing_configured_says_what_to_do() -> None:
    with pytest.raises(ConfigError) as info:
        resolve({}, {})
    text = str(info.value)
    for hint in ("--project", "PCP_PROJECT", "--outputs", "pcp local up --stack tiny"):
        assert hint in text


def test_readers(tmp_path) -> None:
    out = tmp_path / "outputs.json"
    out.write_text(json.dumps(OUTPUTS))
    assert load_outputs(out)["bucket"] == "out-bucket"
    out.write_text("[1]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_outputs(out)
    with pytest.raises(ConfigError, match="cannot read the outputs file"):
        load_outputs(tmp_path / "missing.json")
    assert read_local_state(tmp_path, "tiny") is None
    (tmp_path / "tiny.json").write_text(json.dumps(LOCAL))
    assert read_local_state(tmp_path, "tiny") == LOCAL


def test_resolve_from_reads_outputs_then_local_dir(tmp_path) -> None:
    (tmp_path / "tiny.json").write_text(json.dumps(LOCAL))
    out = tmp_path / "outputs.json"
    out.write_text(json.dumps(OUTPUTS))
    env = {"PCP_LOCAL_DIR": str(tmp_path)}
    assert resolve_from({}, env).project == "local-proj"
    assert resolve_from({}, {**env, "PCP_OUTPUTS": str(out)}).project == "out-proj"
    assert resolve_from({"outputs": str(out)}, env).bucket == "out-bucket"
    assert resolve_from({"project": "flag"}, {**env, "PCP_OUTPUTS": str(out)}).project == "flag"
