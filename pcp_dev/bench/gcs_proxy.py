"""A counting pass-through proxy in front of fake-gcs-server.

The functions reach GCS through it (STORAGE_EMULATOR_HOST points here), so every request the
storage library really sends is counted: retries, metadata reloads and list pages included,
which a wrapper around the store port would miss. Requests are forwarded unchanged and
answers relayed whole.
"""

from __future__ import annotations

import http.client
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-connection", "content-length", "host"})
_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/[^/]+/o/.+$")
_OBJECTS = re.compile(r"^/storage/v1/b/[^/]+/o/?$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/[^/]+/o/?$")
_BUCKET = re.compile(r"^/storage/v1/b/[^/]+/?$")


def classify(method: str, target: str) -> str:
    """upload, download, metadata, list, delete, bucket, or `METHOD other`.

    `bucket` is a read of the bucket resource, which the storage library itself sends (it
    caches bucket metadata per process, and re-checks the bucket after a 404).
    """
    url = urlsplit(target)
    query = parse_qs(url.query)
    if _UPLOAD.match(url.path):
        return "upload"
    if _OBJECT.match(url.path):
        if method == "DELETE":
            return "delete"
        if method == "GET":
            return "download" if query.get("alt") == ["media"] else "metadata"
        return f"{method} object"
    if _OBJECTS.match(url.path) and method == "GET":
        return "list"
    if _BUCKET.match(url.path) and method == "GET":
        return "bucket"
    return f"{method} other"


class CountingProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "the proxy is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()

    def start(self) -> CountingProxy:
        handler = type("Handler", (_Handler,), {"proxy": self, "local": threading.local()})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name="gcs-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> CountingProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    proxy: CountingProxy
    local: Any
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.proxy.upstream_host, self.proxy.upstream_port,
                                              timeout=60)
            self.local.conn = conn
        return conn

    def _relay(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        self.proxy.count(classify(self.command, self.path))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        for attempt in (1, 2):  # a kept-alive upstream connection may have been closed
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        self.send_response(resp.status, resp.reason)
        for key, value in resp.getheaders():
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

    def log_message(self, format: str, *args: Any) -> None:
        pass
