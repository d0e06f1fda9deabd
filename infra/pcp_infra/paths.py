"""Filesystem locations the program reads at deploy time.

They are module attributes (read at call time, never copied at import) so that the mock test
harness in `tests/infra/` can point them at temporary files without changing the program.
"""

from __future__ import annotations

import os
from pathlib import Path

#: `infra/`: the Pulumi project directory (holds Pulumi.yaml).
INFRA_DIR: Path = Path(__file__).resolve().parent.parent

#: The repository root: holds `functions/` and the `pcp/` package that are deployed as functions.
REPO_ROOT: Path = INFRA_DIR.parent

#: The worker VM startup script (written as part of the node bootstrap files).
WORKER_STARTUP_SCRIPT: Path = INFRA_DIR / "bootstrap" / "worker-startup.sh"

#: Where the function source archive is built before upload (ignored by git).
BUILD_DIR: Path = Path(os.environ.get("PCP_INFRA_BUILD_DIR", str(INFRA_DIR / ".build")))


def read_worker_startup_script() -> str:
    """Return the worker startup script, failing loudly if the file is missing or empty."""
    path = WORKER_STARTUP_SCRIPT
    if not path.is_file():
        raise FileNotFoundError(
            f"worker startup script not found at {path}; it is deployed as the workers' "
            "metadata 'startup-script' and must exist before `pulumi up`"
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"worker startup script {path} is empty")
    return text
