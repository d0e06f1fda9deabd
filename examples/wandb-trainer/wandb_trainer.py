"""The reference trainer with wandb: one wandb run per node, grouped by the pcp run.

Runs `examples/reference-trainer/reference_trainer.py` unchanged (same contract: `shepherd
--port=P` / `worker --head-node=H:P`, same flags) inside a wandb run that takes everything
from the environment the pcp agent sets (docs/trainers.md, "wandb"): WANDB_PROJECT,
WANDB_ENTITY, WANDB_RUN_GROUP (the run id), WANDB_NAME (`<run id>-<node>`), WANDB_DIR (the
node's output directory: an offline run directory is uploaded with the outputs) and
WANDB_API_KEY. The run's config carries the pcp run id, node, attempt and the trainer's
arguments; its summary the node's final metrics.json.

`--wandb-mode online|offline|disabled` (taken out before the trainer sees its arguments)
sets the wandb mode; default: WANDB_MODE, else online. Needs `pip install wandb`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

REFERENCE = Path(__file__).resolve().parents[1] / "reference-trainer" / "reference_trainer.py"
MODES = ("online", "offline", "disabled")


def reference() -> Any:
    spec = importlib.util.spec_from_file_location("reference_trainer", REFERENCE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def split_mode(argv: list[str]) -> tuple[str | None, list[str]]:
    """`--wandb-mode M` / `--wandb-mode=M` out of the arguments."""
    mode, rest, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--wandb-mode" and i + 1 < len(argv):
            mode, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--wandb-mode="):
            mode = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    if mode is not None and mode not in MODES:
        sys.exit(f"wandb_trainer: --wandb-mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode, rest


def start_wandb(mode: str | None, args: list[str], out: Path, into: dict[str, Any]) -> None:
    """wandb.init, off the training's critical path: importing wandb and starting its service
    takes seconds, and the shepherd must listen (and the workers connect) without waiting."""
    try:
        import wandb

        config = {"pcp_run_id": os.environ.get("PCP_RUN_ID"),
                  "pcp_node": os.environ.get("PCP_NODE"),
                  "pcp_attempt": os.environ.get("PCP_ATTEMPT"), "trainer_args": args}
        # Project, entity, group, name and directory come from the WANDB_* environment.
        into["run"] = wandb.init(config=config,
                                 mode=mode or os.environ.get("WANDB_MODE") or "online",
                                 dir=os.environ.get("WANDB_DIR") or str(out))
    except Exception as e:  # noqa: BLE001 - reported after the training, which goes on
        into["error"] = e


def main(argv: list[str] | None = None) -> int:
    mode, args = split_mode(list(sys.argv[1:] if argv is None else argv))
    out = Path(os.environ.get("PCP_OUTPUT_DIR", "output"))
    out.mkdir(parents=True, exist_ok=True)
    started: dict[str, Any] = {}
    init = threading.Thread(target=start_wandb, args=(mode, args, out, started), daemon=True)
    init.start()
    code = 1
    try:
        code = int(reference().main(args))
    finally:
        init.join()
    if "error" in started:
        print(f"wandb_trainer: wandb.init failed: {started['error']}", file=sys.stderr)
        return code or 1
    run = started["run"]
    try:
        metrics_file = out / "metrics.json"
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            numbers = {k: v for k, v in metrics.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.log(numbers)
            run.summary.update(numbers)
    finally:
        run.finish(exit_code=code)
    return code


if __name__ == "__main__":
    sys.exit(main())
