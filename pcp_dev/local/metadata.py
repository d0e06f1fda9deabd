"""A GCE metadata server stand-in for one local "VM": what the node agent reads at boot.

The agent reaches it through `GCE_METADATA_HOST=127.0.0.1:PORT` (`MetadataServer.host`), the
same variable the Google libraries honour, so its production code path reads the assignment.
Served, as GCE serves them:

- `/computeMetadata/v1/instance/name`: the VM name;
- `/computeMetadata/v1/instance/attributes/<key>`: one attribute's value, 404 when missing;
- `/computeMetadata/v1/instance/attributes/?recursive=true`: every attribute as JSON (without
  `recursive`, the keys one per line);
- `/computeMetadata/v1/instance/service-accounts/default/token`: the VM's access token
  (`{"access_token", "expires_in", "token_type": "Bearer"}`), `token` below, which a local
  stand-in of a Google API (the Secret Manager one in the wandb tests) accepts.

- `/computeMetadata/v1/instance/maintenance-event` (`NONE`, `MIGRATE_ON_HOST_MAINTENANCE`,
  `TERMINATE_ON_HOST_MAINTENANCE`) and `/computeMetadata/v1/instance/preempted` (`FALSE`,
  `TRUE`), each with an `ETag` header and the server's change notification: with
  `?wait_for_change=true` the GET hangs until the value's ETag differs from `last_etag` (or,
  without one, from the current value) or `timeout_sec` seconds have passed, then answers the
  current value. The replica posts a notice with `notify(key, value)` (or, from another
  process, `POST /pcp-local/notice/<key>` with the value as the body: `pcp local maintenance`
  and `pcp local preempt`); `reset()` clears both when the VM boots again, as a new host does.

Every request must carry `Metadata-Flavor: Google` (403 without it, as on GCE: the header is
what stops a server-side request forgery from reading the metadata). Attributes are looked up
on every request, so a `setMetadata` on the local Compute endpoint is visible at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pcp_dev.local.loopback import LoopbackServer

PREFIX = "/computeMetadata/v1/instance/"
NOTICE_PREFIX = "/pcp-local/notice/"
#: The notice keys, their quiet value and every value Compute Engine documents for them.
NOTICE_VALUES = {
    "maintenance-event": ("NONE", ("NONE", "MIGRATE_ON_HOST_MAINTENANCE",
                                   "TERMINATE_ON_HOST_MAINTENANCE")),
    "preempted": ("FALSE", ("FALSE", "TRUE")),
}
MAX_TIMEOUT_SEC = 3600


def etag(value: str) -> str:
    """An opaque tag of the value, as the real server's (it changes when the value does)."""
    return hashlib.sha256(value.encode()).hexdigest()[:16]


class MetadataServer:
    """One VM's metadata on 127.0.0.1; `lookup()` returns its live attributes."""

    def __init__(self, lookup: Callable[[], dict[str, str]], name: str,
                 on_notice: Callable[[str, str], None] | None = None,
                 token: str | None = None) -> None:
        self.lookup = lookup
        self.name = name
        self.on_notice = on_notice  # called after a notice is posted (the replica acts on it)
        self.token = token or f"ya29.local-{name}"
        self._server: LoopbackServer | None = None
        self._notices = {k: quiet for k, (quiet, _) in NOTICE_VALUES.items()}
        self._changed = threading.Condition()
        self._closing = False

    def notify(self, key: str, value: str) -> None:
        """Post a notice, as Compute Engine does before maintenance or a preemption."""
        if key not in NOTICE_VALUES or value not in NOTICE_VALUES[key][1]:
            raise ValueError(f"instance/{key} cannot be {value!r}: use one of "
                             f"{', '.join(NOTICE_VALUES.get(key, ('?', ()))[1])}")
        with self._changed:
            self._notices[key] = value
            self._changed.notify_all()
        if self.on_notice is not None:
            self.on_notice(key, value)

    def reset(self) -> None:
        """Both keys quiet again (the VM booted anew)."""
        with self._changed:
            self._notices = {k: quiet for k, (quiet, _) in NOTICE_VALUES.items()}
            self._changed.notify_all()

    def notice(self, key: str) -> str:
        with self._changed:
            return self._notices[key]

    def wait_notice(self, key: str, query: dict[str, list[str]]) -> tuple[int, str, str, str]:
        """(status, content type, body, ETag) for a GET of instance/<key>, hanging per the
        wait_for_change, last_etag and timeout_sec parameters."""
        wait = query.get("wait_for_change", [""])[0].lower() == "true"
        raw = query.get("timeout_sec", [""])[0]
        if raw and (not raw.isdigit() or not 0 < int(raw) <= MAX_TIMEOUT_SEC):
            return 400, "text/html", f"Invalid timeout_sec {raw!r}\n", ""
        timeout = float(raw) if raw else float(MAX_TIMEOUT_SEC)
        with self._changed:
            value = self._notices[key]
            if wait:
                last = query.get("last_etag", [etag(value)])[0]
                until = time.monotonic() + timeout
                while (etag(self._notices[key]) == last and not self._closing
                       and time.monotonic() < until):
                    self._changed.wait(min(0.5, max(0.0, until - time.monotonic())))
                value = self._notices[key]
        return 200, "application/text", value, etag(value)

    @property
    def host(self) -> str:
        """`127.0.0.1:PORT`, the value for GCE_METADATA_HOST."""
        if self._server is None:
            raise RuntimeError("MetadataServer is not started")
        return f"127.0.0.1:{self._server.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> MetadataServer:
        handler = type("Handler", (_Handler,), {"metadata": self})
        self._server = LoopbackServer(handler, f"metadata-{self.name}")
        return self

    def stop(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        if self._server is not None:
            self._server.close()
        self._server = None

    def __enter__(self) -> MetadataServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def answer(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        """(status, content type, body) for a GET of `path`."""
        if path == PREFIX + "name":
            return 200, "application/text", self.name
        if path == PREFIX + "service-accounts/default/token":
            return 200, "application/json", json.dumps(
                {"access_token": self.token, "expires_in": 3599, "token_type": "Bearer"})
        if not path.startswith(PREFIX + "attributes/"):
            return 404, "text/html", "Not Found"
        try:
            attributes = self.lookup()
        except KeyError:
            return 404, "text/html", "Not Found"  # the VM is gone
        key = unquote(path[len(PREFIX + "attributes/"):])
        if key == "":
            if query.get("recursive", [""])[0].lower() == "true":
                return 200, "application/json", json.dumps(attributes)
            return 200, "application/text", "".join(f"{k}\n" for k in sorted(attributes))
        if key not in attributes:
            return 404, "text/html", "Not Found"
        return 200, "application/text", attributes[key]


class _Handler(BaseHTTPRequestHandler):
    metadata: MetadataServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # the http.server naming
        url = urlsplit(self.path)
        tag = ""
        key = url.path[len(PREFIX):] if url.path.startswith(PREFIX) else ""
        if self.headers.get("Metadata-Flavor") != "Google":
            code, ctype, body = 403, "text/html", "Missing Metadata-Flavor:Google header.\n"
        elif key in NOTICE_VALUES:
            code, ctype, body, tag = self.metadata.wait_notice(key, parse_qs(url.query))
        else:
            code, ctype, body = self.metadata.answer(url.path, parse_qs(url.query))
        self._send(code, ctype, body, tag)

    def do_POST(self) -> None:
        """The replica's own control path (no such path on GCE): post a notice."""
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        value = self.rfile.read(length).decode("utf-8", "replace").strip() if length else ""
        key = url.path[len(NOTICE_PREFIX):] if url.path.startswith(NOTICE_PREFIX) else None
        if key is None:
            self._send(404, "text/html", "Not Found")
            return
        try:
            self.metadata.notify(key, value)
        except ValueError as e:
            self._send(400, "text/plain", f"{e}\n")
            return
        self._send(200, "text/plain", f"instance/{key} is {value}\n")

    def _send(self, code: int, ctype: str, body: str, tag: str = "") -> None:
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", ctype)
        if tag:
            self.send_header("ETag", tag)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a polling agent would flood the output
