"""`pcp cost` and doctor's standing-cost check: the disks and addresses are read from the local
Compute endpoint (strict to the discovery document) over its REST API, priced by the stack's
table; the runs' costs come from the stack document and the archived records, with the
keep-alive lease counted in the run that asked for it. Also the watchdog's CLI surface:
`pcp run --gpu-idle` and the node table's `gpu` column."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests

from pcp.cli.config import Config
from pcp.cli.context import Context
from pcp.cli.cost import ComputeInventory
from pcp.core import costs
from pcp.core.names import LABEL_STACK, Names
from pcp_dev.local.compute import LocalCompute
from tests.cli.conftest import T0, Stack

REGION_URL = "https://www.googleapis.com/compute/v1/projects/p/regions/local"


@pytest.fixture
def compute() -> Iterator[LocalCompute]:
    with LocalCompute("p", "local-a", time_scale=0) as c:
        c.add_instance("pcp-tiny-worker-0", labels={LABEL_STACK: "tiny"})
        c.add_instance("pcp-small-worker-0", labels={LABEL_STACK: "small"})  # not ours
        c.add_disk("pcp-tiny-scratch", 50, "pd-ssd", labels={LABEL_STACK: "tiny"})
        c.add_disk("someone-elses", 500, "pd-standard")
        c.add_address(Names("tiny").egress_address, "203.0.113.7",
                      users=(f"{REGION_URL}/routers/pcp-tiny-router",))
        c.add_address("unrelated", "203.0.113.9")
        yield c


def context(stack: Stack, compute: LocalCompute, prices: str | None = None) -> Context:
    config = Config(stack="tiny", project="p", bucket="b", region="local", zone="local-a",
                    prices=prices)
    return Context("tiny", store=stack.store, bus=stack.bus, config=config,
                   inventory=ComputeInventory(requests.Session(), compute.endpoint),
                   clock=lambda: T0)


def test_the_standing_cost_is_what_the_stack_really_has(invoke, stack: Stack,  # noqa: ANN001
                                                        compute: LocalCompute) -> None:
    result = invoke(["cost", "--json"], obj=context(stack, compute))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    lines = {(x["kind"], x["name"]): x for x in out["standing"]["lines"]}
    assert set(lines) == {("disk", "pcp-tiny-worker-0"), ("disk", "pcp-tiny-scratch"),
                          ("address", "pcp-tiny-egress"), ("nat", "pcp-tiny-router")}
    assert lines[("disk", "pcp-tiny-worker-0")]["detail"] == "100 GB pd-balanced"
    # 100 GB pd-balanced + 50 GB pd-ssd per GB-month, an address in use per hour, NAT 0
    monthly = 100 * 0.10 + 50 * 0.17 + 0.005 * costs.HOURS_PER_MONTH
    assert out["standing"]["monthly_usd"] == pytest.approx(monthly, abs=0.01)
    assert out["standing"]["daily_usd"] == pytest.approx(monthly / 730 * 24, abs=0.001)
    assert out["vms"] == 1 and out["prices_as_of"] == costs.PRICES_AS_OF
    assert compute.count("disks.list") == 1 and compute.count("addresses.list") == 1
    assert compute.invalid_responses == []  # every answer fit the discovery document


def test_the_price_table_is_overridden_key_by_key(invoke, stack: Stack,  # noqa: ANN001
                                                  compute: LocalCompute) -> None:
    ctx = context(stack, compute, prices='{"pd-balanced": 0.2, "nat_gateway_hour": 0.1}')
    out = json.loads(invoke(["cost", "--json"], obj=ctx).output)
    lines = {x["name"]: x for x in out["standing"]["lines"]}
    assert lines["pcp-tiny-worker-0"]["monthly_usd"] == pytest.approx(20.0)
    assert lines["pcp-tiny-router"]["daily_usd"] == pytest.approx(2.4)
    assert lines["pcp-tiny-scratch"]["monthly_usd"] == pytest.approx(8.5)  # the default


@pytest.mark.parametrize(("prices", "words"), [
    ('{"pd-gold": 1}', "unknown price 'pd-gold'"), ('{"pd-ssd": -1}', "must be a number >= 0"),
    ("[1]", "must be an object of prices"), ("{", "is not a JSON object")])
def test_a_bad_price_table_is_one_line(invoke, stack: Stack, compute: LocalCompute,  # noqa: ANN001
                                       prices: str, words: str) -> None:
    result = invoke(["cost"], obj=context(stack, compute, prices=prices))
    assert result.exit_code == 2 and words in result.output, result.output
    assert compute.count("disks.list") == 0  # refused before anything was read


def test_runs_by_day_count_the_keep_alive_lease_in_the_run(invoke, stack: Stack,  # noqa: ANN001
                                                           compute: LocalCompute) -> None:
    stack.start("kept", keep_vm_alive=True)
    stack.finish("kept", {})  # 30 minutes on one worker ($1.20/h) and the shepherd ($0.30/h)
    stack.start("plain")
    stack.finish("plain", {"worker-0": 3})
    ctx = context(stack, compute, prices='{"worker_hour": 1.2}')
    out = json.loads(invoke(["cost", "--json"], obj=ctx).output)
    runs = {r["run_id"]: r for r in out["runs"]}
    assert runs["kept"]["run_usd"] == pytest.approx(0.75)
    assert runs["kept"]["keep_alive_hours"] == pytest.approx(2.0)  # the stack's lease
    assert runs["kept"]["keep_alive_usd"] == pytest.approx(2.4)
    assert runs["kept"]["cost_usd"] == pytest.approx(3.15)
    assert runs["plain"]["keep_alive_usd"] == 0
    assert out["by_day"] == {"2026-11-29": {"runs": 2, "cost_usd": pytest.approx(3.9)}}
    assert out["by_stack"] == {"tiny": pytest.approx(3.9)}
    text = invoke(["cost"], obj=ctx, env={"COLUMNS": "200"}).output
    assert "runs in 2026-11: 2, $3.90" in text and "2026-11-29" in text
    assert "standing cost of stack tiny (1 VMs, billed while stopped)" in text
    other = json.loads(invoke(["cost", "--json", "--month", "2026-10"], obj=ctx).output)
    assert other["runs"] == []
    assert invoke(["cost", "--month", "Nov"], obj=ctx).exit_code == 2


def test_doctor_shows_the_standing_cost(invoke, stack: Stack,  # noqa: ANN001
                                        compute: LocalCompute) -> None:
    result = invoke(["doctor", "--json"], obj=context(stack, compute))
    checks = {c["name"]: c for c in json.loads(result.output)["checks"]}
    line = checks["standing cost"]
    assert line["state"] == "ok" and "/day" in line["detail"] and "/month while idle" in \
        line["detail"], line


def test_an_unreadable_compute_is_said_not_guessed(invoke, stack: Stack,  # noqa: ANN001
                                                   compute: LocalCompute) -> None:
    compute.faults.fail_next("disks.list", error=403)
    out = json.loads(invoke(["cost", "--json"], obj=context(stack, compute)).output)
    assert out["standing"] is None and "HTTP 403" in out["standing_error"]
    assert "roles/compute.viewer" in out["standing_error"]


def test_the_local_endpoint_refuses_what_the_real_one_would(compute: LocalCompute) -> None:
    base = f"{compute.endpoint}/compute/v1/projects/p"
    assert requests.get(f"{base}/zones/local-a/disks", params={"colour": "red"},
                        timeout=5).status_code == 400
    assert requests.get(f"{base}/zones/other-b/disks", timeout=5).status_code == 404
    assert requests.post(f"{base}/regions/local/addresses", timeout=5).status_code == 404
    body = requests.get(f"{base}/regions/local/addresses", timeout=5).json()
    assert {a["name"]: a["status"] for a in body["items"]} == {"pcp-tiny-egress": "IN_USE",
                                                               "unrelated": "RESERVED"}


def test_run_gpu_idle_flag_reaches_the_request_or_is_a_clear_error(stack: Stack,  # noqa: ANN001
                                                                   invoke) -> None:
    from pcp.core.messages import GpuIdle, StartRequest

    result = invoke(["run", "--stack", "tiny", "--gpu-idle", "5%:15m:10m"], obj=stack.context)
    assert result.exit_code == 0, result.output
    [data] = stack.published("start")
    assert StartRequest.from_json(data).gpu_idle == GpuIdle(5, 15, 10)
    for bad, words in (("5", "expected PERCENT%:WINDOW"), ("5%:1d", "not a duration"),
                       ("0%:5m", "more than 0")):
        result = invoke(["run", "--stack", "tiny", "--gpu-idle", bad], obj=stack.context)
        assert result.exit_code == 2 and words in result.output, result.output
    assert len(stack.published("start")) == 1  # nothing published for a bad flag


def test_status_shows_each_nodes_gpus_from_its_heartbeat(stack: Stack, invoke) -> None:  # noqa: ANN001
    from datetime import timedelta

    stack.start("r-gpu")
    for node in ("shepherd", "worker-0"):
        stack.marker("r-gpu", node, "booted", T0 + timedelta(minutes=1))
    stack.store.put("runs/r-gpu/worker-0/heartbeat.json", json.dumps({
        "run_id": "r-gpu", "node": "worker-0", "attempt": 1, "phase": "running",
        "gpus": [{"index": 0, "utilization_percent": 87, "memory_used_mib": 10240},
                 {"index": 1, "utilization_percent": None, "memory_used_mib": 3}]}).encode())
    stack.store.put("runs/r-gpu/shepherd/heartbeat.json", b"{not json")  # unreadable: left out
    result = invoke(["status", "r-gpu"], obj=stack.context, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "87% 10240 MiB, n/a 3 MiB" in result.output and "gpu" in result.output
    out = json.loads(invoke(["status", "--json"], obj=stack.context).output)
    assert out["gpus"] == {"worker-0": "87% 10240 MiB, n/a 3 MiB"}
