"""The four Cloud Functions (2nd gen), each triggered by one Pub/Sub topic.

Source: CodeArchives (`functions/` at the root plus the `pcp/` package), whose object name
carries the content hash, so that every code change is redeployed and an unchanged tree is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import LABEL_FUNCTION, POLICY_DOC, Names

from .base import PcpComponent
from .budget import StackBudget
from .config import StackConfig
from .identity import ServiceAccounts, ServiceAgents
from .messaging import Messaging
from .source import CodeArchives
from .storage import StateBucket

RUNTIME = "python311"
PUBSUB_EVENT = "google.cloud.pubsub.topic.v1.messagePublished"
RETRY_POLICY = "RETRY_POLICY_RETRY"
MEMORY = "512M"
MAX_INSTANCES = 10

#: The longest an event-driven function may run (2nd gen, Pub/Sub trigger). Every function
#: here may stop VMs (on_start rolls back a failed start, on_stop and on_marker end runs,
#: on_sweep stops orphans), and one GCE stop alone may take 120 s of guest soft-off before
#: the operation is done, plus the API calls around it.
EVENT_MAX_TIMEOUT_SECONDS = 540


@dataclass(frozen=True)
class FunctionSpec:
    kind: str  # pcp-<stack>-<kind>
    entry_point: str  # function in functions/main.py
    topic: str  # topic kind that triggers it
    timeout_seconds: int


#: Each function gets the event-driven maximum: all of them may wait on a VM stop.
FUNCTIONS: tuple[FunctionSpec, ...] = (
    FunctionSpec("start", "on_start", "start", EVENT_MAX_TIMEOUT_SECONDS),
    FunctionSpec("stop", "on_stop", "stop", EVENT_MAX_TIMEOUT_SECONDS),
    FunctionSpec("marker", "on_marker", "markers", EVENT_MAX_TIMEOUT_SECONDS),
    FunctionSpec("sweep", "on_sweep", "sweep", EVENT_MAX_TIMEOUT_SECONDS),
)
#: Only for a stack with a budget: the kill switch (it stops every VM, so the same maximum).
BUDGET_FUNCTIONS: tuple[FunctionSpec, ...] = (
    FunctionSpec("budget", "on_budget", "budget", EVENT_MAX_TIMEOUT_SECONDS),
)


class ControlFunctions(PcpComponent):
    TYPE = "pcp:infra:ControlFunctions"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        agents: ServiceAgents,
        bucket: StateBucket,
        messaging: Messaging,
        code: CodeArchives,
        budget: StackBudget | None = None,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)

        # The triggers are made with the functions: the Eventarc and Pub/Sub agents must
        # exist, and hold their roles, before that (the first `up` races them otherwise).
        ready = [
            *accounts.grants_for_functions(),
            *agents.ready(),
            *bucket.grants,
            *messaging.grants,
        ]

        self.functions: dict[str, gcp.cloudfunctionsv2.Function] = {}
        self.invokers: list[gcp.cloudrunv2.ServiceIamMember] = []
        specs = (*FUNCTIONS, *(BUDGET_FUNCTIONS if budget is not None else ()))
        for spec in specs:
            function_name = names.function(spec.kind)
            environment: pulumi.Input[dict[str, str]] = cfg.function_environment(
                names.bucket, timeout_seconds=spec.timeout_seconds)
            if budget is not None:  # every function knows the budget (one Settings)
                environment = budget.budget_id.apply(
                    lambda budget_id, timeout=spec.timeout_seconds: cfg.function_environment(
                        names.bucket, timeout_seconds=timeout, budget_id=budget_id))
            function = gcp.cloudfunctionsv2.Function(
                function_name,
                project=cfg.project,
                name=function_name,
                location=cfg.region,
                description=f"pcp {cfg.stack}: {spec.entry_point} on pcp-{cfg.stack}-{spec.topic}",
                labels=names.labels(**{LABEL_FUNCTION: spec.kind}),
                build_config=gcp.cloudfunctionsv2.FunctionBuildConfigArgs(
                    runtime=RUNTIME,
                    entry_point=spec.entry_point,
                    service_account=accounts.resource_names["build"],
                    source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceArgs(
                        storage_source=gcp.cloudfunctionsv2.FunctionBuildConfigSourceStorageSourceArgs(
                            bucket=bucket.bucket.name,
                            object=code.functions_source.name,
                        )
                    ),
                ),
                service_config=gcp.cloudfunctionsv2.FunctionServiceConfigArgs(
                    service_account_email=accounts.emails["functions"],
                    # The function's own timeout rides along: pcp budgets its waits by it.
                    environment_variables=environment,
                    timeout_seconds=spec.timeout_seconds,
                    available_memory=MEMORY,
                    min_instance_count=0,
                    max_instance_count=MAX_INSTANCES,
                    # Eventarc/Pub/Sub deliveries count as internal traffic.
                    ingress_settings="ALLOW_INTERNAL_ONLY",
                    all_traffic_on_latest_revision=True,
                ),
                event_trigger=gcp.cloudfunctionsv2.FunctionEventTriggerArgs(
                    event_type=PUBSUB_EVENT,
                    pubsub_topic=messaging.topics[spec.topic].id,
                    retry_policy=RETRY_POLICY,
                    service_account_email=accounts.emails["functions"],
                    trigger_region=cfg.region,
                ),
                opts=self.child_opts(*ready),
            )
            self.functions[spec.kind] = function
            # The trigger identity must be allowed to invoke the function's Cloud Run service
            # (same name as the function).
            self.invokers.append(
                gcp.cloudrunv2.ServiceIamMember(
                    f"{function_name}-invoker",
                    project=cfg.project,
                    location=cfg.region,
                    name=function.name,
                    role="roles/run.invoker",
                    member=accounts.members["functions"],
                    opts=self.child_opts(),
                )
            )

        # What `pcp run` reads to show a run's deadline before it publishes (the same Policy
        # the functions' environment carries).
        self.policy_doc = gcp.storage.BucketObject(
            f"{names.prefix}-policy-doc",
            bucket=bucket.bucket.name,
            name=POLICY_DOC,
            content=cfg.policy().to_doc().decode(),
            content_type="application/json",
            opts=self.child_opts(),
        )

        self.function_names: dict[str, pulumi.Output[str]] = {
            kind: fn.name for kind, fn in self.functions.items()
        }
        self.register_outputs(
            {"functions": self.function_names, "source_sha256": code.functions_sha256}
        )
