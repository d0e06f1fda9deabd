"""Cold import of the functions module: `import main` in a fresh interpreter.

What a Cloud Functions instance pays before its first event: functions-framework, the pcp
package and the settings check. Measured inside the child (the interpreter's own start-up is
reported apart, as it is the platform's, not ours), `runs` times, median reported. The child
also says whether google.cloud.compute_v1 (about 1.5 s to import) was pulled in.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PCP_STACK": "tiny", "PCP_PROJECT": "pcp-bench", "PCP_ZONE": "us-central1-a",
       "PCP_BUCKET": "pcp-tiny-pcp-bench", "PCP_WORKER_COUNT": "1",
       "PCP_SHEPHERD_HOST": "shepherd.bench"}
PROBE = ("import json, sys, time\n"
         "t0 = time.perf_counter()\n"
         "import main\n"
         "took = time.perf_counter() - t0\n"
         "heavy = 'google.cloud.compute_v1' in sys.modules\n"
         "print(json.dumps({'import_s': took, 'compute_v1': heavy}))\n")


def _child(code: str) -> tuple[dict[str, Any], float]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PCP_") and k not in ("STORAGE_EMULATOR_HOST",
                                                     "PUBSUB_EMULATOR_HOST")}
    env.update(ENV)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "functions", env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"import main failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1] or "{}"), wall


def run(runs: int = 5) -> dict[str, Any]:
    print(f"  cold import of functions/main.py x{runs} ...", file=sys.stderr, flush=True)
    imports, walls, heavy = [], [], False
    for _ in range(runs):
        got, wall = _child(PROBE)
        imports.append(got["import_s"])
        walls.append(wall)
        heavy = heavy or bool(got["compute_v1"])
    bare = statistics.median(_child("print('{}')")[1] for _ in range(3))
    return {
        "runs": runs,
        "import_s": round(statistics.median(imports), 3),
        "import_runs_s": [round(t, 3) for t in imports],
        "process_wall_s": round(statistics.median(walls), 3),
        "bare_interpreter_s": round(bare, 3),
        "imports_compute_v1": heavy,
    }
