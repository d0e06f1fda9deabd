"""`make demo`: one whole training run on this machine, through the production code paths.

Starts the local replica of the tiny stack, publishes a start request the way `pcp run`
does, follows the run while the functions, the agents and the reference trainer do their
work, then says how it went: each node's exit and duration, the loss before and after,
where the results are (in the bucket, and copied to a local directory) and what the run
would have cost on Google Cloud. Exits 0 only when the run succeeded.

The replica's own log lines and every process's output go to files under
`<state-dir>/logs/<stack>/`; the terminal shows only the demo's lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pcp.cli.render import progress_line
from pcp.cli.views import LogTail, RunView, TrainingProgress, find_run, last_lines, load_json
from pcp.core.messages import StartRequest
from pcp.core.names import SHEPHERD, node_file, run_prefix, summary_doc
from pcp_dev.local.daemon import exit_on_signals
from pcp_dev.local.emulators import EmulatorMissing
from pcp_dev.local.replica import Options, Replica

EXIT_FAILED, EXIT_MISSING, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 130


class Demo:
    def __init__(self, replica: Replica, out: IO[str], timeout: float, t0: float) -> None:
        self.replica = replica
        self.out = out
        self.timeout = timeout
        self.store = replica.store()
        self.t0 = t0
        self._last = ""
        self._live: Any = None
        self._latest: dict[str, str] = {}  # each node's latest stdout line
        self._training = TrainingProgress()  # the binary's pcp-progress lines
        self._tail: LogTail | None = None

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def elapsed(self) -> str:
        return f"[{time.monotonic() - self.t0:5.1f}s]"

    def request(self, steps: int, step_sleep: float) -> StartRequest:
        """Publish a start request exactly as `pcp run` does: parsed by the core first."""
        run_id = f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}"
        body = {"run_id": run_id, "requested_by": "make demo", "stack": self.replica.options.stack,
                "training_config": f"--steps {steps} --step-sleep {step_sleep:g}"}
        request = StartRequest.from_json(json.dumps(body))
        message_id = self.replica.publish("start", request.to_json(), {"run_id": run_id})
        self.say(f"{self.elapsed()} published a start request for run {run_id} on topic "
                 f"{self.replica.topic('start')} (message {message_id})")
        return request

    def follow(self, run_id: str) -> RunView | None:
        """Show the run as it goes (the CLI's live table on a terminal, else a line per
        change); return its final view, or None after the timeout."""
        if not self.out.isatty():
            return self._poll(run_id, self._line)
        from rich.live import Live

        from pcp.cli.render import make_console

        with Live(console=make_console(self.out), auto_refresh=False) as live:
            self._live = live
            return self._poll(run_id, self._table)

    def _poll(self, run_id: str, show: Any) -> RunView | None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            view = find_run(self.store, run_id)
            if view is not None:
                self._tail = self._tail or LogTail(self.store, run_id, stream="stdout")
                chunks = self._tail.poll()
                last_lines(chunks, self._latest)
                self._training.read(chunks)
            show(view, run_id)
            if view is not None and view.final and view.summary is not None:
                return view
            time.sleep(0.5)
        return None

    def _line(self, view: RunView | None, run_id: str) -> None:
        line = progress_line(view, run_id, 0)
        t = self._training
        if t.step is not None and t.loss is not None and view is not None and not view.final:
            line += f", training step {t.step} loss {t.loss:.4g}"
        if line != self._last:
            self.say(f"{self.elapsed()} {line}")
            self._last = line

    def _table(self, view: RunView | None, run_id: str) -> None:
        from pcp.cli.render import progress_table

        self._live.update(progress_table(view, run_id, time.monotonic() - self.t0,
                                         self._latest, self._training), refresh=True)

    def vm_states(self, settle: float = 10.0) -> dict[str, str]:
        """The worker VMs' statuses, once they have had a moment to power off."""
        compute = self.replica.compute
        assert compute is not None
        deadline = time.monotonic() + settle
        while True:
            states = {vm: compute.vm(vm).status for vm in self.replica.vms}
            if all(s == "TERMINATED" for s in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(0.25)

    def copy_results(self, run_id: str, dest: Path) -> list[str]:
        """Download runs/<run_id>/ from the bucket into `dest`."""
        prefix = run_prefix(run_id)
        names = self.store.list(prefix)
        for name in names:
            blob = self.store.get(name)
            if blob is None:
                continue
            target = dest / name[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(blob.data)
        from pcp.cli.inspect import write_loss_curve

        summary = load_json(self.store, summary_doc(run_id)) or {}
        write_loss_curve(dest, [{"object": n, "path": str(dest / n[len(prefix):])}
                                for n in names], summary.get("metrics_node"))
        return names

    def report(self, view: RunView, results: Path) -> None:
        o = self.replica.options
        summary = view.summary or {}
        self.say()
        self.say(f"run {view.run_id}: {view.status.value.upper()}"
                 + (f" ({view.detail})" if view.detail else ""))
        self.say("  nodes:")
        for node in summary.get("nodes", []):
            how = (f"signal {node['signal']}" if node.get("signal")
                   else f"exit code {node.get('exit_code')}")
            took = node.get("duration_s")
            self.say(f"    {node['name']:<10} {node['phase']:<8} {how:<14} "
                     f"{'-' if took is None else f'{took:.1f} s'}")
        metrics = load_json(self.store, node_file(view.run_id, SHEPHERD, "metrics.json")) or {}
        first, last = metrics.get("initial_loss"), metrics.get("final_loss")
        if first is not None and last is not None:
            self.say(f"  loss: {first:.6f} at the start -> {last:.6f} at the end "
                     f"({metrics.get('steps_completed')} steps)")
        duration = summary.get("duration_s")
        if duration is not None:
            self.say(f"  run time: {duration:.1f} s from start to the last node's exit")
        copied = self.copy_results(view.run_id, results)
        self.say(f"  results: gs://{o.bucket}/{run_prefix(view.run_id)} ({len(copied)} objects: "
                 "logs, metrics, checkpoint, summary)")
        self.say(f"           copied to {results}")
        if (results / "loss-curve.png").exists():
            self.say(f"  loss curve: {results / 'loss-curve.png'}")
        cost = view.cost_usd
        if cost is not None:
            self.say(f"  estimated cost on Google Cloud: ${cost:.4f} "
                     f"({self.replica.options.worker_count} worker VM(s) of stack {o.stack} at "
                     f"the stack's hourly price, for the run's duration)")
        states = self.vm_states()
        self.say("  worker VMs now: " + ", ".join(f"{vm} {s}" for vm, s in states.items()))
        self.say(f"  process logs: {self.replica.log_dir}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcp_dev.local.demo", description=__doc__.split(
        "\n")[0])
    p.add_argument("--stack", default="tiny", choices=("tiny", "small", "large", "huge"))
    p.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    p.add_argument("--step-sleep", type=float, default=0.3, metavar="S",
                   help="pause after each step, so the progress can be seen (default 0.3)")
    p.add_argument("--state-dir", type=Path, default=Path(".pcp-local"))
    p.add_argument("--timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--no-gcs-limit", action="store_true",
                   help="lift Cloud Storage's per-object update limit (debugging only)")
    args = p.parse_args(argv)
    out = sys.stdout
    state_dir = args.state_dir.resolve()
    log_path = state_dir / "logs" / args.stack / "replica.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say(f"pcp demo: one training run on a local replica of stack {args.stack}")
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as replica_log, exit_on_signals():
        try:
            # The replica logs one JSON line per event to stdout: into its log file instead.
            with contextlib.redirect_stdout(replica_log), Replica(Options(
                    stack=args.stack, state_dir=state_dir, sweep_interval=5.0,
                    gcs_mutation_interval=None if args.no_gcs_limit else 1.0)) as replica:
                say(f"[{time.monotonic() - started:5.1f}s] replica up: Pub/Sub emulator "
                    f"{replica.pubsub.host if replica.pubsub else '?'}, fake-gcs-server "
                    f"{replica.gcs.endpoint if replica.gcs else '?'} ("
                    f"{'no update limit' if args.no_gcs_limit else 'one update/s per object'}), "
                    "4 functions, "
                    f"{len(replica.vms)} worker VM(s), the shepherd daemon")
                return run_demo(replica, out, args, state_dir, started)
        except EmulatorMissing as e:
            say(f"cannot start the local replica: {e}")
            return EXIT_MISSING
        except KeyboardInterrupt:
            say("\ninterrupted: the replica and every process it started have been stopped")
            return EXIT_INTERRUPTED
        except SystemExit as e:  # SIGTERM or SIGHUP (exit_on_signals)
            say("\nstopped by a signal: the replica and every process it started have been "
                "stopped")
            return int(e.code) if isinstance(e.code, int) else EXIT_INTERRUPTED


def run_demo(replica: Replica, out: IO[str], args: Any, state_dir: Path,
             started: float) -> int:
    demo = Demo(replica, out, args.timeout, started)
    request = demo.request(args.steps, args.step_sleep)
    view = demo.follow(request.run_id)
    if view is None:
        demo.say(f"run {request.run_id} did not finish within {args.timeout:.0f} s; "
                 f"see the logs in {replica.log_dir}")
        return EXIT_TIMEOUT
    demo.report(view, state_dir / "results" / request.run_id)
    if view.status.value != "succeeded":
        demo.say(f"\nthe run did not succeed; the logs are in {replica.log_dir}")
        return EXIT_FAILED
    demo.say("\nnext: `make test`, or keep a replica running with `pcp local up` and use "
             "`pcp run --wait`, `pcp status`, `pcp logs` against it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
