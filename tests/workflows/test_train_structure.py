"""The shape of the workflows: inputs, environment, concurrency, permissions, pinning, the
cancel path, and no expression interpolated into a shell script.

YAML 1.1 (pyyaml) reads the key `on` as the boolean True; `trigger()` looks under both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.workflows

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / ".github" / "workflows" / "train.yml"
CI = ROOT / ".github" / "workflows" / "ci.yml"
WORKFLOWS = (TRAIN, CI)
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)\s*(#.*)?$")
EXPRESSION = re.compile(r"\$\{\{(.*?)\}\}", re.S)


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def trigger(doc: dict[Any, Any]) -> dict[str, Any]:
    return doc.get("on", doc.get(True))  # type: ignore[no-any-return]


def steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


def step(doc: dict[str, Any], needle: str) -> dict[str, Any]:
    found = [s for s in steps(doc) if needle in s.get("run", "") or needle in s.get("uses", "")]
    assert len(found) == 1, f"expected one step with {needle!r}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def train() -> dict[str, Any]:
    return load(TRAIN)


def test_dispatch_inputs(train) -> None:
    inputs = trigger(train)["workflow_dispatch"]["inputs"]
    assert set(inputs) == {"stack", "keep_vm_alive", "training_config", "layout",
                           "max_cost_usd", "image"}
    assert len(inputs) <= 10  # GitHub's limit on workflow_dispatch inputs
    assert inputs["image"]["type"] == "string" and inputs["image"]["default"] == ""
    assert inputs["layout"]["options"] == ["stack-default", "all-nodes", "workers-only"]
    assert inputs["stack"]["type"] == "choice"
    assert inputs["stack"]["options"] == ["tiny", "small", "large", "huge"]
    assert inputs["stack"]["default"] == "tiny"
    assert inputs["keep_vm_alive"]["type"] == "boolean"
    assert inputs["keep_vm_alive"]["default"] is False
    assert inputs["training_config"]["type"] == "string"
    assert inputs["training_config"]["default"] == ""


def test_tag_trigger(train) -> None:
    assert trigger(train)["push"] == {"tags": ["train/*"]}


def test_environment_per_stack(train) -> None:
    """One GitHub environment per stack, named as the stack's identity provider expects."""
    from pcp.core.names import GITHUB_ENVIRONMENT_PREFIX, Names

    [job] = train["jobs"].values()
    env = job["environment"]
    name = env if isinstance(env, str) else env["name"]
    assert name == GITHUB_ENVIRONMENT_PREFIX + "${{ inputs.stack || 'tiny' }}"
    for stack in ("tiny", "small", "large", "huge"):
        assert Names(stack).github_environment == name.replace(
            "${{ inputs.stack || 'tiny' }}", stack)


def test_the_identity_provider_names_this_workflow() -> None:
    from pcp.core.names import TRAIN_WORKFLOW

    assert (ROOT / TRAIN_WORKFLOW).resolve() == TRAIN.resolve()


def test_concurrency_per_stack_never_cancels(train) -> None:
    concurrency = train["concurrency"]
    assert "inputs.stack" in concurrency["group"]
    assert concurrency["cancel-in-progress"] is False
    assert concurrency["queue"] == "max"
    for job in train["jobs"].values():
        assert "concurrency" not in job  # a second group of the same name could deadlock


def test_permissions_exactly(train) -> None:
    assert train["permissions"] == {"contents": "read", "id-token": "write"}
    for job in train["jobs"].values():
        assert "permissions" not in job


def test_ci_permissions_read_only() -> None:
    assert load(CI)["permissions"] == {"contents": "read"}


def test_inputs_reach_scripts_only_through_env(train) -> None:
    [job] = train["jobs"].values()
    env = job["env"]
    assert "inputs.stack" in env["STACK"]
    assert "inputs.keep_vm_alive" in env["KEEP_VM_ALIVE"]
    assert env["TRAINING_CONFIG"] == "${{ inputs.training_config }}"
    assert "github.run_id" in env["RUN_ID"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_expression_inside_any_run_script(path: Path) -> None:
    """Not `${{ inputs.* }}`, not `${{ github.event.* }}`, not anything: a value spliced into
    a script is code. Scripts read "$STACK" and friends from `env:`."""
    for s in steps(load(path)):
        script = s.get("run", "")
        found = EXPRESSION.findall(script)
        assert not found, f"step {s.get('name')!r} interpolates {found} into its script"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_pinned_to_a_commit_with_its_version(path: Path) -> None:
    lines = [m for line in path.read_text().splitlines() if (m := USES_LINE.match(line))]
    assert lines, "no actions found"
    for m in lines:
        ref, comment = m.group(1), m.group(2) or ""
        assert PINNED.match(ref), f"{ref} is not pinned to a full commit SHA"
        assert re.match(r"#\s*v\d+(\.\d+)*$", comment), f"{ref} lacks a version comment"
    assert len(lines) == sum(1 for s in steps(load(path)) if "uses" in s)


def test_auth_by_wif_with_key_fallback(train) -> None:
    auth = [s for s in steps(train) if s.get("uses", "").startswith("google-github-actions/auth@")]
    wif = [s for s in auth if "workload_identity_provider" in s["with"]]
    key = [s for s in auth if "credentials_json" in s["with"]]
    assert len(key) == 1 and len(wif) >= 1
    assert key[0]["if"] == "vars.GCP_WORKLOAD_IDENTITY_PROVIDER == ''"
    assert key[0]["with"]["credentials_json"] == "${{ secrets.GCP_CREDENTIALS }}"
    for s in wif:
        assert s["if"].startswith("vars.GCP_WORKLOAD_IDENTITY_PROVIDER != ''")
    assert wif[0]["with"]["service_account"] == "${{ vars.GCP_DEPLOY_SERVICE_ACCOUNT }}"
    assert any(s["with"]["service_account"] == "${{ vars.GCP_DISPATCH_SERVICE_ACCOUNT }}"
               for s in wif)
    # Checkout before auth, or later steps cannot read the credentials file.
    order = [s.get("uses", "") for s in steps(train)]
    first_auth = next(i for i, u in enumerate(order) if u.startswith("google-github-actions/auth"))
    assert any(u.startswith("actions/checkout@") for u in order[:first_auth])


def test_deploy_then_outputs_then_run(train) -> None:
    names = [s.get("uses", "") + s.get("run", "") for s in steps(train)]
    pulumi = step(train, "pulumi/actions@")
    assert pulumi["with"]["command"] == "up" and pulumi["with"]["work-dir"] == "infra"
    assert pulumi["with"]["stack-name"] == "${{ steps.preflight.outputs.stack-name }}"
    # What the checkout's Pulumi.<stack>.yaml lacks comes from the repository settings.
    assert pulumi["with"]["config-map"] == "${{ steps.preflight.outputs.config-map }}"
    # Pulumi Cloud by default; a self-managed backend when the variable names one.
    assert pulumi["with"]["cloud-url"] == "${{ vars.PULUMI_BACKEND_URL }}"
    [job] = train["jobs"].values()
    assert job["env"]["PULUMI_ACCESS_TOKEN"] == "${{ secrets.PULUMI_ACCESS_TOKEN }}"
    assert job["env"]["PCP_OUTPUTS"].endswith("outputs.json")
    outputs = step(train, "pulumi stack output --json")
    run = step(train, "pcp \"${args[@]}\"")
    assert names.index(pulumi["uses"]) < names.index(outputs["run"]) < names.index(run["run"])
    assert run["id"] == "run"
    for flag in ('--stack "$STACK"', '--run-id "$RUN_ID"', "--wait", "--keep-vm-alive",
                 '--config "$TRAINING_CONFIG"'):
        assert flag in run["run"]


def test_results_summary_and_artifact(train) -> None:
    results = step(train, 'pcp results "$RUN_ID"')
    assert '"$RUN_ID"' in results["run"] and "--dest" in results["run"]
    summary = step(train, "$GITHUB_STEP_SUMMARY")
    assert "pcp status" in summary["run"] and "--format markdown" in summary["run"]
    upload = step(train, "actions/upload-artifact@")
    assert upload["with"]["path"] == "results/"
    assert "steps.results.outcome" in upload["if"]


def test_cancelling_the_workflow_stops_the_run(train) -> None:
    cancel = [s for s in steps(train) if "cancelled()" in str(s.get("if", ""))]
    assert len(cancel) == 1
    # Not when the wait gave up on its own deadline: that run is meant to go on.
    assert cancel[0]["if"] == "cancelled() && steps.run.outputs.gave-up != 'true'"
    script = cancel[0]["run"]
    assert 'pcp stop "$RUN_ID"' in script and '--reason "workflow cancelled"' in script
    assert steps(train)[-1] is cancel[0]  # after everything else, so it runs last


def test_a_run_that_outlives_the_job_fails_the_job_after_its_results(train) -> None:  # noqa: ANN001
    all_steps = steps(train)
    [fail] = [s for s in all_steps if s.get("if") == "steps.run.outputs.gave-up == 'true'"]
    assert "exit 1" in fail["run"]
    upload = step(train, "actions/upload-artifact@")
    assert all_steps.index(upload) < all_steps.index(fail) < len(all_steps) - 1


def test_ci_runs_make_test_with_emulators_required() -> None:
    ci = load(CI)
    on = trigger(ci)
    assert "push" in on and "pull_request" in on
    [job] = ci["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    assert job["env"]["PCP_REQUIRE_EMULATORS"] == "1"
    assert step(ci, "make test")
    gcloud = step(ci, "google-github-actions/setup-gcloud@")
    assert "pubsub-emulator" in gcloud["with"]["install_components"]
