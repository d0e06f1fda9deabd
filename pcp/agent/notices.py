"""Host-maintenance and Spot-preemption notices from the metadata server (worker VMs only).

Compute Engine posts them as instance metadata values, and a guest learns of a change with a
hanging GET (`?wait_for_change=true&last_etag=E&timeout_sec=N`, header `Metadata-Flavor:
Google`), which answers once the value's ETag differs from `last_etag` or after `timeout_sec`:

- `instance/maintenance-event`: `NONE`; `MIGRATE_ON_HOST_MAINTENANCE` before a live migration
  (the VM keeps running: only logged); `TERMINATE_ON_HOST_MAINTENANCE` before the host's
  maintenance stops the VM (GPU VMs, `onHostMaintenance=TERMINATE`), reason `maintenance`.
- `instance/preempted`: `FALSE`, then `TRUE` when a Spot VM is preempted (about 30 s before it
  is stopped), reason `preempted`.

On a notice the session stops the binary (SIGTERM, then SIGKILL after the grace), uploads
what it has and writes `done` with the reason, so the run restarts as its next attempt
(docs/agent.md, "Maintenance and preemption notices"). A metadata server that cannot be
reached is retried every `retry_seconds`; the watch never ends the node on an error.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

from pcp.agent.log import Log

MAINTENANCE_EVENT = "maintenance-event"
PREEMPTED = "preempted"
#: key -> {value: the node's end reason}; other values are logged, not acted on.
NOTICES: dict[str, dict[str, str]] = {
    MAINTENANCE_EVENT: {"TERMINATE_ON_HOST_MAINTENANCE": "maintenance"},
    PREEMPTED: {"TRUE": "preempted"},
}
QUIET = {MAINTENANCE_EVENT: "NONE", PREEMPTED: "FALSE"}
WAIT_SECONDS = 60  # timeout_sec of one hanging GET


def read(host: str, key: str, etag: str | None = None, wait: int = WAIT_SECONDS,
         timeout_margin: float = 10.0) -> tuple[str, str | None]:
    """(value, ETag) of `instance/<key>`; with `etag`, waits for a change (up to `wait` s)."""
    url = f"http://{host}/computeMetadata/v1/instance/{urllib.parse.quote(key)}"
    limit = 5.0
    if etag is not None:
        url += "?" + urllib.parse.urlencode({"wait_for_change": "true", "last_etag": etag,
                                             "timeout_sec": str(wait)})
        limit = wait + timeout_margin
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    with urllib.request.urlopen(request, timeout=limit) as response:
        body: bytes = response.read()
        return body.decode("utf-8", "replace").strip(), response.headers.get("ETag")


class NoticeWatch:
    """Two threads, one per key, calling `on_notice(reason, text)` once, at the first notice."""

    def __init__(self, host: str, on_notice: Callable[[str, str], None], log: Log,
                 wait: int = WAIT_SECONDS, retry_seconds: float = 5.0) -> None:
        self.host = host
        self.on_notice = on_notice
        self.log = log
        self.wait = wait
        self.retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._done = False
        self._threads = [threading.Thread(target=self._watch, args=(key,), daemon=True,
                                          name=f"notice-{key}") for key in NOTICES]

    def start(self) -> NoticeWatch:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        """Stop watching; a GET in flight is abandoned (its thread is a daemon)."""
        self._stop.set()

    def _watch(self, key: str) -> None:
        etag: str | None = None
        last = QUIET[key]
        failures = 0
        while not self._stop.is_set():
            try:
                value, etag = read(self.host, key, etag, self.wait)
                failures = 0
            except urllib.error.HTTPError as e:
                if e.code == 404:  # not served here (not a GCE VM): nothing to watch
                    self.log.info("notice_unwatched", f"instance/{key} is not served by the "
                                  f"metadata server {self.host}; not watching it")
                    return
                failures += 1
                etag = None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                failures += 1
                etag = None
                if failures in (1, 10) or failures % 100 == 0:
                    self.log.warning("notice_watch_failed", f"instance/{key}: {e}; retrying",
                                     failures=failures)
            if failures:
                self._stop.wait(self.retry_seconds)
                continue
            if self._stop.is_set() or value == last:
                continue
            last = value
            reason = NOTICES[key].get(value)
            if reason is None:
                self.log.info("notice", f"instance/{key} is {value}: nothing to do",
                              key=key, value=value)
                continue
            self._fire(reason, f"instance/{key} is {value}")
            return

    def _fire(self, reason: str, text: str) -> None:
        with self._fired:
            if self._done or self._stop.is_set():
                return
            self._done = True
        self.log.warning("notice", text, end_reason=reason)
        self.on_notice(reason, text)
