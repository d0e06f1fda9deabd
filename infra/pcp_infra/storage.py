"""The stack bucket: run state (`control/`), run outputs (`runs/`), node markers (`markers/`).

Only `runs/` and `markers/` expire; `control/` (the stack document and sweep audit) never does.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts

#: Prefixes deleted after pcp:results_retention_days.
EXPIRING_PREFIXES: tuple[str, ...] = ("runs/", "markers/")

#: Prefix holding the function source archives (kept: the deployed one must stay readable).
SOURCE_PREFIX = "functions/"

#: Bucket-level grants: service account role -> bucket role.
BUCKET_ROLES: dict[str, str] = {
    "worker": "roles/storage.objectAdmin",
    "functions": "roles/storage.objectAdmin",
    "shepherd": "roles/storage.objectAdmin",
    "dispatch": "roles/storage.objectViewer",
    "build": "roles/storage.objectViewer",
}


class StateBucket(PcpComponent):
    TYPE = "pcp:infra:StateBucket"

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

        self.bucket = gcp.storage.Bucket(
            f"{names.prefix}-bucket",
            name=names.bucket,
            project=cfg.project,
            location=cfg.bucket_location,
            uniform_bucket_level_access=True,
            public_access_prevention="enforced",
            force_destroy=False,
            versioning=gcp.storage.BucketVersioningArgs(enabled=False),
            lifecycle_rules=[
                gcp.storage.BucketLifecycleRuleArgs(
                    action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                    condition=gcp.storage.BucketLifecycleRuleConditionArgs(
                        age=cfg.results_retention_days,
                        matches_prefixes=list(EXPIRING_PREFIXES),
                    ),
                )
            ],
            labels=names.labels(),
            opts=self.child_opts(),
        )
        self.name = self.bucket.name

        self.grants = [
            gcp.storage.BucketIAMMember(
                f"{names.prefix}-bucket-{account}-{role.rsplit('.', 1)[-1].lower()}",
                bucket=self.bucket.name,
                role=role,
                member=accounts.members[account],
                opts=self.child_opts(),
            )
            for account, role in BUCKET_ROLES.items()
        ]
        self.register_outputs({"bucket": self.bucket.name})
