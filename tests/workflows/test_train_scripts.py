"""The train workflow's own scripts, run here with bash as the runner runs them.

The settings check (first step) and the wait step are executed with the environment GitHub
would give them: the check with or without each variable, the wait with a stand-in `pcp` on
PATH that records its arguments and exits as told. Also the time budget, computed from the
workflow's own numbers: the job must never reach its timeout, since a job timeout counts as a
cancellation and would stop the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.workflows

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / ".github" / "workflows" / "train.yml"
DOCS = ROOT / "docs" / "workflows.md"

#: What GitHub runs a `run:` script with when the shell is bash.
BASH = ["bash", "--noprofile", "--norc", "-eo", "pipefail"]

#: Every setting present, as a repository configured for WIF would have them.
COMPLETE = {
    "GCP_PROJECT": "my-project-1",
    "PCP_SHEPHERD_HOST": "shepherd.example.net",
    "PCP_EXTRA_CONFIG": "",
    "PULUMI_ORG": "",
    "PULUMI_BACKEND_URL": "",
    "GCP_WORKLOAD_IDENTITY_PROVIDER":
        "projects/1/locations/global/workloadIdentityPools/p/providers/github",
    "GCP_DEPLOY_SERVICE_ACCOUNT": "pcp-tiny-deploy@my-project-1.iam.gserviceaccount.com",
    "GCP_DISPATCH_SERVICE_ACCOUNT": "pcp-tiny-dispatch@my-project-1.iam.gserviceaccount.com",
    "HAVE_PULUMI_ACCESS_TOKEN": "true",
    "HAVE_GCP_CREDENTIALS": "false",
}


def workflow() -> dict[str, Any]:
    return yaml.safe_load(TRAIN.read_text())


def job() -> dict[str, Any]:
    [only] = workflow()["jobs"].values()
    return only


def step_by_id(step_id: str) -> dict[str, Any]:
    [found] = [s for s in job()["steps"] if s.get("id") == step_id]
    return found


def run_script(script: str, env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, str], dict[str, str]]:  # noqa: E501
    """Run one step's script; return the process and what it wrote to GITHUB_OUTPUT/ENV."""
    output, genv = tmp_path / "github_output", tmp_path / "github_env"
    output.write_text("")
    genv.write_text("")
    path = tmp_path / "script.sh"
    path.write_text(script)
    full = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "GITHUB_OUTPUT": str(output),
        "GITHUB_ENV": str(genv),
        "GITHUB_REPOSITORY": "example-org/pcp-example",
        "STACK": "tiny",
        "PCP_WAIT_BUDGET_MINUTES": job()["env"]["PCP_WAIT_BUDGET_MINUTES"],
        **env,
    }
    proc = subprocess.run([*BASH, str(path)], env=full, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)

    def pairs(p: Path) -> dict[str, str]:
        return dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)

    return proc, pairs(output), pairs(genv)


# --------------------------------------------------------------------------- the first step


def preflight(env: dict[str, str], tmp_path: Path):  # noqa: ANN201
    return run_script(step_by_id("preflight")["run"], env, tmp_path)


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("::error")]


def test_the_check_is_the_first_step_and_reads_settings_only_from_env() -> None:
    first = job()["steps"][0]
    assert first.get("id") == "preflight"
    assert "uses" not in first
    for name in ("GCP_PROJECT", "PCP_SHEPHERD_HOST", "PCP_EXTRA_CONFIG", "PULUMI_BACKEND_URL",
                 "GCP_WORKLOAD_IDENTITY_PROVIDER", "GCP_DEPLOY_SERVICE_ACCOUNT",
                 "GCP_DISPATCH_SERVICE_ACCOUNT", "PULUMI_ORG"):
        assert first["env"][name] == "${{ vars." + name + " }}"
    # Secrets never enter the step: only whether they are set.
    assert first["env"]["HAVE_PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN != '' }}"
    assert first["env"]["HAVE_GCP_CREDENTIALS"] == "${{ secrets.GCP_CREDENTIALS != '' }}"


def test_nothing_set_names_every_missing_setting(tmp_path: Path) -> None:
    empty = {k: "" for k in COMPLETE} | {"HAVE_PULUMI_ACCESS_TOKEN": "false",
                                          "HAVE_GCP_CREDENTIALS": "false"}
    proc, out, _ = preflight(empty, tmp_path)
    assert proc.returncode == 1
    found = errors(proc)
    assert len(found) == 4, found
    for needle in ("variable GCP_PROJECT", "variable PCP_SHEPHERD_HOST",
                   "secret PULUMI_ACCESS_TOKEN", "variable GCP_WORKLOAD_IDENTITY_PROVIDER"):
        assert sum(needle in line for line in found) == 1, (needle, found)
    assert "environment training-tiny" in found[0]
    assert "config-map" not in out


@pytest.mark.parametrize("name", ["GCP_PROJECT", "PCP_SHEPHERD_HOST",
                                  "GCP_DEPLOY_SERVICE_ACCOUNT", "GCP_DISPATCH_SERVICE_ACCOUNT"])
def test_one_missing_variable_is_named_alone(name: str, tmp_path: Path) -> None:
    proc, _, _ = preflight({**COMPLETE, name: ""}, tmp_path)
    assert proc.returncode == 1
    [error] = errors(proc)
    assert f"variable {name} " in error


def test_a_key_instead_of_wif_and_a_backend_instead_of_a_token(tmp_path: Path) -> None:
    env = {**COMPLETE, "GCP_WORKLOAD_IDENTITY_PROVIDER": "", "GCP_DEPLOY_SERVICE_ACCOUNT": "",
           "GCP_DISPATCH_SERVICE_ACCOUNT": "", "HAVE_GCP_CREDENTIALS": "true",
           "HAVE_PULUMI_ACCESS_TOKEN": "false", "PULUMI_BACKEND_URL": "gs://my-pulumi-state"}
    proc, out, _ = preflight(env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out["stack-name"] == "tiny"


def test_complete_settings_give_the_config_map_and_start_the_clock(tmp_path: Path) -> None:
    before = int(time.time())
    proc, out, genv = preflight(COMPLETE, tmp_path)
    after = int(time.time())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert out["stack-name"] == "tiny"
    assert json.loads(out["config-map"]) == {
        "gcp:project": {"value": "my-project-1", "secret": False},
        "pcp:shepherd_host": {"value": "shepherd.example.net", "secret": False},
        "pcp:github_repository": {"value": "example-org/pcp-example", "secret": False},
    }
    budget = int(job()["env"]["PCP_WAIT_BUDGET_MINUTES"]) * 60
    assert before + budget <= int(genv["PCP_WAIT_DEADLINE"]) <= after + budget


def test_an_unknown_stack_is_refused_before_anything(tmp_path: Path) -> None:
    proc, out, genv = preflight({**COMPLETE, "STACK": "tiny\n::error::x"}, tmp_path)
    assert proc.returncode == 1
    assert not out and not genv


def test_pulumi_org_prefixes_the_stack(tmp_path: Path) -> None:
    _, out, _ = preflight({**COMPLETE, "PULUMI_ORG": "my-org"}, tmp_path)
    assert out["stack-name"] == "my-org/tiny"


def test_values_are_data_not_code(tmp_path: Path) -> None:
    hostile = "$(touch pwned)`touch pwned2`\"; echo '{x}'\nstack-name=evil"
    proc, out, _ = preflight({**COMPLETE, "PCP_SHEPHERD_HOST": hostile}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out["config-map"])["pcp:shepherd_host"]["value"] == hostile
    assert out["stack-name"] == "tiny"  # a newline in a value adds no output of its own
    assert not list(tmp_path.glob("pwned*"))


def test_an_organisation_name_cannot_add_outputs(tmp_path: Path) -> None:
    proc, out, _ = preflight({**COMPLETE, "PULUMI_ORG": "org\nconfig-map={}"}, tmp_path)
    assert proc.returncode == 1
    assert "stack-name" not in out and "config-map" not in out


def test_extra_config_is_merged_as_strings(tmp_path: Path) -> None:
    extra = json.dumps({"pcp:zone": "us-central1-b", "pcp:spot": True, "pcp:boot_disk_gb": 200})
    proc, out, _ = preflight({**COMPLETE, "PCP_EXTRA_CONFIG": extra}, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = json.loads(out["config-map"])
    assert config["pcp:zone"] == {"value": "us-central1-b", "secret": False}
    assert config["pcp:spot"]["value"] == "true"
    assert config["pcp:boot_disk_gb"]["value"] == "200"


@pytest.mark.parametrize("extra", [
    "not json",
    '["pcp:zone"]',
    '{"gcp:region": "x"}',
    '{"pcp:shepherd_host": "elsewhere"}',
    '{"pcp:worker_ssh_source_ranges": ["10.0.0.0/8"]}',
])
def test_bad_extra_config_fails_the_check(extra: str, tmp_path: Path) -> None:
    proc, out, _ = preflight({**COMPLETE, "PCP_EXTRA_CONFIG": extra}, tmp_path)
    assert proc.returncode != 0
    [error] = errors(proc)
    assert error.startswith("::error title=PCP_EXTRA_CONFIG::")
    assert "config-map" not in out


# --------------------------------------------------------------------------- the wait step


@pytest.fixture
def fake_pcp(tmp_path: Path) -> Path:
    """A `pcp` that records its arguments (one per line) and exits with $FAKE_PCP_EXIT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pcp"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_PCP_ARGS"\nexit "$FAKE_PCP_EXIT"\n')
    fake.chmod(0o755)
    return bin_dir


def wait(fake_pcp: Path, tmp_path: Path, *, exit_code: int, seconds_left: int,
         training_config: str = "", keep: str = "false", layout: str = "stack-default",
         max_cost: str = "", image: str = ""):  # noqa: ANN201
    assert shutil.which("timeout"), "coreutils timeout is needed (the runner has it)"
    args_file = tmp_path / "pcp-args"
    env = {
        "PATH": f"{fake_pcp}:{os.environ['PATH']}",
        "FAKE_PCP_ARGS": str(args_file),
        "FAKE_PCP_EXIT": str(exit_code),
        "PCP_WAIT_DEADLINE": str(int(time.time()) + seconds_left),
        "RUN_ID": "gh-1-1",
        "KEEP_VM_ALIVE": keep,
        "TRAINING_CONFIG": training_config,
        "LAYOUT": layout,
        "MAX_COST_USD": max_cost,
        "IMAGE": image,
    }
    proc, out, _ = run_script(step_by_id("run")["run"], env, tmp_path)
    argv = args_file.read_text().splitlines() if args_file.exists() else []
    return proc, out, argv


def option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_the_wait_ends_at_the_deadline_counted_from_the_first_step(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    proc, out, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=1000)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert argv[:7] == ["run", "--stack", "tiny", "--run-id", "gh-1-1", "--wait", "--poll"]
    assert 990 <= int(option(argv, "--timeout")) <= 1000
    assert out["gave-up"] == "false"


def test_a_late_start_still_requests_the_run(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=-500)
    assert option(argv, "--timeout") == "60"


def test_giving_up_at_the_deadline_is_the_steps_own_decision(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    proc, out, _ = wait(fake_pcp, tmp_path, exit_code=3, seconds_left=1000)
    assert proc.returncode == 0
    assert out["gave-up"] == "true"
    assert "::warning" in proc.stdout and "goes on" in proc.stdout


@pytest.mark.parametrize("code", [1, 2, 130])
def test_a_failed_or_interrupted_wait_is_not_giving_up(code: int, fake_pcp, tmp_path) -> None:  # noqa: ANN001
    proc, out, _ = wait(fake_pcp, tmp_path, exit_code=code, seconds_left=1000)
    assert proc.returncode == code
    assert out["gave-up"] == "false"


def test_inputs_stay_single_arguments(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    config = "--lr 0.1 $(touch pwned) 'quoted words'"
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100,
                      training_config=config, keep="true")
    assert option(argv, "--config") == config
    assert "--keep-vm-alive" in argv
    assert not (tmp_path / "pwned").exists()


def test_the_layout_input_becomes_the_layout_flag(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100, layout="workers-only")
    assert option(argv, "--layout") == "workers-only"
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100)
    assert "--layout" not in argv  # the stack's default


def test_the_max_cost_input_becomes_the_max_cost_flag(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100, max_cost="12.5")
    assert option(argv, "--max-cost") == "12.5"
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100, max_cost="1; touch pwned")
    assert option(argv, "--max-cost") == "1; touch pwned"  # one argument, never a shell's
    assert not (tmp_path / "pwned").exists()
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100)
    assert "--max-cost" not in argv  # the stack's default
def test_the_image_input_becomes_one_image_argument(fake_pcp, tmp_path) -> None:  # noqa: ANN001
    image = "us-docker.pkg.dev/p/pcp-tiny/trainer:v1 $(touch pwned)"
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100, image=image)
    assert option(argv, "--image") == image  # one argument; pcp run's parser refuses it
    assert not (tmp_path / "pwned").exists()
    _, _, argv = wait(fake_pcp, tmp_path, exit_code=0, seconds_left=100)
    assert "--image" not in argv  # the stack's default


def test_the_wait_is_backed_up_by_timeout() -> None:
    script = step_by_id("run")["run"]
    assert 'timeout --kill-after=30 "$((remaining + 120))" pcp "${args[@]}"' in script


# --------------------------------------------------------------------------- the time budget


def test_the_job_never_reaches_its_timeout() -> None:
    """A job timeout is a cancellation (cancelled() holds), which would stop the run. So: the
    wait ends by its deadline (plus its `timeout` backstop), every step has a limit, and what
    follows the wait fits, with room for the runner's set-up and post steps."""
    j = job()
    all_steps = j["steps"]
    for s in all_steps:
        assert isinstance(s.get("timeout-minutes"), int), s.get("name")
    budget = int(j["env"]["PCP_WAIT_BUDGET_MINUTES"])
    wait_index = all_steps.index(step_by_id("run"))
    before = sum(s["timeout-minutes"] for s in all_steps[:wait_index])
    after = sum(s["timeout-minutes"] for s in all_steps[wait_index + 1:])
    backstop = (120 + 30) / 60  # `timeout` past pcp's own --timeout, then KILL
    set_up_and_post_steps = 10
    assert before < budget, "the steps before the wait could use up its whole budget"
    assert budget + backstop + after + set_up_and_post_steps <= j["timeout-minutes"]
    assert j["timeout-minutes"] < 360  # GitHub-hosted jobs stop at 6 h regardless
    # The wait step's own limit is only a last resort: it must not fire before the deadline.
    assert all_steps[wait_index]["timeout-minutes"] >= budget + backstop


# --------------------------------------------------------------------------- pins and docs


def test_every_pin_is_the_one_docs_record() -> None:
    """docs/workflows.md records each action's version and commit (and how it was checked):
    the workflows use exactly those, so a pin cannot change without its record."""
    import re

    table = {}
    for m in re.finditer(r"^\| (\S+/\S+) \| (v[\d.]+) \| `([0-9a-f]{40})` \| (node\d+) \|",
                         DOCS.read_text(), re.M):
        table[m[1]] = (m[2], m[3], m[4])
    assert table, "no pin table in docs/workflows.md"
    used = set()
    for path in (ROOT / ".github" / "workflows").glob("*.yml"):
        for m in re.finditer(r"uses:\s*([\w.-]+/[\w.-]+)@([0-9a-f]{40})\s*#\s*(v[\d.]+)",
                             path.read_text()):
            action, sha, version = m[1], m[2], m[3]
            assert action in table, f"{action} is not in the docs' pin table"
            assert table[action][:2] == (version, sha), f"{path.name}: {action}"
            used.add(action)
    assert used == set(table), f"documented but unused: {set(table) - used}"
    for action, (_, _, runtime) in table.items():
        assert runtime == "node24", f"{action} runs on {runtime}"
