"""The code the stack runs, uploaded to the stack bucket.

- The functions' source: `functions/` at the zip root plus the `pcp/` package, under a
  content-hashed name (`functions/pcp-functions-<sha256>.zip`), so that every code change is
  redeployed and an unchanged tree is not.
- The node agent: an sdist of the repository's `pcp` package at the fixed name
  `agent/pcp-agent.tar.gz`, which `bootstrap/worker-startup.sh` installs at boot whenever the
  object's generation changed. So workers run the same `pcp` code as the control plane, from
  their next boot (a running agent is never replaced). The VMs' metadata does not name it, so a
  code deploy never rewrites worker metadata.
"""

from __future__ import annotations

from pathlib import Path

import pulumi
import pulumi_gcp as gcp

from pcp.core.names import Names

from . import paths
from .base import PcpComponent
from .config import StackConfig
from .packaging import build_agent_sdist, build_function_archive
from .storage import SOURCE_PREFIX, StateBucket

#: Fixed object name the worker startup script reads (its AGENT_OBJECT).
AGENT_OBJECT = "agent/pcp-agent.tar.gz"


def _stable_path(path: Path) -> str:
    """Relative to the working directory (infra/ under the CLI) when possible, so the path the
    state records does not depend on where the repository is checked out."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class CodeArchives(PcpComponent):
    TYPE = "pcp:infra:CodeArchives"

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        bucket: StateBucket,
        *,
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(name, depends_on=depends_on, opts=opts)
        names = Names(cfg.stack, cfg.project)

        archive, sha = build_function_archive(paths.REPO_ROOT, paths.BUILD_DIR)
        self.functions_sha256 = sha
        self.functions_object_name = f"{SOURCE_PREFIX}pcp-functions-{sha}.zip"
        self.functions_url = f"gs://{names.bucket}/{self.functions_object_name}"
        self.functions_source = gcp.storage.BucketObject(
            f"{names.prefix}-functions-source",
            bucket=bucket.bucket.name,
            name=self.functions_object_name,
            source=pulumi.FileAsset(_stable_path(archive)),
            content_type="application/zip",
            opts=self.child_opts(),
        )

        sdist, agent_sha = build_agent_sdist(paths.REPO_ROOT, paths.BUILD_DIR)
        self.agent_sha256 = agent_sha
        self.agent_url = f"gs://{names.bucket}/{AGENT_OBJECT}"
        self.agent = gcp.storage.BucketObject(
            f"{names.prefix}-agent-sdist",
            bucket=bucket.bucket.name,
            name=AGENT_OBJECT,
            source=pulumi.FileAsset(_stable_path(sdist)),
            content_type="application/gzip",
            metadata={"pcp-sha256": agent_sha},
            # Objects are immutable: new content replaces the object under the same name, so
            # the old resource must be deleted first (deleting it afterwards would delete the
            # new upload). Nothing depends on this object, so nothing else is replaced with it.
            opts=self.child_opts(delete_before_replace=True),
        )
        self.register_outputs(
            {
                "functions_sha256": sha,
                "functions_url": self.functions_url,
                "agent_sha256": agent_sha,
                "agent_url": self.agent_url,
            }
        )
