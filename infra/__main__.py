"""pcp: the Pulumi program of one stack (tiny, small, large or huge).

Reads the stack configuration and wires the components; every resource is defined in
`pcp_infra/`. Checked with Pulumi mocks only (tests/infra): no Pulumi CLI runs in this repo's CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

_INFRA_DIR = str(Path(__file__).resolve().parent)
if _INFRA_DIR not in sys.path:
    sys.path.insert(0, _INFRA_DIR)

import pulumi  # noqa: E402

from pcp_infra.apis import ProjectApis  # noqa: E402
from pcp_infra.budget import StackBudget  # noqa: E402
from pcp_infra.config import StackConfig  # noqa: E402
from pcp_infra.fleet import WorkerFleet  # noqa: E402
from pcp_infra.functions import ControlFunctions  # noqa: E402
from pcp_infra.identity import GithubFederation, ServiceAccounts, ServiceAgents  # noqa: E402
from pcp_infra.messaging import Messaging  # noqa: E402
from pcp_infra.monitoring import Alerts, LogMetrics, StackDashboard  # noqa: E402
from pcp_infra.network import WorkerNetwork  # noqa: E402
from pcp_infra.registry import ImageRepository  # noqa: E402
from pcp_infra.scheduler import SweepSchedule  # noqa: E402
from pcp_infra.secrets import WandbSecret  # noqa: E402
from pcp_infra.source import CodeArchives  # noqa: E402
from pcp_infra.storage import StateBucket  # noqa: E402

cfg = StackConfig.from_pulumi_config()

apis = ProjectApis("apis", cfg)
enabled = list(apis.services.values())

accounts = ServiceAccounts("identity", cfg, depends_on=enabled)
agents = ServiceAgents("agents", cfg, accounts, depends_on=enabled)
github = GithubFederation("github", cfg, accounts, depends_on=enabled)
bucket = StateBucket("storage", cfg, accounts, depends_on=enabled)
messaging = Messaging("messaging", cfg, accounts, agents, bucket, depends_on=enabled)
network = WorkerNetwork("network", cfg, depends_on=enabled)
images = ImageRepository("images", cfg, accounts, depends_on=enabled)
code = CodeArchives("code", cfg, bucket, depends_on=enabled)
fleet = WorkerFleet("fleet", cfg, accounts, bucket, network, depends_on=enabled)
budget = (StackBudget("budget", cfg, messaging, depends_on=enabled)
          if cfg.budget_enabled else None)
functions = ControlFunctions(
    "functions", cfg, accounts, agents, bucket, messaging, code, budget, depends_on=enabled
)
schedule = SweepSchedule("scheduler", cfg, messaging, depends_on=[*enabled, functions])
metrics = LogMetrics("monitoring", cfg, depends_on=enabled)
alerting = Alerts("alerts", cfg, metrics, depends_on=enabled)
board = StackDashboard("dashboard", cfg, metrics, depends_on=enabled)
wandb_key = WandbSecret("secrets", cfg, accounts, depends_on=enabled)

# The CLI and the workflows read these (`pulumi stack output --json`).
pulumi.export("stack", cfg.stack)
pulumi.export("project", cfg.project)
pulumi.export("region", cfg.region)
pulumi.export("zone", cfg.zone)
pulumi.export("worker_count", cfg.worker_count)
pulumi.export("prices", dict(cfg.prices or {}))  # `pcp cost` prices the standing cost with it
pulumi.export("vm_names", fleet.vm_names)
pulumi.export("bucket", bucket.name)
# Push training images here (docs/trainers.md); the nodes and the functions may read it.
pulumi.export("image_repository", images.url)
# The one address workers reach the shepherd from (None with pcp:external_ip true).
pulumi.export("worker_egress_ip", network.egress.address if network.egress else None)
pulumi.export("topics", messaging.topic_names)
pulumi.export("shepherd_subscription", messaging.shepherd_subscription.name)
pulumi.export("dead_letter_subscription", messaging.dead_letter_subscription.name)
pulumi.export("functions", functions.function_names)
pulumi.export("function_source_sha256", code.functions_sha256)
pulumi.export("function_source", code.functions_url)
pulumi.export("agent_archive", code.agent_url)
pulumi.export("agent_sha256", code.agent_sha256)
pulumi.export("scheduler_job", schedule.job.name)
pulumi.export("budget", budget.budget.name if budget is not None else None)
pulumi.export("log_metrics", metrics.metric_names)
pulumi.export("alert_policies", alerting.policy_names)
pulumi.export("dashboard", board.dashboard.id)
pulumi.export("wandb_secret", wandb_key.secret.secret_id)
pulumi.export("service_accounts", accounts.emails)
pulumi.export("workload_identity_provider", github.provider_name)
pulumi.export("dispatch_service_account", accounts.emails["dispatch"])
pulumi.export("deploy_service_account", accounts.emails["deploy"])
