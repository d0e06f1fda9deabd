"""wandb through the local replica: a run naming a wandb project runs the wandb trainer
(examples/wandb-trainer, the real library, offline) on every node; the summary and
`pcp status` link the group; each node's offline run directory is in the bucket."""

from __future__ import annotations

import json

import pytest

from pcp_dev import REPO
from pcp_dev.local.replica import Replica
from tests.agent.test_wandb import wandb_run_records
from tests.e2e.helpers import QUICK, start, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.emulator]

WANDB_TRAINER = REPO / "examples" / "wandb-trainer" / "wandb_trainer.py"


def test_a_wandb_run_links_its_group_and_uploads_each_nodes_offline_run(tiny: Replica) -> None:
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -r "
                        "requirements-dev.txt)")
    from click.testing import CliRunner

    from pcp.cli import cli
    from pcp.cli.context import Context

    run_id = "e2e-tiny-wandb"
    start(tiny, run_id, f"{QUICK} --wandb-mode offline", binary=f"python:{WANDB_TRAINER}",
          wandb_project="pcp-e2e", wandb_entity="example-team")
    done = wait_final(tiny, run_id)
    assert done.status.value == "succeeded", done.detail
    url = f"https://wandb.ai/example-team/pcp-e2e/groups/{run_id}"
    assert done.summary is not None and done.summary["wandb"]["url"] == url
    result = CliRunner().invoke(cli, ["status", run_id, "--json"],
                                obj=Context("tiny", store=tiny.store()))
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["wandb"]["url"] == url
    text = CliRunner().invoke(cli, ["status", run_id], obj=Context("tiny", store=tiny.store()))
    assert url in text.output.replace("\n", ""), text.output
    store = tiny.store()
    for node in ("shepherd", "worker-0"):
        [name] = [n for n in store.list(f"runs/{run_id}/{node}/wandb/")
                  if n.endswith(".wandb") and "/offline-run-" in n]
        blob = store.get(name)
        assert blob is not None
        [run] = [r.run for r in wandb_run_records(blob.data)  # type: ignore[attr-defined]
                 if r.WhichOneof("record_type") == "run"]  # type: ignore[attr-defined]
        assert (run.run_group, run.display_name) == (run_id, f"{run_id}-{node}")
        config = {u.key: json.loads(u.value_json) for u in run.config.update}
        assert config["pcp_run_id"] == run_id
