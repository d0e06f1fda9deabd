"""The stack bucket: run state (`control/`), run outputs (`runs/`), node markers (`markers/`).

`runs/` and `markers/` expire after pcp:results_retention_days, the sweep audit
(`control/sweeps/`) after SWEEP_AUDIT_RETENTION_DAYS; the rest of `control/` (the stack
document above all) never does. Soft delete is off (SOFT_DELETE_RETENTION_SECONDS).
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import MARKERS, RUNS, SWEEPS, Names

from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts

#: Prefixes deleted after pcp:results_retention_days.
EXPIRING_PREFIXES: tuple[str, ...] = (RUNS, MARKERS)

#: One audit document per sweep that acted (`control/sweeps/<stamp>.json`): deleted after this
#: many days, or the prefix grows forever. Only this sub-prefix of `control/` ever expires.
SWEEP_AUDIT_RETENTION_DAYS = 30

#: Soft delete keeps every deleted or overwritten object (7 days by default), billed as
#: storage. Here that would be every overwritten checkpoint and every stack-document write,
#: while the one object that matters, control/stack.json, is rebuilt by the sweeper when it is
#: unreadable. 0 turns soft delete off: a deleted object is gone at once (see infra/README.md).
SOFT_DELETE_RETENTION_SECONDS = 0

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
            soft_delete_policy=gcp.storage.BucketSoftDeletePolicyArgs(
                retention_duration_seconds=SOFT_DELETE_RETENTION_SECONDS
            ),
            lifecycle_rules=[
                gcp.storage.BucketLifecycleRuleArgs(
                    action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                    condition=gcp.storage.BucketLifecycleRuleConditionArgs(
                        age=cfg.results_retention_days,
                        matches_prefixes=list(EXPIRING_PREFIXES),
                    ),
                ),
                gcp.storage.BucketLifecycleRuleArgs(
                    action=gcp.storage.BucketLifecycleRuleActionArgs(type="Delete"),
                    condition=gcp.storage.BucketLifecycleRuleConditionArgs(
                        age=SWEEP_AUDIT_RETENTION_DAYS,
                        matches_prefixes=[SWEEPS],
                    ),
                ),
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
