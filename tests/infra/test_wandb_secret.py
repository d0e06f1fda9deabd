"""The wandb API key's secret under the Pulumi mocks: created empty, readable by the nodes only."""

from __future__ import annotations

from tests.infra.conftest import StackRun

SECRET = "gcp:secretmanager/secret:Secret"
VERSION = "gcp:secretmanager/secretVersion:SecretVersion"
SECRET_IAM = ("gcp:secretmanager/secretIamMember:SecretIamMember",
              "gcp:secretmanager/secretIamBinding:SecretIamBinding",
              "gcp:secretmanager/secretIamPolicy:SecretIamPolicy")


def test_the_secret_exists_empty_and_only_the_nodes_may_read_it(any_run: StackRun) -> None:
    [secret] = any_run.of_type(SECRET)
    assert secret["inputs"]["secretId"] == f"{any_run.prefix}-wandb-api-key"
    assert "auto" in secret["inputs"]["replication"]
    assert any_run.of_type(VERSION) == []  # a person adds the key; Pulumi never sees it
    grants = [g for t in SECRET_IAM for g in any_run.of_type(t)]
    assert {(g["inputs"]["role"], g["inputs"]["member"]) for g in grants} == {
        ("roles/secretmanager.secretAccessor",
         f"serviceAccount:{any_run.prefix}-{role}@pcp-test-project.iam.gserviceaccount.com")
        for role in ("worker", "shepherd")}
    assert all(g["inputs"]["secretId"] == f"{any_run.prefix}-wandb-api-key" for g in grants)


def test_the_stack_defaults_reach_the_functions(mock_runs: dict[str, StackRun]) -> None:
    fn = "gcp:cloudfunctionsv2/function:Function"
    for run in mock_runs.values():
        for f in run.of_type(fn):
            env = f["inputs"]["serviceConfig"]["environmentVariables"]
            assert env["PCP_WANDB_PROJECT"] == run.config.get("pcp:wandb_project", "")
            assert env["PCP_WANDB_ENTITY"] == run.config.get("pcp:wandb_entity", "")
