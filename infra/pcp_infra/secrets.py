"""The stack's wandb API key: a Secret Manager secret, created empty, filled by a person.

The program creates the secret `pcp-<stack>-wandb-api-key` with no version (no key ever
passes through Pulumi, its state or this repository) and lets exactly the nodes' service
accounts (`worker`, `shepherd`) read it: `roles/secretmanager.secretAccessor` on this one
secret. A person adds the key once:

    printf %s "$WANDB_API_KEY" | gcloud secrets versions add pcp-<stack>-wandb-api-key \\
        --project <project> --data-file=-

The agent reads `versions/latest` when a run names a wandb project (pcp/agent/wandb.py).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts

#: The service accounts that may read the key: the nodes that run the binary.
READERS: tuple[str, ...] = ("worker", "shepherd")
ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"


class WandbSecret(PcpComponent):
    TYPE = "pcp:infra:WandbSecret"

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
        self.secret = gcp.secretmanager.Secret(
            names.wandb_secret,
            project=cfg.project,
            secret_id=names.wandb_secret,
            replication=gcp.secretmanager.SecretReplicationArgs(
                auto=gcp.secretmanager.SecretReplicationAutoArgs()),
            labels=names.labels(),
            opts=self.child_opts(),
        )
        self.grants = [
            gcp.secretmanager.SecretIamMember(
                f"{names.wandb_secret}-{role}-accessor",
                project=cfg.project,
                secret_id=self.secret.secret_id,
                role=ACCESSOR_ROLE,
                member=accounts.members[role],
                opts=self.child_opts(),
            )
            for role in READERS
        ]
        self.register_outputs({"secret": self.secret.secret_id})
