"""Periodic tasks in one loop, each tick's failure isolated (the skylet pattern).

A failed log upload must not stop the heartbeat, the run-record watch or the deadline
check: each task catches its own exception, logs it and runs again at its next due time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from pcp.agent.log import Log


@dataclass
class Task:
    name: str
    interval: float
    fn: Callable[[], object]
    next_at: float = 0.0  # run on the first tick
    failures: int = 0


class Ticker:
    def __init__(self, tasks: list[Task], log: Log,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tasks = tasks
        self.log = log
        self.clock = clock

    def tick(self) -> None:
        """Run every task that is due; a failing task is logged and retried next interval."""
        now = self.clock()
        for task in self.tasks:
            if task.interval <= 0 or now < task.next_at:
                continue
            task.next_at = now + task.interval
            try:
                task.fn()
                task.failures = 0
            except Exception as e:  # noqa: BLE001 - isolation is the point of the ticker
                task.failures += 1
                self.log.warning("task_failed", f"{task.name}: {type(e).__name__}: {e}",
                                 task=task.name, failures=task.failures)
