"""The shepherd agent: a long-lived daemon on the head host, one run at a time.

Commands arrive on the subscription in any order and possibly twice. The rules:
- `start` for the attempt already running: ignored. For an older attempt of the current run,
  a run this daemon already finished, a run whose record says it is over, or one past its
  deadline: ignored, with a log line.
- `start` for another run while one is running: the control plane holds one active run per
  stack, so a new start means the old run is over; the old binary is stopped (SIGTERM,
  grace, SIGKILL, done written) and the new one started.
- `stop` for the current run (this attempt or a later one): stop the binary. Any other
  stop: ignored, with a log line.
The host is never powered off; its dead-man's switch only stops the binary at the deadline
or when the run has ended elsewhere (both inside `Session`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from datetime import UTC, datetime

from pcp.agent.assignment import ShepherdSubscription
from pcp.agent.config import AgentConfig
from pcp.agent.log import Log
from pcp.agent.record import done_attempt, read_run
from pcp.agent.session import Result, Session
from pcp.agent.wandb import KeySource, adc_token, file_key, secret_manager_source
from pcp.core.messages import Assignment, ShepherdCommand
from pcp.core.ports import BlobStore

RESUBSCRIBE_SECONDS = 5.0


class Shepherd:
    def __init__(self, cfg: AgentConfig, store: BlobStore, log: Log,
                 agent_stop: threading.Event) -> None:
        assert cfg.project and cfg.stack
        self.cfg = cfg
        self.store = store
        self.log = log
        self.agent_stop = agent_stop
        self.commands: queue.Queue[ShepherdCommand] = queue.Queue()
        self.subscription = ShepherdSubscription(cfg.project, cfg.stack, self.commands, log)
        self.session: Session | None = None
        self.thread: threading.Thread | None = None
        self.finished: deque[tuple[str, int]] = deque(maxlen=100)
        self.last: Result | None = None
        self.sessions = 0

    def run(self) -> int:
        self.subscription.open()
        next_check = time.monotonic() + RESUBSCRIBE_SECONDS
        try:
            while not self.agent_stop.is_set():
                try:
                    command = self.commands.get(timeout=0.5)
                except queue.Empty:
                    command = None
                if command is not None:
                    try:
                        self.handle(command)
                    except Exception as e:  # noqa: BLE001 - one bad command must not kill us
                        self.log.error("command_failed", f"{type(e).__name__}: {e}",
                                       run_id=command.run_id)
                self.reap()
                if self.cfg.once and self.sessions and self.session is None:
                    break
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + RESUBSCRIBE_SECONDS
                    failed = self.subscription.failed()
                    if failed is not None:
                        self.log.error("subscription_failed", f"{failed}; re-subscribing")
                        self.subscription.open()
        finally:
            if self.thread is not None:
                self.thread.join()
            self.reap()
            self.subscription.close()
        return self.exit_code()

    def exit_code(self) -> int:
        """With --once: the binary's exit code (1 if it never ran); otherwise 0."""
        if not self.cfg.once or (self.agent_stop.is_set() and self.last is None):
            return 0
        if self.last is None or self.last.exit is None:
            return 1
        return self.last.exit.exit_code

    # ------------------------------------------------------------ commands

    def handle(self, cmd: ShepherdCommand) -> None:
        log = self.log.bind(run_id=cmd.run_id, attempt=cmd.attempt, action=cmd.action)
        current = self.session
        if cmd.action == "stop":
            if current is not None and current.a.run_id == cmd.run_id \
                    and cmd.attempt >= current.a.attempt:
                log.info("stop", f"stopping the binary: {cmd.reason or 'stop command'}")
                current.request_stop(f"stop command: {cmd.reason or 'no reason given'}")
            else:
                log.info("ignored", "stop for a run that is not running here")
            return
        ignored = self.refuse(cmd, current)
        if ignored is not None:
            log.info("ignored", ignored)
            return
        assert cmd.assignment is not None
        if current is not None and self.thread is not None:
            log.info("replacing", f"run {current.a.run_id} attempt {current.a.attempt} is "
                     f"over: a start arrived for run {cmd.run_id} attempt {cmd.attempt}")
            current.request_stop(f"replaced by run {cmd.run_id} attempt {cmd.attempt}")
            self.thread.join()
            self.reap()
        session = Session(cmd.assignment, self.store, self.cfg, self.log, self.agent_stop,
                          wandb_key=self.wandb_key(cmd.assignment))
        self.session = session
        self.sessions += 1
        self.thread = threading.Thread(target=self._run_session, args=(session,),
                                       name=f"session-{cmd.run_id}", daemon=True)
        self.thread.start()

    def refuse(self, cmd: ShepherdCommand, current: Session | None) -> str | None:
        """Why a start command must be ignored, or None to run it."""
        a = cmd.assignment
        assert a is not None
        if a.role != "shepherd" or a.run_id != cmd.run_id or a.attempt != cmd.attempt:
            return f"the assignment ({a.role} {a.run_id} attempt {a.attempt}) does not match"
        if self.cfg.stack and a.stack and a.stack != self.cfg.stack:
            return f"the assignment is for stack {a.stack}, this host serves {self.cfg.stack}"
        if current is not None and current.key == (cmd.run_id, cmd.attempt):
            return "this attempt is already running here"
        if current is not None and current.a.run_id == cmd.run_id \
                and current.a.attempt > cmd.attempt:
            return f"stale: attempt {current.a.attempt} is running"
        if (cmd.run_id, cmd.attempt) in self.finished:
            return "this attempt already ran here"
        if datetime.now(UTC) >= a.deadline:
            return "the run's deadline has passed"
        previous = done_attempt(self.store, cmd.run_id, "shepherd")
        if previous is not None and previous >= cmd.attempt:
            return f"the shepherd already wrote done for attempt {previous}"
        record = read_run(self.store, cmd.run_id)
        over = record.over_for(cmd.attempt) if record is not None else None
        return over

    def wandb_key(self, a: Assignment) -> KeySource:
        """The key from --wandb-key-file, else the stack's secret with the host's
        Application Default Credentials (the shepherd service account's key)."""
        if self.cfg.wandb_key_file is not None:
            path = self.cfg.wandb_key_file
            return lambda: file_key(path)
        return secret_manager_source(self.cfg.project, a.stack, adc_token)

    def _run_session(self, session: Session) -> None:
        try:
            result = session.run()
        except Exception as e:  # noqa: BLE001 - logged; the daemon carries on
            session.log.error("session_failed", f"{type(e).__name__}: {e}")
            result = Result(False, None, None)
        self.finished.append(session.key)
        self.last = result

    def reap(self) -> None:
        if self.thread is not None and not self.thread.is_alive():
            self.thread = None
            self.session = None
