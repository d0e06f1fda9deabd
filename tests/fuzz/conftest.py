"""The fuzz tier: a fixed small budget per target in `make test`, a long one in `make fuzz`.

PCP_FUZZ_EXAMPLES sets the inputs per target (default 200 under the "ci" hypothesis profile,
50 under "dev"). Every target counts what it tried and how it ended; the counts are printed
at the end of the session (the figures in docs/reliability.md come from `make fuzz`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any

from hypothesis import settings

TRIED: defaultdict[str, Counter[str]] = defaultdict(Counter)


def budget(scale: float = 1.0) -> int:
    """Inputs per target: PCP_FUZZ_EXAMPLES, else by hypothesis profile."""
    raw = os.environ.get("PCP_FUZZ_EXAMPLES")
    base = int(raw) if raw else (200 if settings.get_current_profile_name() == "ci" else 50)
    return max(10, int(base * scale))


def fuzz_settings(scale: float = 1.0) -> Any:
    return settings(max_examples=budget(scale), deadline=None, database=None)


def tally(target: str, outcome: str) -> None:
    TRIED[target][outcome] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    terminalreporter.section("fuzz: inputs tried per target")
    for target in sorted(TRIED):
        c = TRIED[target]
        ends = (f"{c['acknowledged']:>7} acknowledged (HTTP 200)" if c["acknowledged"] else
                f"{c['value']:>7} parsed  {c['rejected']:>7} rejected")
        terminalreporter.write_line(f"{target:<28} {sum(c.values()):>7} tried  {ends}")
