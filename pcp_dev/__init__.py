"""Development-only code: never deployed to a function, a worker or the Mac.

`local` is the local replica (emulators, a local Compute endpoint, a metadata server, a ticker,
the demo), `faults` the fault-injecting wrappers and the randomised campaign, `bench` the
benchmark's helpers. The deployed function archive and the agent distribution leave this
package out (tests/infra checks it).
"""

from pathlib import Path

#: The checkout this package runs from (the replica's state and the examples live there).
REPO = Path(__file__).resolve().parents[1]
#: The reference training binary, run by the agents with their own interpreter.
REFERENCE_TRAINER = REPO / "examples" / "reference-trainer" / "reference_trainer.py"
REFERENCE_BINARY = f"python:{REFERENCE_TRAINER}"
