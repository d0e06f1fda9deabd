"""The stack's Cloud Billing budget: the last guard against runaway cost (docs/reliability.md).

Only with `pcp:billing_account` and `pcp:monthly_budget_usd`. The budget counts the project's
cost of the resources labelled `pcp-stack=<stack>` (the worker VMs and their disks) per calendar
month and publishes every update to `pcp-<stack>-budget`, whose function (`on_budget`) holds the
stack once the actual spend passes `pcp:budget_stop_threshold` of the amount. Cloud Billing
sends these updates several times a day and they lag real spend by hours: the cap per run and
the deadlines act first. Threshold rules only drive the billing account's alert emails; the
topic gets every update whatever they say.
"""

from __future__ import annotations

import math

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import LABEL_STACK, Names

from .base import PcpComponent
from .config import StackConfig
from .messaging import Messaging

#: What Cloud Billing sends to the topic (the only schema it accepts).
SCHEMA_VERSION = "1.0"
#: Alert emails at these fractions of the budget (besides the stop threshold).
EMAIL_THRESHOLDS: tuple[float, ...] = (0.5, 0.9)


def amount_args(usd: float) -> gcp.billing.BudgetAmountSpecifiedAmountArgs:
    """A dollar amount as the Budget API's Money: whole units (a string) and nanos."""
    units = math.floor(usd)
    nanos = round((usd - units) * 1e9)
    if nanos >= 1_000_000_000:
        units, nanos = units + 1, 0
    return gcp.billing.BudgetAmountSpecifiedAmountArgs(
        currency_code="USD", units=str(units), nanos=nanos)


class StackBudget(PcpComponent):
    TYPE = "pcp:infra:StackBudget"

    def __init__(self, name: str, cfg: StackConfig, messaging: Messaging, *,
                 depends_on: list[pulumi.Resource],
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        if not cfg.budget_enabled or cfg.monthly_budget_usd is None:
            raise ValueError("StackBudget needs pcp:billing_account and pcp:monthly_budget_usd")
        names = Names(cfg.stack, cfg.project)
        topic = messaging.topics["budget"]
        thresholds = sorted({*EMAIL_THRESHOLDS, cfg.budget_stop_threshold})
        self.budget = gcp.billing.Budget(
            f"{names.prefix}-budget",
            billing_account=cfg.billing_account,
            display_name=f"{names.prefix} monthly budget",
            amount=gcp.billing.BudgetAmountArgs(
                specified_amount=amount_args(cfg.monthly_budget_usd)),
            budget_filter=gcp.billing.BudgetBudgetFilterArgs(
                projects=[f"projects/{cfg.project}"],
                labels={LABEL_STACK: cfg.stack},
                calendar_period="MONTH",
                credit_types_treatment="INCLUDE_ALL_CREDITS",
            ),
            threshold_rules=[
                gcp.billing.BudgetThresholdRuleArgs(threshold_percent=t,
                                                    spend_basis="CURRENT_SPEND")
                for t in thresholds
            ],
            all_updates_rule=gcp.billing.BudgetAllUpdatesRuleArgs(
                pubsub_topic=topic.id,
                schema_version=SCHEMA_VERSION,
            ),
            opts=self.child_opts(topic),
        )
        #: The id notifications carry in their `budgetId` attribute: the last part of the
        #: budget's name, billingAccounts/<account>/budgets/<id>.
        self.budget_id: pulumi.Output[str] = self.budget.name.apply(
            lambda name: (name or "").rsplit("/", 1)[-1])
        self.register_outputs({"budget": self.budget.name})
