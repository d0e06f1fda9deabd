"""The local stand-in for Cloud Scheduler: a thread that publishes sweep ticks.

In production Cloud Scheduler publishes `{"op": "tick"}` to `pcp-<stack>-sweep` every
`pcp:sweep_interval_minutes`; here a daemon thread does the same through the real Pub/Sub
client, so the tick reaches the sweep function by the same push subscription any other event
takes. A failed publish is logged and the next tick tries again, as a scheduler job would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from pcp.core.messages import SweepTick
from pcp.logs import log

Publish = Callable[[bytes], object]


class Ticker:
    """Publishes one sweep tick every `interval` seconds until stopped."""

    def __init__(self, publish: Publish, interval: float, *, stack: str,
                 name: str = "local-ticker") -> None:
        if interval <= 0:
            raise ValueError(f"the sweep interval must be positive, got {interval!r}")
        self.publish = publish
        self.interval = interval
        self.stack = stack
        self.name = name
        self.ticks = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Ticker:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 10)
            self._thread = None

    def tick(self) -> None:
        """Publish one tick now (also what `pcp sweep` amounts to locally)."""
        self.publish(SweepTick(requested_by=self.name).to_json())
        self.ticks += 1

    def _loop(self) -> None:
        # The first tick waits one interval, like a scheduler job created just now.
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a missed tick is retried by the next one
                self.failures += 1
                log("WARNING", "local_ticker", stack=self.stack,
                    reason=f"sweep tick not published: {type(e).__name__}: {e}")
