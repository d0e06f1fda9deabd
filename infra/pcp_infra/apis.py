"""The Google APIs a stack needs, enabled with `gcp.projects.Service`.

`disable_on_destroy=False`: destroying one stack must never switch an API off under the others
(or under anything else in the project).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig

REQUIRED_APIS: tuple[str, ...] = (
    "cloudresourcemanager.googleapis.com",  # project IAM
    "iam.googleapis.com",  # service accounts, custom roles, workload identity pools
    "iamcredentials.googleapis.com",  # token minting for workload identity federation
    "sts.googleapis.com",  # security token service (GitHub OIDC exchange)
    "compute.googleapis.com",  # worker VMs, network, firewall
    "storage.googleapis.com",  # stack bucket
    "pubsub.googleapis.com",  # topics and subscriptions
    "cloudfunctions.googleapis.com",  # 2nd-gen functions
    "run.googleapis.com",  # 2nd-gen functions run on Cloud Run
    "cloudbuild.googleapis.com",  # function builds
    "artifactregistry.googleapis.com",  # function images
    "eventarc.googleapis.com",  # Pub/Sub triggers
    "cloudscheduler.googleapis.com",  # sweep ticks
    "logging.googleapis.com",  # function, build and worker logs; log-based metrics
    "monitoring.googleapis.com",  # alert policies, notification channels
    "secretmanager.googleapis.com",  # the wandb API key
)
#: Enabled only for a stack with a budget (pcp:billing_account, pcp:monthly_budget_usd).
BUDGET_APIS: tuple[str, ...] = ("billingbudgets.googleapis.com",)


class ProjectApis(PcpComponent):
    TYPE = "pcp:infra:ProjectApis"

    def __init__(
        self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__(name, opts=opts)
        names = Names(cfg.stack, cfg.project)
        self.services: dict[str, gcp.projects.Service] = {}
        for api in (*REQUIRED_APIS, *(BUDGET_APIS if cfg.budget_enabled else ())):
            short = api.split(".", 1)[0]
            self.services[api] = gcp.projects.Service(
                f"{names.prefix}-api-{short}",
                project=cfg.project,
                service=api,
                disable_on_destroy=False,
                disable_dependent_services=False,
                opts=self.child_opts(),
            )
        self.register_outputs({"services": list(self.services)})
