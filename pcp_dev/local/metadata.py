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

Every request must carry `Metadata-Flavor: Google` (403 without it, as on GCE: the header is
what stops a server-side request forgery from reading the metadata). Attributes are looked up
on every request, so a `setMetadata` on the local Compute endpoint is visible at once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pcp_dev.local.loopback import LoopbackServer

PREFIX = "/computeMetadata/v1/instance/"


class MetadataServer:
    """One VM's metadata on 127.0.0.1; `lookup()` returns its live attributes."""

    def __init__(self, lookup: Callable[[], dict[str, str]], name: str,
                 token: str | None = None) -> None:
        self.lookup = lookup
        self.name = name
        self.token = token or f"ya29.local-{name}"
        self._server: LoopbackServer | None = None

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
        if self.headers.get("Metadata-Flavor") != "Google":
            code, ctype, body = 403, "text/html", "Missing Metadata-Flavor:Google header.\n"
        else:
            code, ctype, body = self.metadata.answer(url.path, parse_qs(url.query))
        data = body.encode("utf-8")
        self.send_response(code)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a polling agent would flood the output
