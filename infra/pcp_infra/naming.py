"""Every cloud name of a stack, in one place (the other parts of pcp are written against these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Names:
    stack: str
    project: str

    @property
    def prefix(self) -> str:
        return f"pcp-{self.stack}"

    # storage
    @property
    def bucket(self) -> str:
        # Bucket names are global: the project id keeps them unique.
        return f"{self.prefix}-{self.project}"

    # messaging
    def topic(self, kind: str) -> str:
        """kind: start | stop | sweep | shepherd | markers | dead-letter."""
        return f"{self.prefix}-{kind}"

    @property
    def shepherd_subscription(self) -> str:
        return f"{self.prefix}-shepherd-host"

    @property
    def dead_letter_subscription(self) -> str:
        return f"{self.prefix}-dead-letter"

    # compute
    def worker_vm(self, index: int) -> str:
        return f"{self.prefix}-worker-{index}"

    @staticmethod
    def worker_node(index: int) -> str:
        return f"worker-{index}"

    @property
    def worker_tag(self) -> str:
        return f"{self.prefix}-worker"

    @property
    def network(self) -> str:
        return f"{self.prefix}-net"

    @property
    def subnetwork(self) -> str:
        return f"{self.prefix}-workers"

    # functions and scheduler
    def function(self, kind: str) -> str:
        """kind: start | stop | marker | sweep."""
        return f"{self.prefix}-{kind}"

    @property
    def scheduler_job(self) -> str:
        return f"{self.prefix}-sweep"

    # identity
    def service_account_id(self, role: str) -> str:
        account_id = f"{self.prefix}-{role}"
        if not 6 <= len(account_id) <= 30:
            raise ValueError(f"service account id {account_id!r} must be 6-30 characters")
        return account_id

    def custom_role_id(self, purpose: str) -> str:
        # Role ids allow [a-zA-Z0-9_.] only.
        return f"pcp_{self.stack}_{purpose}".replace("-", "_")

    @property
    def workload_identity_pool(self) -> str:
        pool = f"{self.prefix}-github"
        if not 4 <= len(pool) <= 32:
            raise ValueError(f"workload identity pool id {pool!r} must be 4-32 characters")
        return pool

    def labels(self, **extra: str) -> dict[str, str]:
        return {"pcp-stack": self.stack, **extra}
