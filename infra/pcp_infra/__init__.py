"""The pcp Pulumi program, split into ComponentResources.

`infra/__main__.py` reads the configuration (`config.StackConfig`) and wires the components
defined here. Nothing in this package talks to Google Cloud directly: every cloud object is a
Pulumi resource, so the whole program can be exercised under `pulumi.runtime.set_mocks`.

Names (of resources, objects, labels and metadata keys) come from `pcp.core.names`, the one
module the functions, the agent and the CLI use too; the repository root is put on the path
for it, since the Pulumi CLI runs this program from `infra/` in a venv of its own.
"""

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.append(_REPO_ROOT)
