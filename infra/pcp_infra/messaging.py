"""Pub/Sub topics, the shepherd's pull subscription, dead-lettering, and the markers notification.

Events (docs/architecture.md): start/stop requests, sweep ticks, shepherd commands, and GCS
notifications for objects under `markers/` (and only there: checkpoints and logs must not
invoke functions).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import ATTR_STACK, Names

from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts, ServiceAgents
from .storage import StateBucket

#: Topic kinds; each becomes `pcp-<stack>-<kind>`.
TOPIC_KINDS: tuple[str, ...] = ("start", "stop", "sweep", "shepherd", "markers", "dead-letter")

#: Only with a budget: Cloud Billing publishes its notifications here, on_budget reads them.
BUDGET_TOPIC_KINDS: tuple[str, ...] = ("budget",)

#: Who may publish where: service account role -> topic kinds.
PUBLISHERS: dict[str, tuple[str, ...]] = {
    "functions": ("shepherd", "stop"),
    "dispatch": ("start", "stop"),
}

#: Who may read topic metadata (`pcp doctor`, run by the train workflow as `dispatch`, checks
#: that these topics exist; pubsub.publisher does not include pubsub.topics.get).
TOPIC_VIEWERS: dict[str, tuple[str, ...]] = {
    "dispatch": ("start", "stop", "sweep", "shepherd"),
}

#: The one prefix whose new objects raise events.
MARKERS_PREFIX = "markers/"

SHEPHERD_ACK_DEADLINE_SECONDS = 60
SHEPHERD_MAX_DELIVERY_ATTEMPTS = 10
RETAIN_SECONDS = 7 * 24 * 3600


class Messaging(PcpComponent):
    TYPE = "pcp:infra:Messaging"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        accounts: ServiceAccounts,
        agents: ServiceAgents,
        bucket: StateBucket,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)
        prefix = names.prefix

        self.topics: dict[str, gcp.pubsub.Topic] = {
            kind: gcp.pubsub.Topic(
                f"{prefix}-topic-{kind}",
                project=cfg.project,
                name=names.topic(kind),
                labels=names.labels(),
                opts=self.child_opts(),
            )
            for kind in (*TOPIC_KINDS, *(BUDGET_TOPIC_KINDS if cfg.budget_enabled else ()))
        }
        dead_letter = self.topics["dead-letter"]

        # Messages that could not be delivered are kept here for inspection (a topic without
        # a subscription drops what is published to it).
        self.dead_letter_subscription = gcp.pubsub.Subscription(
            f"{prefix}-sub-dead-letter",
            project=cfg.project,
            name=names.dead_letter_subscription,
            topic=dead_letter.id,
            ack_deadline_seconds=60,
            message_retention_duration=f"{RETAIN_SECONDS}s",
            expiration_policy=gcp.pubsub.SubscriptionExpirationPolicyArgs(ttl=""),
            labels=names.labels(),
            opts=self.child_opts(),
        )

        # The shepherd host (outside GCP) pulls its commands here.
        self.shepherd_subscription = gcp.pubsub.Subscription(
            f"{prefix}-sub-shepherd-host",
            project=cfg.project,
            name=names.shepherd_subscription,
            topic=self.topics["shepherd"].id,
            ack_deadline_seconds=SHEPHERD_ACK_DEADLINE_SECONDS,
            message_retention_duration=f"{RETAIN_SECONDS}s",
            expiration_policy=gcp.pubsub.SubscriptionExpirationPolicyArgs(ttl=""),
            retry_policy=gcp.pubsub.SubscriptionRetryPolicyArgs(
                minimum_backoff="10s", maximum_backoff="600s"
            ),
            dead_letter_policy=gcp.pubsub.SubscriptionDeadLetterPolicyArgs(
                dead_letter_topic=dead_letter.id,
                max_delivery_attempts=SHEPHERD_MAX_DELIVERY_ATTEMPTS,
            ),
            labels=names.labels(),
            opts=self.child_opts(),
        )

        # Dead-lettering is done by the Pub/Sub service agent: it must publish to the
        # dead-letter topic and acknowledge on the source subscription. The agent is created
        # up front (ServiceAgents), so these grants never name an account that does not exist.
        pubsub_agent = agents.pubsub_member
        agent_ready = agents.identities["pubsub.googleapis.com"]
        self.grants: list[pulumi.Resource] = [
            gcp.pubsub.TopicIAMMember(
                f"{prefix}-dead-letter-pubsub-agent-publisher",
                project=cfg.project,
                topic=dead_letter.name,
                role="roles/pubsub.publisher",
                member=pubsub_agent,
                opts=self.child_opts(agent_ready),
            ),
            gcp.pubsub.SubscriptionIAMMember(
                f"{prefix}-shepherd-host-pubsub-agent-subscriber",
                project=cfg.project,
                subscription=self.shepherd_subscription.name,
                role="roles/pubsub.subscriber",
                member=pubsub_agent,
                opts=self.child_opts(agent_ready),
            ),
            gcp.pubsub.SubscriptionIAMMember(
                f"{prefix}-shepherd-host-shepherd-subscriber",
                project=cfg.project,
                subscription=self.shepherd_subscription.name,
                role="roles/pubsub.subscriber",
                member=accounts.members["shepherd"],
                opts=self.child_opts(),
            ),
        ]
        for account, kinds in PUBLISHERS.items():
            for kind in kinds:
                self.grants.append(
                    gcp.pubsub.TopicIAMMember(
                        f"{prefix}-{kind}-{account}-publisher",
                        project=cfg.project,
                        topic=self.topics[kind].name,
                        role="roles/pubsub.publisher",
                        member=accounts.members[account],
                        opts=self.child_opts(),
                    )
                )

        for account, kinds in TOPIC_VIEWERS.items():
            for kind in kinds:
                self.grants.append(
                    gcp.pubsub.TopicIAMMember(
                        f"{prefix}-{kind}-{account}-viewer",
                        project=cfg.project,
                        topic=self.topics[kind].name,
                        role="roles/pubsub.viewer",
                        member=accounts.members[account],
                        opts=self.child_opts(),
                    )
                )

        # GCS -> markers topic. The project's GCS service agent publishes the notifications;
        # the grant must exist before the notification is created.
        gcs_agent = gcp.storage.get_project_service_account_output(
            project=cfg.project, opts=pulumi.InvokeOutputOptions(depends_on=depends_on)
        )
        self.gcs_publisher = gcp.pubsub.TopicIAMMember(
            f"{prefix}-markers-gcs-agent-publisher",
            project=cfg.project,
            topic=self.topics["markers"].name,
            role="roles/pubsub.publisher",
            member=gcs_agent.member,
            opts=self.child_opts(),
        )
        self.markers_notification = gcp.storage.Notification(
            f"{prefix}-markers-notification",
            bucket=bucket.bucket.name,
            topic=self.topics["markers"].id,
            payload_format="JSON_API_V1",
            event_types=["OBJECT_FINALIZE"],
            object_name_prefix=MARKERS_PREFIX,
            custom_attributes={ATTR_STACK: cfg.stack},
            opts=self.child_opts(self.gcs_publisher),
        )

        self.topic_names: dict[str, pulumi.Output[str]] = {
            kind.replace("-", "_"): topic.name for kind, topic in self.topics.items()
        }
        self.register_outputs(
            {
                "topics": self.topic_names,
                "shepherd_subscription": self.shepherd_subscription.name,
            }
        )
