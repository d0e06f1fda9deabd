"""The budget kill switch in the Pulumi program (under mocks): a Cloud Billing budget filtered to
the stack's labelled resources, publishing every update (schema 1.0) to pcp-S-budget, whose
function on_budget knows the budget's id; and none of it without pcp:billing_account."""

from __future__ import annotations

import pytest

from pcp_infra.budget import amount_args
from pcp_infra.config import ConfigError, StackConfig
from tests.infra.conftest import StackRun

pytestmark = pytest.mark.infra

BUDGET = "gcp:billing/budget:Budget"
TOPIC = "gcp:pubsub/topic:Topic"
FUNCTION = "gcp:cloudfunctionsv2/function:Function"


def test_a_stack_with_a_budget_gets_the_budget_its_topic_and_its_function(
        mock_runs: dict[str, StackRun]) -> None:
    run = mock_runs["small-budget"]
    [budget] = run.of_type(BUDGET)
    inputs = budget["inputs"]
    assert inputs["billingAccount"] == "01D4EE-079462-DFD6EC"
    assert inputs["amount"]["specifiedAmount"] == {"currencyCode": "USD", "units": "250",
                                                   "nanos": 500000000.0}
    rule = inputs["allUpdatesRule"]
    assert rule["pubsubTopic"] == "projects/pcp-test-project/topics/pcp-small-budget"
    assert rule["schemaVersion"] == "1.0"
    assert inputs["budgetFilter"]["labels"] == {"pcp-stack": "small"}
    assert inputs["budgetFilter"]["projects"] == ["projects/pcp-test-project"]
    assert [t["thresholdPercent"] for t in inputs["thresholdRules"]] == [0.5, 0.9]
    assert [t["inputs"]["name"] for t in run.of_type(TOPIC)
            if t["inputs"]["name"].endswith("-budget")] == ["pcp-small-budget"]
    fn = run.one(FUNCTION, "pcp-small-budget")["inputs"]
    assert fn["buildConfig"]["entryPoint"] == "on_budget"
    assert fn["eventTrigger"]["pubsubTopic"] == rule["pubsubTopic"]
    env = fn["serviceConfig"]["environmentVariables"]
    assert env["PCP_BUDGET_ID"].startswith("b") and env["PCP_BILLING_ACCOUNT"] == (
        "01D4EE-079462-DFD6EC")
    assert env["PCP_BUDGET_STOP_THRESHOLD"] == "0.9" and env["PCP_MAX_COST_USD"] == "40"
    # Every function reads the same settings (one Settings.to_env).
    start = run.one(FUNCTION, "pcp-small-start")["inputs"]["serviceConfig"]
    assert start["environmentVariables"]["PCP_BUDGET_ID"] == env["PCP_BUDGET_ID"]


def test_a_stack_without_a_budget_has_none_of_it(stack_run: StackRun) -> None:
    assert stack_run.of_type(BUDGET) == []
    names = [t["inputs"]["name"] for t in stack_run.of_type(TOPIC)]
    assert f"pcp-{stack_run.stack}-budget" not in names
    assert all(f["inputs"]["buildConfig"]["entryPoint"] != "on_budget"
               for f in stack_run.of_type(FUNCTION))


BASE = {"shepherd_host": "mac.example.org", "github_repository": "org/repo"}


@pytest.mark.parametrize(("values", "match"), [
    ({"billing_account": "01D4EE-079462-DFD6EC"}, "go together"),
    ({"monthly_budget_usd": "100"}, "go together"),
    ({"billing_account": "nope", "monthly_budget_usd": "100"}, "billing_account"),
    ({"billing_account": "01D4EE-079462-DFD6EC", "monthly_budget_usd": "-3"}, "positive"),
    ({"max_cost_usd": "nan"}, "positive"),
    ({"max_cost_usd": "5", "worker_hourly_usd": "0"}, "needs pcp:worker_hourly_usd"),
    ({"budget_stop_threshold": "90"}, "fraction"),
])
def test_budget_and_cap_settings_are_checked(values: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        StackConfig.from_mapping(stack="tiny", project="pcp-test-project",
                                 values={**BASE, **values})


def test_dollar_amounts_become_units_and_nanos() -> None:
    a = amount_args(19.99)
    assert (a.units, a.nanos) == ("19", 990000000)  # type: ignore[attr-defined]
    assert (amount_args(5.0).units, amount_args(5.0).nanos) == ("5", 0)  # type: ignore[attr-defined]


def test_every_stack_publishes_its_limits_for_pcp_run(any_run: StackRun) -> None:
    import json

    from pcp.core.policy import Policy

    [doc] = [o for o in any_run.of_type("gcp:storage/bucketObject:BucketObject")
             if o["inputs"]["name"] == "control/policy.json"]
    policy = Policy.from_doc(doc["inputs"]["content"].encode())
    assert policy.stack == any_run.stack and policy.worker_count == any_run.expected_workers
    assert policy.worker_hourly_usd == float(any_run.config["pcp:worker_hourly_usd"])
    expected = any_run.config.get("pcp:max_cost_usd") or None
    assert policy.max_cost_usd == (None if expected is None else float(expected))
    assert json.loads(doc["inputs"]["content"])["stack"] == any_run.stack
