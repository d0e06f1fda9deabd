"""Fixtures for the infra tier: the real Pulumi program, run under mocks once per stack.

`mock_runs` starts one `mock_stack.py` process per stack (plus variant runs that flip the
optional branches), all at once, and parses their JSON. Each test then asserts on what the engine
would have received: resource types, names, inputs (camelCase, numbers as floats) and options.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
HARNESS = Path(__file__).resolve().parent / "mock_stack.py"

if str(INFRA) not in sys.path:
    sys.path.insert(0, str(INFRA))

#: Stack -> number of workers (README's stack table).
STACK_SIZES = {"tiny": 1, "small": 3, "large": 7, "huge": 15}

#: Extra runs that flip the optional branches: label -> (stack, `--set` overrides).
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "tiny-spot-private": (
        "tiny",
        [
            "pcp:spot=true",
            "pcp:external_ip=false",
            'pcp:allow_shepherd_from=["203.0.113.7/32"]',
            "pcp:worker_ports=9000-9100,29500",
            "pcp:sweep_interval_minutes=3",
            "pcp:cachix_cache=pcp-example",
            "pcp:cachix_public_key=pcp-example.cachix.org-1:AbCdEf0123456789+/AbCdEf0123456789=",
            "pcp:alert_email=oncall@example.org",
            "pcp:alert_pubsub_topic=projects/pcp-test-project/topics/pcp-alerts",
            "pcp:wandb_project=pcp-demo",
            "pcp:wandb_entity=example-team",
        ],
    ),
    "small-budget": (
        "small",
        [
            "pcp:billing_account=01D4EE-079462-DFD6EC",
            "pcp:monthly_budget_usd=250.5",
            "pcp:budget_stop_threshold=0.9",
            "pcp:max_cost_usd=40",
        ],
    ),
}


@dataclass
class StackRun:
    """The recorded registrations of one program run."""

    label: str
    stack: str
    data: dict[str, Any]

    @property
    def config(self) -> dict[str, str]:
        return self.data["config"]

    @property
    def outputs(self) -> dict[str, Any]:
        return self.data["outputs"]

    @property
    def resources(self) -> list[dict[str, Any]]:
        return self.data["resources"]

    @property
    def custom(self) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["custom"]]

    def of_type(self, token: str) -> list[dict[str, Any]]:
        return [r for r in self.resources if r["type"] == token]

    def one(self, token: str, name: str) -> dict[str, Any]:
        matches = [r for r in self.of_type(token) if r["name"] == name]
        assert len(matches) == 1, f"expected one {token} named {name}, got {len(matches)}"
        return matches[0]

    def by_input(self, token: str, key: str, value: Any) -> list[dict[str, Any]]:
        return [r for r in self.of_type(token) if r["inputs"].get(key) == value]

    def urn_of(self, token: str, name: str) -> str:
        return self.one(token, name)["urn"]

    @property
    def expected_workers(self) -> int:
        return (
            STACK_SIZES[self.stack]
            if self.label in STACK_SIZES
            else int(self.config["pcp:worker_count"])
        )

    @property
    def prefix(self) -> str:
        return f"pcp-{self.stack}"

    def sa_email(self, role: str) -> str:
        return self.outputs["service_accounts"][role]

    def sa_member(self, role: str) -> str:
        return "serviceAccount:" + self.sa_email(role)


def _launch(label: str, stack: str, sets: list[str], out_dir: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(HARNESS), stack, str(out_dir / f"{label}.json")]
    cmd += [f"--set={item}" for item in sets]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="session")
def mock_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, StackRun]:
    out_dir = tmp_path_factory.mktemp("infra-mock-runs")
    plan = {stack: (stack, []) for stack in STACK_SIZES} | VARIANTS
    procs = {label: _launch(label, stack, sets, out_dir) for label, (stack, sets) in plan.items()}
    runs: dict[str, StackRun] = {}
    failures = []
    for label, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode != 0:
            failures.append(f"--- {label} (exit {proc.returncode}) ---\n{stderr[-4000:]}")
            continue
        data = json.loads((out_dir / f"{label}.json").read_text())
        runs[label] = StackRun(label=label, stack=plan[label][0], data=data)
    if failures:
        pytest.fail("the Pulumi program failed under mocks:\n" + "\n".join(failures))
    return runs


@pytest.fixture(params=list(STACK_SIZES))
def stack_run(request: pytest.FixtureRequest, mock_runs: dict[str, StackRun]) -> StackRun:
    """One committed stack (tiny, small, large, huge), as configured by its Pulumi.<stack>.yaml."""
    return mock_runs[request.param]


@pytest.fixture(params=[*STACK_SIZES, *VARIANTS])
def any_run(request: pytest.FixtureRequest, mock_runs: dict[str, StackRun]) -> StackRun:
    """Every run, committed stacks and variants: for properties that must always hold."""
    return mock_runs[request.param]


@pytest.fixture
def variant(mock_runs: dict[str, StackRun]) -> StackRun:
    return mock_runs["tiny-spot-private"]
