"""What the `pcp` command needs beyond the standard library, checked before it is imported.

The CLI's packages (click, rich, the Google Cloud clients) come with the `cli` extra; a bare
`pip install .` installs none of them, so the console script would die in a traceback at its
first import. `pcp.cli` calls `require()` first: with anything missing it prints one line
naming what to install and exits 1.
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


def require() -> None:
    """Exit 1 with one line on stderr when a package of NEEDS is missing."""
    absent = missing()
    if absent:
        print(f"pcp: error: this installation of pcp lacks {', '.join(absent)}: install the "
              "CLI with pip install '.[cli]' (for `pcp local up` and `make demo`: pip install "
              "'.[demo]')", file=sys.stderr)
        raise SystemExit(1)
