"""Service accounts, custom roles, project-level grants and GitHub workload identity federation.

Grants on a single resource (bucket, topic, subscription, instance, function) live with that
resource's component; only what GCP cannot bind more narrowly is granted here at project level.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import TRAIN_WORKFLOW, Names

from .base import PcpComponent
from .config import StackConfig

#: Service accounts of a stack: role -> description.
ACCOUNTS: dict[str, str] = {
    "worker": "Worker VMs: read/write the stack bucket, write logs",
    "functions": "Cloud Functions runtime and Eventarc trigger identity",
    "shepherd": "Shepherd host (outside GCP, via a key): pull commands, read/write the bucket",
    "dispatch": "GitHub train workflow: publish start/stop, read the bucket",
    "deploy": "GitHub deploy workflow: runs `pulumi up` for this stack",
    "build": "Cloud Build identity that builds the functions' images",
}

#: Granted per worker instance (compute.InstanceIAMMember) to the functions SA.
FLEET_CONTROL_PERMISSIONS: tuple[str, ...] = (
    "compute.instances.get",
    "compute.instances.start",
    "compute.instances.stop",
    "compute.instances.setMetadata",
    "compute.instances.setLabels",
    "compute.instances.setScheduling",
)

#: Granted at project level to the functions SA: these permissions have no instance-level form.
FLEET_OBSERVE_PERMISSIONS: tuple[str, ...] = (
    "compute.instances.list",
    "compute.zoneOperations.get",
)

#: Project-level predefined roles per service account. Never owner/editor/viewer.
PROJECT_ROLES: dict[str, tuple[str, ...]] = {
    "functions": ("roles/eventarc.eventReceiver",),
    "worker": ("roles/logging.logWriter",),
    # `pcp doctor` (train workflow) checks that the sweep job is ENABLED; Cloud Scheduler has
    # no per-job IAM, so this read-only role is project-wide.
    "dispatch": ("roles/cloudscheduler.viewer",),
    "build": (
        "roles/cloudbuild.builds.builder",
        "roles/logging.logWriter",
        "roles/artifactregistry.writer",
    ),
    # Broad but not primitive: what `pulumi up` of this program needs. Note that
    # projectIamAdmin lets the holder grant itself more: protect the deploy workflow accordingly.
    "deploy": (
        "roles/compute.admin",
        "roles/storage.admin",
        "roles/pubsub.admin",
        "roles/cloudfunctions.admin",
        "roles/cloudscheduler.admin",
        "roles/iam.serviceAccountAdmin",
        "roles/iam.serviceAccountUser",
        "roles/iam.roleAdmin",
        "roles/iam.workloadIdentityPoolAdmin",
        "roles/resourcemanager.projectIamAdmin",
        "roles/serviceusage.serviceUsageAdmin",
        "roles/run.admin",
        "roles/eventarc.admin",
        "roles/logging.configWriter",  # log-based metrics
        "roles/monitoring.editor",  # alert policies, notification channels
        "roles/secretmanager.admin",  # the wandb key's secret and who may read it
    ),
}

GITHUB_ISSUER = "https://token.actions.githubusercontent.com"

#: Google-managed service agents created up front (gcp.projects.ServiceIdentity), so that the
#: first `pulumi up` does not race their lazy creation when the functions' triggers are made.
SERVICE_AGENTS: tuple[str, ...] = ("eventarc.googleapis.com", "pubsub.googleapis.com")

#: Project roles of the service agents. Eventarc's agent normally gets this role when the
#: first Eventarc resource is created; granting it here removes the race and restores it if
#: someone removed it.
SERVICE_AGENT_PROJECT_ROLES: dict[str, tuple[str, ...]] = {
    "eventarc.googleapis.com": ("roles/eventarc.serviceAgent",),
}

#: The Pub/Sub agent mints the OIDC tokens of Eventarc's push deliveries, which carry the
#: trigger identity (the `functions` SA). Projects whose agent predates 2021-04-08 lack this
#: role; it is granted on that one service account, not on the project.
PUBSUB_AGENT_TOKEN_ROLE = "roles/iam.serviceAccountTokenCreator"

#: Service accounts that GitHub Actions may impersonate through the pool.
FEDERATED_ACCOUNTS = ("deploy", "dispatch")


def _short(role: str) -> str:
    return role.rsplit("/", 1)[-1].replace(".", "-").replace("_", "-")


class ServiceAccounts(PcpComponent):
    TYPE = "pcp:infra:ServiceAccounts"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        prefix = names.prefix

        self.accounts: dict[str, gcp.serviceaccount.Account] = {
            role: gcp.serviceaccount.Account(
                f"{prefix}-sa-{role}",
                project=cfg.project,
                account_id=names.service_account_id(role),
                display_name=f"pcp {cfg.stack} {role}",
                description=description,
                opts=self.child_opts(),
            )
            for role, description in ACCOUNTS.items()
        }
        self.emails: dict[str, pulumi.Output[str]] = {
            role: account.email for role, account in self.accounts.items()
        }
        self.members: dict[str, pulumi.Output[str]] = {
            role: account.email.apply(lambda e: f"serviceAccount:{e}")
            for role, account in self.accounts.items()
        }
        #: `projects/P/serviceAccounts/EMAIL`, the form build_config.service_account takes.
        self.resource_names: dict[str, pulumi.Output[str]] = {
            role: pulumi.Output.concat("projects/", cfg.project, "/serviceAccounts/", email)
            for role, email in self.emails.items()
        }

        # Custom roles: the functions may drive this stack's VMs and nothing else.
        self.fleet_control_role = gcp.projects.IAMCustomRole(
            f"{prefix}-role-fleet-control",
            project=cfg.project,
            role_id=names.custom_role_id("fleet_control"),
            title=f"pcp {cfg.stack} fleet control",
            description="Start, stop, label and schedule one pcp worker VM (bound per instance)",
            permissions=list(FLEET_CONTROL_PERMISSIONS),
            stage="GA",
            opts=self.child_opts(),
        )
        self.fleet_observe_role = gcp.projects.IAMCustomRole(
            f"{prefix}-role-fleet-observe",
            project=cfg.project,
            role_id=names.custom_role_id("fleet_observe"),
            title=f"pcp {cfg.stack} fleet observe",
            description="List VMs and poll zone operations (no instance-level form exists)",
            permissions=list(FLEET_OBSERVE_PERMISSIONS),
            stage="GA",
            opts=self.child_opts(),
        )

        self.project_grants: list[gcp.projects.IAMMember] = []
        for role_of, roles in PROJECT_ROLES.items():
            for role in roles:
                self.project_grants.append(
                    gcp.projects.IAMMember(
                        f"{prefix}-{role_of}-{_short(role)}",
                        project=cfg.project,
                        role=role,
                        member=self.members[role_of],
                        opts=self.child_opts(),
                    )
                )
        self.project_grants.append(
            gcp.projects.IAMMember(
                f"{prefix}-functions-fleet-observe",
                project=cfg.project,
                role=self.fleet_observe_role.name,
                member=self.members["functions"],
                opts=self.child_opts(),
            )
        )

        # Starting a VM that runs as the worker SA requires actAs on that SA.
        self.functions_act_as_worker = gcp.serviceaccount.IAMMember(
            f"{prefix}-functions-actas-worker",
            service_account_id=self.accounts["worker"].name,
            role="roles/iam.serviceAccountUser",
            member=self.members["functions"],
            opts=self.child_opts(),
        )

        self.register_outputs(
            {
                "emails": self.emails,
                "fleet_control_role": self.fleet_control_role.name,
                "fleet_observe_role": self.fleet_observe_role.name,
            }
        )

    def grants_for_functions(self) -> list[pulumi.Resource]:
        """What a function's deployment must wait for (trigger identity, build identity)."""
        return [*self.project_grants, self.functions_act_as_worker]


class ServiceAgents(PcpComponent):
    """The Eventarc and Pub/Sub service agents, created and granted before any trigger."""

    TYPE = "pcp:infra:ServiceAgents"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        prefix = Names(cfg.stack, cfg.project).prefix

        self.identities: dict[str, gcp.projects.ServiceIdentity] = {
            api: gcp.projects.ServiceIdentity(
                f"{prefix}-agent-{api.split('.', 1)[0]}",
                project=cfg.project,
                service=api,
                opts=self.child_opts(),
            )
            for api in SERVICE_AGENTS
        }
        self.members: dict[str, pulumi.Output[str]] = {
            api: identity.member for api, identity in self.identities.items()
        }
        self.grants: list[pulumi.Resource] = []
        for api, roles in SERVICE_AGENT_PROJECT_ROLES.items():
            for role in roles:
                self.grants.append(
                    gcp.projects.IAMMember(
                        f"{prefix}-agent-{api.split('.', 1)[0]}-{_short(role)}",
                        project=cfg.project,
                        role=role,
                        member=self.members[api],
                        # The same binding serves every stack of the project: destroying one
                        # stack must not take it from the others' triggers.
                        opts=self.child_opts(self.identities[api], retain_on_delete=True),
                    )
                )
        self.grants.append(
            gcp.serviceaccount.IAMMember(
                f"{prefix}-agent-pubsub-token-creator",
                service_account_id=accounts.accounts["functions"].name,
                role=PUBSUB_AGENT_TOKEN_ROLE,
                member=self.members["pubsub.googleapis.com"],
                opts=self.child_opts(self.identities["pubsub.googleapis.com"]),
            )
        )
        self.pubsub_member = self.members["pubsub.googleapis.com"]
        self.register_outputs({"agents": self.members})

    def ready(self) -> list[pulumi.Resource]:
        """What a trigger (or a grant to an agent) must wait for."""
        return [*self.identities.values(), *self.grants]


def github_attribute_condition(repository: str, environment: str) -> str:
    """The provider's condition: only the train workflow of `repository`, in `environment`.

    GitHub's OIDC token names the job's environment (`environment`) and the workflow file at
    the ref it ran from (`workflow_ref`, `OWNER/REPO/.github/workflows/train.yml@refs/...`).
    The environment is where the protection lives (required reviewers, deployment branches),
    so a token from another workflow of the same repository, or from a job outside the
    environment, is refused. Both values were validated by StackConfig; quotes cannot occur.
    """
    for value in (repository, environment):
        if '"' in value or "\\" in value:
            raise ValueError(f"{value!r} cannot be quoted in a CEL condition")
    return (
        f'assertion.repository == "{repository}"'
        f' && assertion.environment == "{environment}"'
        f' && assertion.workflow_ref.startsWith("{repository}/{TRAIN_WORKFLOW}@")'
    )


class GithubFederation(PcpComponent):
    """Workload identity pool + GitHub OIDC provider, restricted to one repository's train
    workflow running in the stack's GitHub environment."""

    TYPE = "pcp:infra:GithubFederation"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        prefix = names.prefix
        repo = cfg.github_repository

        self.pool = gcp.iam.WorkloadIdentityPool(
            f"{prefix}-github-pool",
            project=cfg.project,
            workload_identity_pool_id=names.workload_identity_pool,
            display_name=f"pcp {cfg.stack} GitHub",
            description=f"GitHub Actions of {repo} for the pcp {cfg.stack} stack",
            opts=self.child_opts(),
        )
        self.provider = gcp.iam.WorkloadIdentityPoolProvider(
            f"{prefix}-github-provider",
            project=cfg.project,
            workload_identity_pool_id=self.pool.workload_identity_pool_id,
            workload_identity_pool_provider_id="github",
            display_name="GitHub Actions",
            attribute_mapping={
                "google.subject": "assertion.sub",
                "attribute.repository": "assertion.repository",
                "attribute.repository_owner": "assertion.repository_owner",
                "attribute.actor": "assertion.actor",
                "attribute.ref": "assertion.ref",
                "attribute.workflow_ref": "assertion.workflow_ref",
                "attribute.environment": "assertion.environment",
            },
            attribute_condition=github_attribute_condition(repo, names.github_environment),
            oidc=gcp.iam.WorkloadIdentityPoolProviderOidcArgs(issuer_uri=GITHUB_ISSUER),
            opts=self.child_opts(),
        )
        principal_set = self.pool.name.apply(
            lambda pool: f"principalSet://iam.googleapis.com/{pool}/attribute.repository/{repo}"
        )
        self.bindings = [
            gcp.serviceaccount.IAMMember(
                f"{prefix}-{role}-wif-user",
                service_account_id=accounts.accounts[role].name,
                role="roles/iam.workloadIdentityUser",
                member=principal_set,
                opts=self.child_opts(),
            )
            for role in FEDERATED_ACCOUNTS
        ]
        self.provider_name = self.provider.name
        self.register_outputs({"workload_identity_provider": self.provider.name})
