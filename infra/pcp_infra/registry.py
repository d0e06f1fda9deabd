"""The stack's Artifact Registry docker repository: the home of its training images.

`LOCATION-docker.pkg.dev/PROJECT/pcp-STACK/NAME:TAG` (the `image_repository` output). The
workers and the shepherd pull as their service accounts (roles/artifactregistry.reader; the
agent logs in with an access token, docs/trainers.md), and the functions read it too, to pin
a tag to its digest when they accept a run. Pushing is a person's or a CI job's, with
roles/artifactregistry.writer granted outside this program.
"""

from __future__ import annotations

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from .base import PcpComponent
from .config import StackConfig
from .identity import ServiceAccounts

#: Who reads the repository: the nodes pull, the functions resolve tags to digests.
READERS: tuple[str, ...] = ("worker", "shepherd", "functions")
READER_ROLE = "roles/artifactregistry.reader"


def repository_id(stack: str) -> str:
    return f"pcp-{stack}"


def image_repository(cfg: StackConfig) -> str:
    """Where the stack's images go: LOCATION-docker.pkg.dev/PROJECT/pcp-STACK."""
    return f"{cfg.region}-docker.pkg.dev/{cfg.project}/{repository_id(cfg.stack)}"


class ImageRepository(PcpComponent):
    TYPE = "pcp:infra:ImageRepository"

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
        self.repository = gcp.artifactregistry.Repository(
            f"{names.prefix}-images",
            repository_id=repository_id(cfg.stack),
            location=cfg.region,
            project=cfg.project,
            format="DOCKER",
            description=f"pcp stack {cfg.stack}: training images (docs/trainers.md)",
            labels=names.labels(),
            opts=self.child_opts(),
        )
        self.readers = [
            gcp.artifactregistry.RepositoryIamMember(
                f"{names.prefix}-images-{account}-reader",
                project=cfg.project,
                location=cfg.region,
                repository=self.repository.repository_id,
                role=READER_ROLE,
                member=accounts.members[account],
                opts=self.child_opts(),
            )
            for account in READERS
        ]
        self.url = image_repository(cfg)
        self.register_outputs({"url": self.url})
