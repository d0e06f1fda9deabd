"""The `pcp` command (`pcp.cli:main` is the console script; the group is in `app.py`).

The CLI's packages (click, rich, the Google Cloud clients) come with the `cli` extra; a bare
`pip install .` installs none of them, so before importing the group this checks they are
there and otherwise says in one line what to install, instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

#: What the CLI imports beyond the standard library: (module, package to install).
NEEDS = (("click", "click"), ("rich", "rich"), ("google.cloud.storage", "google-cloud-storage"),
         ("google.cloud.pubsub_v1", "google-cloud-pubsub"),
         ("google.cloud.scheduler_v1", "google-cloud-scheduler"))


def missing() -> list[str]:
    """The packages of NEEDS that are not installed."""
    absent = []
    for module, package in NEEDS:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a parent package (google, google.cloud) is missing
            found = False
        if not found:
            absent.append(package)
    return absent


if not missing():
    from pcp.cli.app import SHORT_HELP, cli, main
else:
    def main() -> None:
        print(f"pcp: error: this installation of pcp lacks {', '.join(missing())}: install "
              "the CLI with pip install '.[cli]' (for `pcp local up` and `make demo`: "
              "pip install '.[demo]')", file=sys.stderr)
        raise SystemExit(1)

__all__ = ["NEEDS", "SHORT_HELP", "cli", "main", "missing"]
