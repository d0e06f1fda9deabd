"""Pulumi.yaml, the stack files, and StackConfig validation (no Pulumi runtime needed)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.infra

INFRA = Path(__file__).resolve().parents[2] / "infra"
if str(INFRA) not in sys.path:
    sys.path.insert(0, str(INFRA))

from pcp_infra.config import DEFAULTS, REQUIRED, ConfigError, StackConfig  # noqa: E402

STACK_SIZES = {"tiny": 1, "small": 3, "large": 7, "huge": 15}
VALID = {"shepherd_host": "shepherd.example.net", "github_repository": "example-org/pcp"}


def project_file() -> dict:
    return yaml.safe_load((INFRA / "Pulumi.yaml").read_text())


def stack_file(stack: str) -> dict:
    return yaml.safe_load((INFRA / f"Pulumi.{stack}.yaml").read_text()) or {}


def parse(stack: str = "tiny", **values) -> StackConfig:
    return StackConfig.from_mapping(
        stack=stack, project="pcp-test-project", values={**VALID, **values}
    )


def test_project_file_header():
    project = project_file()
    assert project["name"] == "pcp"
    runtime = project["runtime"]
    assert (runtime if isinstance(runtime, str) else runtime["name"]) == "python"
    assert project["description"].strip()


def test_every_key_declared_with_description_and_matching_default():
    declared = project_file()["config"]
    assert set(declared) == set(DEFAULTS)
    for key, decl in declared.items():
        assert ":" not in key, "project keys are declared without namespace"
        assert decl.get("description", "").strip(), key
        assert decl["type"] in ("string", "integer", "boolean", "array"), key
        if DEFAULTS[key] is REQUIRED:
            assert "default" not in decl, f"{key} is required: no default"
        else:
            assert decl["default"] == DEFAULTS[key], key
    for key in ("shepherd_host", "github_repository"):
        assert DEFAULTS[key] is REQUIRED


def test_documented_defaults():
    assert DEFAULTS["tcp_port"] == 9000
    assert DEFAULTS["max_run_hours"] == 6
    assert DEFAULTS["results_retention_days"] == 30
    assert DEFAULTS["sweep_interval_minutes"] == 5
    assert DEFAULTS["worker_ssh_source_ranges"] == ["35.235.240.0/20"]
    assert DEFAULTS["spot"] is False and DEFAULTS["external_ip"] is True
    assert "deeplearning-platform-release" in DEFAULTS["boot_image"]


@pytest.mark.parametrize("stack", list(STACK_SIZES))
def test_stack_files_set_only_declared_keys(stack):
    declared = set(project_file()["config"])
    config = stack_file(stack).get("config") or {}
    for key in config:
        namespace, _, name = key.partition(":")
        assert namespace in ("pcp", "gcp"), key
        if namespace == "pcp":
            assert name in declared, f"Pulumi.{stack}.yaml sets undeclared {key}"
    assert int(config["pcp:worker_count"]) == STACK_SIZES[stack]
    # The stack file alone (with the two required values) is a valid configuration.
    values = {k.split(":", 1)[1]: v for k, v in config.items() if k.startswith("pcp:")}
    cfg = parse(stack, **values)
    assert cfg.worker_count == STACK_SIZES[stack]
    assert cfg.has_gpu


def test_worker_count_bounds():
    assert parse(worker_count="15").worker_count == 15
    for bad in ("0", "16", "three"):
        with pytest.raises(ConfigError, match="worker_count"):
            parse(worker_count=bad)


def test_open_ranges_are_refused():
    with pytest.raises(ConfigError, match="whole internet"):
        parse(worker_ssh_source_ranges=["0.0.0.0/0"])
    with pytest.raises(ConfigError, match="whole internet"):
        parse(allow_shepherd_from='["203.0.113.0/24", "::/0"]')
    with pytest.raises(ConfigError, match="not a CIDR"):
        parse(allow_shepherd_from=["shepherd.example.net"])
    assert parse(allow_shepherd_from='["203.0.113.7/32"]').allow_shepherd_from == (
        "203.0.113.7/32",
    )


def test_required_and_formats():
    with pytest.raises(ConfigError, match="pcp:shepherd_host"):
        StackConfig.from_mapping(
            stack="tiny", project="pcp-test-project", values={"github_repository": "a/b"}
        )
    with pytest.raises(ConfigError, match="owner/repo"):
        parse(github_repository="just-a-name")
    with pytest.raises(ConfigError, match="not in pcp:region"):
        parse(zone="europe-west4-a")
    with pytest.raises(ConfigError, match="unknown"):
        parse(workers=3)
    with pytest.raises(ConfigError, match="stack name"):
        parse(stack="a-very-long-stack-name")
    with pytest.raises(ConfigError, match="sweep_interval_minutes"):
        parse(sweep_interval_minutes="60")
    with pytest.raises(ConfigError, match="worker_ports"):
        parse(worker_ports="9100-9000")


def test_accelerator_optimized_machines_get_no_guest_accelerators():
    g2 = parse(machine_type="g2-standard-8", gpu_type="nvidia-l4")
    assert g2.accelerator_optimized and not g2.attach_guest_accelerators and g2.has_gpu
    n1 = parse()
    assert n1.attach_guest_accelerators and n1.gpu_type == "nvidia-tesla-t4"
    with pytest.raises(ConfigError, match="gpu_type"):
        parse(gpu_type="")


def test_worker_ports_default_to_a_range_from_tcp_port():
    assert parse(tcp_port="9000").worker_ports == ("9000-9100",)
    assert parse(worker_ports="1024-65535").worker_ports == ("1024-65535",)


def test_function_environment_is_all_strings():
    cfg = parse(worker_hourly_usd="0.54", binary="github:o/r#trainer")
    env = cfg.function_environment("b", timeout_seconds=540)
    assert set(env) == {
        "PCP_STACK", "PCP_PROJECT", "PCP_ZONE", "PCP_BUCKET", "PCP_WORKER_COUNT",
        "PCP_SHEPHERD_HOST", "PCP_TCP_PORT", "PCP_MAX_RUN_HOURS", "PCP_BOOT_TIMEOUT_MINUTES",
        "PCP_KEEP_ALIVE_HOURS", "PCP_SWEEP_INTERVAL_MINUTES", "PCP_BINARY", "PCP_LAYOUT",
        "PCP_WORKER_HOURLY_USD", "PCP_SHEPHERD_HOURLY_USD", "PCP_FUNCTION_TIMEOUT_SECONDS",
        "PCP_FIRST_BOOT_GRACE_MINUTES", "PCP_IMAGE", "PCP_WANDB_PROJECT", "PCP_WANDB_ENTITY",
    }  # fmt: skip
    assert all(isinstance(v, str) for v in env.values())
    assert env["PCP_WORKER_HOURLY_USD"] == "0.54"
    assert env["PCP_BINARY"] == "github:o/r#trainer"


@pytest.mark.parametrize("timeout", [60, 540])
def test_function_environment_carries_the_functions_own_timeout(timeout):
    env = parse().function_environment("b", timeout_seconds=timeout)
    assert env["PCP_FUNCTION_TIMEOUT_SECONDS"] == str(timeout)


def test_function_environment_refuses_a_timeout_that_cannot_be():
    with pytest.raises(ConfigError, match="timeout"):
        parse().function_environment("b", timeout_seconds=0)


def test_readme_names_the_bootstrap_steps():
    readme = (INFRA / "README.md").read_text()
    for needle in [
        "pulumi stack select tiny",
        "pulumi config set gcp:project",
        "pcp:shepherd_host",
        "pcp:github_repository",
        "PULUMI_ACCESS_TOKEN",
        "GCP_WORKLOAD_IDENTITY_PROVIDER",
        "GCP_DISPATCH_SERVICE_ACCOUNT",
        "GCP_DEPLOY_SERVICE_ACCOUNT",
        "GCP_PROJECT",
        "GCP_CREDENTIALS",
    ]:
        assert needle in readme, needle
    assert re.search(r"never been deployed", readme)


def test_bootstrap_metadata_values_match_the_startup_script_patterns():
    cfg = parse(cachix_cache="pcp-example", nix_installer_url="https://example.org/install")
    assert cfg.worker_bootstrap_metadata() == {
        "pcp-cachix-cache": "pcp-example",
        "pcp-nix-installer-url": "https://example.org/install",
    }
    assert parse().worker_bootstrap_metadata() == {}
    with pytest.raises(ConfigError, match="cachix_cache"):
        parse(cachix_cache="Bad Cache")
    with pytest.raises(ConfigError, match="nix_installer_url"):
        parse(nix_installer_url="http://insecure.example/install")
    with pytest.raises(ConfigError, match="cachix_public_key"):
        parse(cachix_public_key="no-colon")
    url, key = "http://10.0.0.5:8080/cache", "pcp-cache-1:AbCdEf0123456789+/AbCdEf0123456789="
    assert parse(nix_substituter=url, cachix_public_key=key).worker_bootstrap_metadata() == {
        "pcp-nix-substituter": url, "pcp-cachix-public-key": key}
    with pytest.raises(ConfigError, match="nix_substituter needs pcp:cachix_public_key"):
        parse(nix_substituter=url)
    for bad in ("https://a.example b.example", "file:///nix/cache", "https://a.example/?x=1"):
        with pytest.raises(ConfigError, match="nix_substituter"):
            parse(nix_substituter=bad, cachix_public_key=key)


#: Keyword arguments whose value is a free-form string map, where a dict literal is right.
STRING_MAP_KEYWORDS = {
    "labels",
    "metadata",
    "environment_variables",
    "attribute_mapping",
    "custom_attributes",
    "label_extractors",
    "attributes",
}


def test_object_inputs_use_args_classes_not_dict_literals():
    """A misspelt key in a dict literal is silently dropped; *Args classes raise TypeError."""
    import ast

    offenders = []
    for path in sorted((INFRA / "pcp_infra").glob("*.py")) + [INFRA / "__main__.py"]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            for kw in node.keywords:
                value = kw.value
                is_dict = isinstance(value, (ast.Dict, ast.DictComp)) or (
                    isinstance(value, ast.Call)
                    and isinstance(value.func, ast.Name)
                    and value.func.id == "dict"
                )
                if kw.arg is not None and is_dict and kw.arg not in STRING_MAP_KEYWORDS:
                    offenders.append(f"{path.name}:{value.lineno} {kw.arg}=")
    assert not offenders, offenders


def test_layout_is_a_stack_default():
    def env(cfg: StackConfig) -> dict[str, str]:
        return cfg.function_environment("b", timeout_seconds=60)

    assert env(parse())["PCP_LAYOUT"] == "all-nodes"
    assert env(parse(layout="workers-only"))["PCP_LAYOUT"] == "workers-only"
    with pytest.raises(ConfigError, match="pcp:layout must be one of all-nodes, workers-only"):
        parse(layout="gpus-only")


def test_gpu_idle_default_reaches_the_functions_and_reads_back():
    from pcp.core.messages import GpuIdle
    from pcp.settings import Settings

    cfg = parse(gpu_idle="5%:15m:10m")
    assert cfg.gpu_idle == GpuIdle(5, 15, 10)
    env = cfg.function_environment("b", timeout_seconds=540)
    assert Settings.from_env(env).policy.default_gpu_idle == GpuIdle(5, 15, 10)
    assert "PCP_GPU_IDLE" not in parse().function_environment("b", timeout_seconds=540)
    with pytest.raises(ConfigError, match="pcp:gpu_idle"):
        parse(gpu_idle="lots")


def test_prices_override_the_default_table_key_by_key():
    from pcp.core.costs import DEFAULT_PRICES

    table = parse(prices='{"pd-balanced": 0.12}', worker_hourly_usd="0.54").prices
    assert table == {**DEFAULT_PRICES, "pd-balanced": 0.12, "worker_hour": 0.54}
    assert parse(prices={"pd-ssd": "0.2"}).prices["pd-ssd"] == 0.2  # a YAML object works too
    for bad, words in (('{"pd-gold": 1}', "unknown price"), ("[1]", "object of prices"),
                       ('{"pd-ssd": -1}', ">= 0"), ("{", "object of prices")):
        with pytest.raises(ConfigError, match=words):
            parse(prices=bad)
def test_image_is_a_strict_reference_and_reaches_the_functions():
    def env(cfg: StackConfig) -> dict[str, str]:
        return cfg.function_environment("b", timeout_seconds=60)

    ref = "us-central1-docker.pkg.dev/my-project/pcp-tiny/trainer:v1"
    assert env(parse(image=ref))["PCP_IMAGE"] == ref
    assert env(parse())["PCP_IMAGE"] == ""
    with pytest.raises(ConfigError, match="names no registry"):
        parse(image="trainer:v1")
    with pytest.raises(ConfigError, match="sha256"):
        parse(image="us-docker.pkg.dev/p/r/t@sha256:abc")
