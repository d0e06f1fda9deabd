"""A Secret Manager stand-in: `versions/latest:access` of Secret Manager v1, as the agent
calls it (pcp/agent/wandb.py), with the real API's rules for that one call.

- `GET /v1/projects/{project}/secrets/{secret}/versions/{version}:access`, `version` being
  `latest` or a version number; any other method 405, any other path 404.
- `Authorization: Bearer <token>` is required: none is 401 `UNAUTHENTICATED`; a token not in
  `tokens` (the metadata stand-ins' tokens of the accounts granted `secretAccessor`) is 403
  `PERMISSION_DENIED`, as for a caller without `secretmanager.versions.access`.
- A secret that does not exist, or a secret with no version (as the Pulumi program creates
  it), is 404 `NOT_FOUND`.
- The answer is an `AccessSecretVersionResponse`: `name` (with the project number, as the real
  service answers), `payload.data` (base64) and `payload.dataCrc32c` (decimal int64 string).

Errors are Google's JSON error body `{"error": {"code", "message", "status"}}`.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

from pcp_dev.local.loopback import LoopbackServer

ACCESS = re.compile(r"^/v1/projects/(?P<project>[^/]+)/secrets/(?P<secret>[^/]+)/versions/"
                    r"(?P<version>latest|[1-9][0-9]*):access$")


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


class SecretManagerStandIn:
    """Secrets of one project; `versions[secret]` lists the payloads, oldest first."""

    def __init__(self, project: str, project_number: str = "123456789012") -> None:
        self.project = project
        self.project_number = project_number
        self.versions: dict[str, list[bytes]] = {}
        self.tokens: set[str] = set()
        self.requests: list[dict[str, Any]] = []  # what was asked, for the tests
        self._lock = threading.Lock()
        self._server: LoopbackServer | None = None

    def create(self, secret: str) -> None:
        with self._lock:
            self.versions.setdefault(secret, [])

    def add_version(self, secret: str, payload: bytes) -> None:
        with self._lock:
            self.versions.setdefault(secret, []).append(payload)

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("SecretManagerStandIn is not started")
        return f"http://127.0.0.1:{self._server.port}"

    def start(self) -> SecretManagerStandIn:
        handler = type("Handler", (_Handler,), {"secrets": self})
        self._server = LoopbackServer(handler, "secret-manager")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._server = None

    def __enter__(self) -> SecretManagerStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, method: str, path: str, auth: str | None) -> tuple[int, dict[str, Any]]:
        self.requests.append({"method": method, "path": path, "authorization": auth})
        m = ACCESS.match(path)
        if m is None:
            return _error(404, "NOT_FOUND", f"The requested URL {path} was not found.")
        if method != "GET":
            return _error(405, "METHOD_NOT_ALLOWED", f"{method} is not allowed on {path}")
        if not auth or not auth.startswith("Bearer ") or not auth[len("Bearer "):]:
            return _error(401, "UNAUTHENTICATED", "Request is missing required authentication "
                          "credential. Expected OAuth 2 access token.")
        project, secret = unquote(m["project"]), unquote(m["secret"])
        name = f"projects/{project}/secrets/{secret}"
        with self._lock:
            if auth[len("Bearer "):] not in self.tokens or project not in (
                    self.project, self.project_number):
                return _error(403, "PERMISSION_DENIED", "Permission 'secretmanager.versions."
                              f"access' denied for resource '{name}/versions/{m['version']}' "
                              "(or it may not exist).")
            versions = self.versions.get(secret)
            if versions is None:
                return _error(404, "NOT_FOUND", f"Secret [{name}] not found or has no versions.")
            number = len(versions) if m["version"] == "latest" else int(m["version"])
            if not versions or number > len(versions):
                return _error(404, "NOT_FOUND",
                              f"Secret Version [{name}/versions/{m['version']}] not found.")
            data = versions[number - 1]
        return 200, {"name": f"projects/{self.project_number}/secrets/{secret}/versions/{number}",
                     "payload": {"data": base64.b64encode(data).decode(),
                                 "dataCrc32c": str(crc32c(data))}}


def _error(code: int, status: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {"error": {"code": code, "message": message, "status": status}}


class _Handler(BaseHTTPRequestHandler):
    secrets: SecretManagerStandIn
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        code, body = self.secrets.answer(self.command, urlsplit(self.path).path,
                                         self.headers.get("Authorization"))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815 - the http.server naming

    def log_message(self, format: str, *args: Any) -> None:
        pass
