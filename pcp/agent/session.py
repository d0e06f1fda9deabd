"""One node's part of one attempt: realise, (wait for the shepherd), booted, run, done.

Shared by the worker and the shepherd agent. `done` is written whenever the binary was
started or could not be realised, after the logs and outputs are uploaded, so the run's
result never depends on the logs being complete. A node that never started its binary
(stopped while waiting, shepherd never answered) writes neither marker: the control plane's
boot timeout owns that case, and it may restart the run.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pcp.agent import container, gpu, torchrun
from pcp.agent.binary import NOT_REALISED, BinaryError, Realiser, host_platform, plan
from pcp.agent.config import AgentConfig
from pcp.agent.log import Log
from pcp.agent.logtimes import LogTimes
from pcp.agent.notices import NoticeWatch
from pcp.agent.record import RunView, read_run
from pcp.agent.runner import CANNOT_EXECUTE, Exit, Runner
from pcp.agent.ticker import Task, Ticker
from pcp.agent.uploader import Uploader
from pcp.agent.wandb import KeySource, wandb_env
from pcp.core.images import ImageRef
from pcp.core.lifecycle import markers_in
from pcp.core.messages import Assignment
from pcp.core.names import markers_prefix
from pcp.core.ports import BlobStore

LOOP_SECONDS = 0.1


@dataclass(frozen=True)
class Result:
    booted: bool
    exit: Exit | None  # None when no done marker was written
    stopped: str | None = None  # why the agent stopped the binary (or the wait), if it did
    end_reason: str | None = None  # the done marker's end_reason (gpu_idle, maintenance, ...)


class Session:
    def __init__(self, a: Assignment, store: BlobStore, cfg: AgentConfig, log: Log,
                 agent_stop: threading.Event, gpus: str | None = None,
                 notices_host: str | None = None, wandb_key: KeySource | None = None) -> None:
        self.a = a
        #: The metadata server to watch for maintenance and preemption notices (worker VMs).
        self.notices_host = notices_host
        self.end_reason: str | None = None
        self.gpu_samples: list[gpu.GpuSample] | None = None
        self.gpu_error: str | None = None
        self.wandb_key = wandb_key
        self.gpus = gpus  # the worker's pcp-gpu-count metadata, checked before anything runs
        self.store = store
        self.cfg = cfg
        self.log = log.bind(run_id=a.run_id, node=a.node, attempt=a.attempt)
        self.agent_stop = agent_stop
        self.uploader = Uploader(store, a, self.log)
        self.dir = cfg.work_dir / a.run_id / str(a.attempt)
        self.output = self.dir / "output"
        self.stdout = self.dir / "stdout.log"
        self.stderr = self.dir / "stderr.log"
        self.times = LogTimes(self.stdout, self.stderr, self.dir / "logtimes.txt")
        self.record: RunView | None = None
        self.stop_reason: str | None = None
        self._stop = threading.Event()
        self.runner: Runner | None = None
        self.image: ImageRef | None = None  # the pulled image, when the node runs one
        self.engine: container.Engine | None = None
        self.workers_done = False  # set by the torchrun shepherd's watch_workers task

    @property
    def key(self) -> tuple[str, int]:
        return self.a.run_id, self.a.attempt

    def request_stop(self, reason: str) -> None:
        """Stop the binary (or the wait before it): SIGTERM, grace, SIGKILL. Thread-safe."""
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def end(self, reason: str, text: str) -> None:
        """End the node for `reason` (its done marker says so): a notice or the watchdog."""
        if not self._stop.is_set():
            self.end_reason = reason
            self.request_stop(text)

    def stopping(self) -> str | None:
        if self._stop.is_set():
            return self.stop_reason
        if self.agent_stop.is_set():
            return "the agent received SIGTERM"
        if datetime.now(UTC) >= self.a.deadline:
            return "the run's deadline has passed"
        return None

    # ------------------------------------------------------------ phases

    def run(self) -> Result:
        self.output.mkdir(parents=True, exist_ok=True)
        prune(self.cfg.work_dir, keep=self.cfg.keep_runs, current=self.a.run_id)
        self.log.info("session_start", f"{self.a.role} {self.a.node} of run {self.a.run_id} "
                      f"attempt {self.a.attempt}", binary=self.a.binary, image=self.a.image)
        started = time.monotonic()
        problem = self.gpu_problem()
        if problem is not None:
            self.log.error("gpu_unavailable", problem)
            return self._fail(gpu.GPU_UNAVAILABLE, f"the GPU is not usable: {problem}", started)
        try:
            with open(self.stderr, "ab") as nix_log:
                if self.a.image is not None:
                    prefix = self.pull_image(nix_log)
                    argv = prefix  # the container's command line is built at launch
                else:
                    realiser = Realiser(self.cfg.nix_bin_dir, log_to=nix_log,
                                        cancelled=lambda: self.stopping() is not None,
                                        grace=self.cfg.grace)
                    prefix = realiser.realise(self.a.binary)
                    argv = self.command(prefix)
        except BinaryError as e:
            if self.stopping() is not None:
                return Result(False, None, self.stopping())
            what = "the image" if self.a.image is not None else "the binary"
            self.log.error("binary_not_realised", str(e))
            return self._fail(NOT_REALISED, f"cannot realise {what}: {e}", started)
        self.times.observe(force=True)  # what realising wrote to stderr.log
        self.log.info("binary_realised", " ".join(prefix), argv0=prefix[0])
        if self.a.role == "worker" and not self.wait_for_head():
            return Result(False, None, self.stopping())
        why = self.stopping()
        if why is not None:
            self.log.info("not_started", why)
            return Result(False, None, why)
        return self.launch(argv)

    def command(self, prefix: list[str]) -> list[str]:
        """The argument list to start: the contract's, or the torchrun launcher's."""
        if self.a.launcher != "torchrun":
            return prefix + self.a.argv(prefix[0])[1:]
        p = plan(self.a.binary, host_platform())
        gpus = gpu.parse_count(self.gpus) if self.a.role == "worker" else 0
        return torchrun.argv(p, prefix, self.a, gpus)

    def pull_image(self, log_to: IO[bytes]) -> list[str]:
        """Pull the assignment's pinned image (docs/trainers.md); the engine's command is the
        prefix. A container a killed agent left for this node is removed first."""
        assert self.a.image is not None
        engine = container.find_engine(self.cfg.container_engine)
        gone = container.remove_leftovers(engine, self.a.node, log_to)
        if gone:
            self.log.warning("container_leftover", f"removed {len(gone)} container(s) of "
                             f"{self.a.node} left by an earlier agent", ids=gone)
        puller = container.Puller(engine, log_to=log_to, grace=self.cfg.grace,
                                  cancelled=lambda: self.stopping() is not None)
        self.image = puller.pull(self.a.image)
        self.engine = engine
        return list(engine.argv)

    def gpu_problem(self) -> str | None:
        """Why this worker's GPUs cannot be used, or None (also when it has none)."""
        try:
            expected = gpu.parse_count(self.gpus)
        except ValueError as e:
            return str(e)
        if expected:
            problem = gpu.check(expected)
            if problem is None:
                self.log.info("gpu_ok", f"{expected} GPU(s) answer nvidia-smi")
            return problem
        return None

    def wait_for_head(self) -> bool:
        """Until the shepherd's port accepts a connection, or the boot deadline passes."""
        host, port = self.a.head_host, self.a.port
        start, next_note, next_poll = time.monotonic(), 0.0, 0.0
        while True:
            why = self.stopping()
            if why is not None:
                self.log.info("wait_stopped", f"stopped waiting for the shepherd: {why}")
                return False
            if datetime.now(UTC) >= self.a.boot_deadline:
                self.log.error("shepherd_unreachable", f"the shepherd at {host}:{port} did not "
                               "answer before the boot deadline; not starting (no booted marker)")
                return False
            try:
                socket.create_connection((host, port), timeout=2.0).close()
                self.log.info("shepherd_reachable", f"{host}:{port} accepts connections")
                return True
            except OSError as e:
                waited = time.monotonic() - start
                if waited >= next_note:
                    self.log.info("waiting_for_shepherd", f"{host}:{port}: {e} "
                                  f"({waited:.0f} s)", waited_s=round(waited, 1))
                    next_note += self.cfg.progress_interval
            if time.monotonic() - start >= next_poll:
                next_poll += self.cfg.poll_interval
                self._watch_run()
            self._stop.wait(0.5)

    def launch(self, argv: list[str]) -> Result:
        """Start the binary (natively or in its container), supervise it until it exits, then
        upload and write done."""
        runner = self._runner(argv)
        self.uploader.marker("booted")
        started = time.monotonic()
        try:
            runner.start()
        except OSError as e:
            self.log.error("binary_not_started", f"{argv[0]}: {e}")
            return self._fail(CANNOT_EXECUTE, f"cannot start {argv[0]}: {e}", started)
        self.runner = runner
        self.log.info("binary_started", f"pid {runner.pid}", argv=argv)
        stopped, ending = self._supervise(runner)
        runner.reap_group()
        result = runner.exit()
        if self.workers_done and result.exit_code == 0:
            # The store did its job: stopping it is this node's success, not a signal.
            result, stopped = Exit(0, None, result.duration_s), None
        self.log.info("binary_exited", f"exit code {result.exit_code}", exit_code=result.exit_code,
                      signal=result.signal, duration_s=result.duration_s)
        self._finish(result, heartbeat=True, end_reason=ending)
        return Result(True, result, stopped, ending)

    def _runner(self, argv: list[str]) -> Runner:
        """The binary's process: the contract's environment (docs/agent.md) on top of the
        agent's, run natively or, for an image, by the container engine."""
        contract = self.a.env(str(self.output))
        env = {**os.environ, **contract}
        sockets = {k: v for k, v in socket_env(self.cfg.socket_ifname).items() if k not in env}
        env.update(sockets)
        wandb = wandb_env(self.a, str(self.output), self.wandb_key, self.log)
        env.update(wandb)
        if self.image is None or self.engine is None:
            return Runner(argv, env, self.dir, self.stdout, self.stderr)
        # Every contract variable by name (the value is in the engine's environment).
        gpus = gpu.parse_count(self.gpus) if self.a.role == "worker" else 0
        names = [*contract, *sockets, *wandb]
        argv = container.run_argv(self.engine, self.a, self.image, names,
                                  str(self.output), gpus, self.cfg.grace)
        return container.ContainerRunner(self.engine, container.container_name(self.a),
                                         argv, env, self.dir, self.stdout, self.stderr)

    def _supervise(self, runner: Runner) -> tuple[str | None, str | None]:
        """Run the periodic tasks until the binary exits, stopping it when told to. Returns
        why it was stopped (None: it exited on its own) and the node's end reason."""
        up = self.uploader
        watch = (NoticeWatch(self.notices_host, self.end, self.log).start()
                 if self.notices_host else None)
        tasks = [
            Task("upload_logs", self.cfg.upload_interval,
                 lambda: up.logs(self.stdout, self.stderr, times=self.times.index)),
            Task("heartbeat", self.cfg.upload_interval, lambda: self._heartbeat(runner.pid)),
            Task("watch_run", self.cfg.poll_interval, self._watch_run),
            Task("upload_output", self.cfg.output_interval, lambda: up.output(self.output)),
            *([Task("watch_workers", self.cfg.poll_interval, self._watch_workers)]
              if self.hosts_rendezvous else []),
        ]
        sampler = self._gpu_sampler(time.monotonic())
        if sampler is not None:
            tasks.insert(0, Task("gpu_sample", self.cfg.gpu_interval, sampler))
        ticker = Ticker(tasks, self.log)
        stopped: str | None = None
        ending: str | None = None
        try:
            while runner.poll() is None:
                if self.workers_done and stopped is None:
                    stopped = "every worker finished"
                    self.log.info("rendezvous_done", "every worker exited with code 0: "
                                  "stopping the rendezvous store")
                    runner.terminate(self.cfg.grace)
                why = self.stopping()
                if why is not None and stopped is None:
                    stopped, ending = why, self.end_reason
                    self.log.info("stopping_binary", why, grace_s=self.cfg.grace,
                                  **({"end_reason": ending} if ending else {}))
                    self._note(f"stopping the binary: {why}")
                    runner.terminate(self.cfg.grace)
                runner.tick()
                self.times.observe()
                ticker.tick()
                time.sleep(LOOP_SECONDS)
        finally:
            if watch is not None:
                watch.stop()
        return stopped, ending

    def _gpu_sampler(self, started: float) -> Callable[[], None] | None:
        """The GPU task: sample nvidia-smi for the heartbeat and apply the gpu_idle policy.
        None on a node without nvidia-smi (the shepherd Mac, a CPU stack)."""
        policy = self.a.gpu_idle
        if shutil.which(gpu.NVIDIA_SMI) is None:
            if policy is not None:
                self.log.warning("gpu_idle_unenforced", f"gpu_idle policy {policy.text} is not "
                                 f"enforced on {self.a.node}: {gpu.NVIDIA_SMI} is not installed")
            return None
        watch = None
        if policy is not None:
            watch = gpu.IdleWatch(policy, started, self.cfg.gpu_minute_seconds)
            self.log.info("gpu_idle_policy", f"ending the node if every GPU stays below "
                          f"{policy.below_percent:g}% for {policy.minutes:g} min after the "
                          f"first {policy.after_minutes:g} min", policy=policy.text)

        def sample() -> None:
            try:
                self.gpu_samples, self.gpu_error = gpu.sample(), None
            except gpu.SampleError as e:
                if self.gpu_error is None:
                    self.log.warning("gpu_sample_failed", str(e))
                self.gpu_samples, self.gpu_error = None, str(e)
            if watch is not None:
                broken = watch.observe(self.gpu_samples, time.monotonic())
                if broken is not None:
                    self.log.error("gpu_idle", broken)
                    self.end("gpu_idle", broken)
        return sample

    def _heartbeat(self, pid: int | None, phase: str = "running", force: bool = False) -> None:
        gpus = None if self.gpu_samples is None else [s.to_dict() for s in self.gpu_samples]
        self.uploader.heartbeat(phase, pid, gpus=gpus, gpu_error=self.gpu_error, force=force)

    # ------------------------------------------------------------ helpers

    def _fail(self, code: int, text: str, started: float) -> Result:
        self._note(text)
        result = Exit(code, None, round(time.monotonic() - started, 3))
        self._finish(result, heartbeat=False)
        return Result(False, result, None)

    def _finish(self, result: Exit, heartbeat: bool, end_reason: str | None = None) -> None:
        """Upload what there is, then write done; an upload failure never loses done.

        When the agent itself was told to stop (a VM stop: 30 s in all on a Spot VM), the
        output uploads get `stop_upload_budget` seconds, so done is still written in time; so
        they do after a maintenance or preemption notice, which leaves as little time. The
        last heartbeat ("exited") goes after done: nothing waits for it."""
        short = self.agent_stop.is_set() or end_reason in ("maintenance", "preempted")
        until = time.monotonic() + self.cfg.stop_upload_budget if short else None
        self.times.observe(force=True)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("upload_logs", lambda: self.uploader.logs(self.stdout, self.stderr, True,
                                                       times=self.times.index)),
            ("upload_output", lambda: self.uploader.output(self.output, until))]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - done must still be written
                self.log.error("upload_failed", f"{name}: {type(e).__name__}: {e}")
        self.uploader.marker("done", result.exit_code, result.signal, result.duration_s,
                             end_reason=end_reason)
        if heartbeat:
            try:
                self._heartbeat(None, "exited", force=True)
            except Exception as e:  # noqa: BLE001 - done is written; this is only a status
                self.log.error("upload_failed", f"heartbeat: {type(e).__name__}: {e}")

    @property
    def hosts_rendezvous(self) -> bool:
        """The shepherd of a torchrun run: it hosts the store until the workers are done."""
        return self.a.role == "shepherd" and self.a.launcher == "torchrun"

    def _watch_workers(self) -> None:
        """Whether every worker of this attempt wrote a done marker with exit code 0."""
        found, _ = markers_in(self.store.scan(markers_prefix(self.a.run_id)))
        ok = {m.node for m in found if m.kind == "done" and m.attempt == self.a.attempt
              and m.succeeded}
        workers = {f"worker-{i}" for i in range(self.a.num_nodes - 1)}
        if workers and workers <= ok:
            self.workers_done = True

    def _watch_run(self) -> None:
        self.record = read_run(self.store, self.a.run_id)
        if self.record is not None:
            why = self.record.over_for(self.a.attempt)
            if why is not None:
                self.request_stop(why)

    def _note(self, text: str) -> None:
        """A line from the agent in the node's stderr.log, where `pcp logs` shows it."""
        with open(self.stderr, "a", encoding="utf-8") as f:
            f.write(f"pcp-agent: {text}\n")
        self.times.observe(force=True)


def prune(work_dir: Path, keep: int, current: str) -> None:
    """Delete local work directories of older runs, keeping the `keep` most recent."""
    try:
        runs = sorted((p for p in work_dir.iterdir() if p.is_dir() and p.name != current),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in runs[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


SOCKET_VARS = ("NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME")


def default_route_interface(route_table: str = "/proc/net/route") -> str | None:
    """The interface of the IPv4 default route (Linux), or None."""
    try:
        lines = Path(route_table).read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def socket_env(ifname: str | None, route_table: str = "/proc/net/route") -> dict[str, str]:
    """NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME for `--socket-ifname` (docs/agent.md)."""
    if not ifname:
        return {}
    name = default_route_interface(route_table) if ifname == "auto" else ifname
    return dict.fromkeys(SOCKET_VARS, name) if name else {}
