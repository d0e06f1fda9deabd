"""The worker agent: one assignment per boot, then the dead-man's switch powers the VM off.

The VM is persistent, so its metadata may still hold the assignment of a run that is long
over when someone starts it by hand. The agent therefore runs an assignment only if its
deadline is ahead, its run is not over and this node has not written `done` for it yet;
otherwise the VM "booted with no current run" and powers off after a short grace (during
which a fresh assignment is still picked up). SIGTERM (a VM stop) ends the binary, writes
`done` and exits without powering off: whoever sent it owns the machine's fate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from pcp.agent.assignment import Metadata, MetadataError
from pcp.agent.config import AgentConfig
from pcp.agent.deadman import power_off, power_off_at, record_power_off
from pcp.agent.log import Log
from pcp.agent.record import done_attempt, read_run
from pcp.agent.session import Session
from pcp.agent.wandb import KeySource, file_key, metadata_token, secret_manager_source
from pcp.core.errors import PermanentError
from pcp.core.messages import Assignment
from pcp.core.names import ASSIGNMENT_KEY, META_BUCKET, META_GPU_COUNT, META_PROJECT, META_STACK
from pcp.core.ports import BlobStore

StoreFactory = Callable[[str, str | None], BlobStore]


def fetch(metadata: Metadata) -> tuple[Assignment | None, str]:
    """The current assignment, or None and why there is none."""
    try:
        raw = metadata.attribute(ASSIGNMENT_KEY)
    except MetadataError as e:
        return None, str(e)
    if raw is None or not raw.strip():
        return None, f"no {ASSIGNMENT_KEY} in instance metadata"
    try:
        a = Assignment.from_json(raw)
    except PermanentError as e:
        return None, f"{ASSIGNMENT_KEY} is unusable: {e}"
    if a.role != "worker":
        return None, f"{ASSIGNMENT_KEY} is for role {a.role}, not a worker"
    if datetime.now(UTC) >= a.deadline:
        return None, f"the assignment for run {a.run_id} is past its deadline"
    return a, ""


#: Done reasons after which Compute Engine stops the VM itself (docs/agent.md).
NOTICE_REASONS = frozenset({"maintenance", "preempted"})

class Worker:
    def __init__(self, cfg: AgentConfig, metadata: Metadata, make_store: StoreFactory,
                 log: Log, agent_stop: threading.Event) -> None:
        self.cfg = cfg
        self.metadata = metadata
        self.make_store = make_store
        self.log = log
        self.agent_stop = agent_stop

    def run(self) -> int:
        """Never raises: an unexpected error ends in a power-off, not in an idle VM."""
        try:
            return self._run()
        except Exception as e:  # noqa: BLE001 - the dead-man's switch must still fire
            self.log.error("agent_failed", f"{type(e).__name__}: {e}")
            if self.agent_stop.is_set():
                return 1
            self.power_off("the agent failed; powering off rather than idling")
            return 1

    def _run(self) -> int:
        self.resolve()
        a = self.wait_for_assignment()
        if a is None:
            return 0 if self.agent_stop.is_set() else self.power_off("no current run")
        log = self.log.bind(run_id=a.run_id, node=a.node, attempt=a.attempt)
        bucket = self.cfg.bucket or self.cfg.default_bucket()
        if not bucket:
            log.error("no_bucket", "neither --bucket nor pcp-bucket metadata names the bucket")
            return self.power_off("the stack bucket is unknown, so nothing can be reported")
        store = self.make_store(bucket, self.cfg.project)
        previous = done_attempt(store, a.run_id, a.node)
        record = read_run(store, a.run_id)
        over = record.over_for(a.attempt) if record is not None else None
        if previous is not None and previous >= a.attempt:
            log.info("already_done", f"{a.node} already wrote done for attempt {previous}")
        elif over is not None:
            log.info("run_over", f"not starting: {over}")
        else:
            result = Session(a, store, self.cfg, log, self.agent_stop,
                             gpus=self._meta(META_GPU_COUNT), notices_host=self.metadata.host,
                             wandb_key=self.wandb_key(a)).run()
            if result.end_reason in NOTICE_REASONS and not self.agent_stop.is_set():
                # Compute Engine stops this VM anyway: taking the next attempt here would
                # have it killed mid-boot. The VM goes down now, and the control plane
                # starts it again for the next attempt on a fresh boot.
                return self.power_off(f"a {result.end_reason} notice: this VM is going down; "
                                      "the next attempt starts on a fresh boot", log)
        if self.agent_stop.is_set():
            log.info("agent_exit", "SIGTERM: leaving the VM to whoever stops it")
            return 0
        return self.dead_man(a, store, log)

    def wandb_key(self, a: Assignment) -> KeySource:
        """The key from --wandb-key-file, else the stack's secret with this VM's token."""
        if self.cfg.wandb_key_file is not None:
            path = self.cfg.wandb_key_file
            return lambda: file_key(path)
        return secret_manager_source(self.cfg.project, a.stack,
                                     lambda: metadata_token(self.metadata))

    def resolve(self) -> None:
        """Fill bucket, stack and project from metadata where no flag gave them."""
        cfg = self.cfg
        self.cfg = replace(cfg, bucket=cfg.bucket or self._meta(META_BUCKET),
                           stack=cfg.stack or self._meta(META_STACK),
                           project=cfg.project or self._meta(META_PROJECT))
        if self.cfg.stack and not self.log.stack:
            self.log = self.log.bind(stack=self.cfg.stack)

    def wait_for_assignment(self) -> Assignment | None:
        """Poll the metadata for a current assignment for up to `boot_grace` seconds."""
        start, why = time.monotonic(), ""
        while not self.agent_stop.is_set():
            a, why = fetch(self.metadata)
            if a is not None:
                self.log.info("assignment", f"run {a.run_id} attempt {a.attempt} as {a.node}")
                return a
            waited = time.monotonic() - start
            if waited >= self.cfg.boot_grace:
                break
            self.log.info("no_assignment", f"{why}; re-checking ({waited:.0f} s of "
                          f"{self.cfg.boot_grace:g} s)")
            self.agent_stop.wait(min(self.cfg.poll_interval, self.cfg.boot_grace - waited))
        self.log.warning("no_current_run", f"VM booted with no current run: {why}")
        return None

    def dead_man(self, a: Assignment, store: BlobStore, log: Log) -> int:
        """Power off now, or when the keep-alive lease or the deadline ends."""
        while True:
            try:
                record = read_run(store, a.run_id)
            except Exception as e:  # noqa: BLE001 - storage trouble must not keep the VM up
                log.warning("record_unreadable", f"{type(e).__name__}: {e}")
                record = None
            when, why = power_off_at(a, record, datetime.now(UTC))
            if datetime.now(UTC) >= when:
                record_power_off(store, a, why, datetime.now(UTC), log)
                return self.power_off(why, log)
            wait = min(self.cfg.poll_interval, (when - datetime.now(UTC)).total_seconds())
            if self.agent_stop.wait(max(wait, 0.0)):
                log.info("agent_exit", "SIGTERM while kept alive: exiting")
                return 0

    def power_off(self, why: str, log: Log | None = None) -> int:
        return power_off(list(self.cfg.poweroff), why, log or self.log, console=self.cfg.console)

    def _meta(self, key: str) -> str | None:
        try:
            value = self.metadata.attribute(key)
        except MetadataError as e:
            self.log.warning("metadata_unreadable", str(e))
            return None
        return value.strip() if value and value.strip() else None
