"""A proxy in front of fake-gcs-server that holds Cloud Storage's per-object mutation limit.

Cloud Storage accepts about one update per second on each object ("There is an update limit
on each object of once per second", cloud.google.com/storage/quotas); beyond it the JSON API
answers 429 with reason `rateLimitExceeded`. fake-gcs-server has no such limit, so the local
replica, the e2e tests and `make bench` put this proxy in front of it: a create, update or
delete of an object less than `mutation_interval` seconds after the last successful one is
answered with the real error body, and never reaches fake-gcs-server. Different objects are
not limited; reads and listings never are. `mutation_interval=None` turns the limit off.

Everything else is forwarded unchanged and relayed whole, and every request the storage
library really sends is counted (retries, metadata reloads and list pages included, which a
wrapper around the store port would miss), 429s by object.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from pcp_dev.local.loopback import LoopbackServer

HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer",
                        "upgrade", "proxy-connection", "content-length", "host"})
_OBJECT = re.compile(r"^/(?:download/)?storage/v1/b/[^/]+/o/.+$")
_OBJECTS = re.compile(r"^/storage/v1/b/[^/]+/o/?$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/[^/]+/o/?$")
_BUCKET = re.compile(r"^/storage/v1/b/[^/]+/?$")
_OBJECT_PATH = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>[^/]+)"
                          r"(?:/(?P<verb>copyTo|rewriteTo)/b/(?P<dbucket>[^/]+)/o/"
                          r"(?P<dname>[^/]+)|/(?P<compose>compose))?/?$")
_UPLOAD_PATH = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o/?$")


def rate_limited_body(bucket: str, name: str) -> bytes:
    """The JSON API's answer to a mutation over the per-object rate (reason rateLimitExceeded)."""
    message = (f"The object {bucket}/{name} exceeded the rate limit for object mutation "
               "operations (create, update, and delete). Please reduce your request rate. "
               "See https://cloud.google.com/storage/docs/gcs429.")
    return json.dumps({"error": {"code": 429, "message": message, "errors": [
        {"message": message, "domain": "usageLimits", "reason": "rateLimitExceeded"}]}}).encode()


PRECONDITION_FAILED = json.dumps({"error": {"code": 412, "message": (
    "At least one of the pre-conditions you specified did not hold."), "errors": [{
        "message": "At least one of the pre-conditions you specified did not hold.",
        "domain": "global", "reason": "conditionNotMet", "locationType": "header",
        "location": "If-Match"}]}}).encode()


def mutated_object(method: str, target: str, body: bytes | None) -> tuple[str, str] | None:
    """(bucket, object) a request creates, updates or deletes; None for reads, listings and
    the continuation of a resumable upload (its initiation counted already)."""
    url = urlsplit(target)
    query = parse_qs(url.query)
    upload = _UPLOAD_PATH.match(url.path)
    if upload is not None and method == "POST":
        name = (query.get("name") or [None])[0] or _name_in_body(body)
        return (upload["bucket"], name) if name else None
    found = _OBJECT_PATH.match(url.path)
    if found is None:
        return None
    if found["verb"]:
        return unquote(found["dbucket"]), unquote(found["dname"])
    if found["compose"] and method == "POST":
        return unquote(found["bucket"]), unquote(found["name"])
    if method in ("PATCH", "PUT", "DELETE"):
        return unquote(found["bucket"]), unquote(found["name"])
    return None


def _name_in_body(body: bytes | None) -> str | None:
    """The object name in a JSON (resumable start) or multipart/related (metadata part) body."""
    if not body:
        return None
    for chunk in (body, *body.split(b"\r\n\r\n")[1:2]):
        start, end = chunk.find(b"{"), chunk.find(b"}\r\n")
        text = chunk[start:(end + 1 if end >= 0 else None)] if start >= 0 else b""
        try:
            name = json.loads(text).get("name")
        except (ValueError, AttributeError):
            continue
        if isinstance(name, str) and name:
            return name
    return None


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


class GcsProxy:
    def __init__(self, upstream: str, mutation_interval: float | None = 1.0) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.mutation_interval = mutation_interval
        self.counts: Counter[str] = Counter()
        self.limited: Counter[str] = Counter()  # 429s answered, by object name
        self.mutations: Counter[str] = Counter()  # successful mutations, by object name
        self._last_mutation: dict[tuple[str, str], float] = {}
        self._busy: set[tuple[str, str]] = set()  # mutations under way, by object
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._server: LoopbackServer | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "the proxy is not started"
        return f"http://127.0.0.1:{self._server.port}"

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.counts)

    def limited_snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.limited)

    def mutations_snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.mutations)

    def reset(self) -> None:
        with self._lock:
            self.counts.clear()
            self.limited.clear()
            self.mutations.clear()

    def admit(self, obj: tuple[str, str]) -> bool:
        """Whether a mutation of `obj` may go through now; False means it is over the limit."""
        if self.mutation_interval is None:
            return True
        with self._idle:
            # Writes of one object are applied one after another: a request that meets one
            # under way is judged once that one is done (its precondition may fail by then).
            self._idle.wait_for(lambda: obj not in self._busy, timeout=10)
            last = self._last_mutation.get(obj)
            if obj in self._busy or (last is not None and
                                     time.monotonic() - last < self.mutation_interval):
                return False
            self._busy.add(obj)
            return True

    def refused(self, obj: tuple[str, str]) -> None:
        with self._lock:
            self.limited[obj[1]] += 1
            self.counts["429"] += 1

    def done(self, obj: tuple[str, str], status: int) -> None:
        """A mutation admitted by `admit` finished; only a successful one starts the window."""
        if self.mutation_interval is None:
            return
        with self._idle:
            self._busy.discard(obj)
            if 200 <= status < 300:
                self._last_mutation[obj] = time.monotonic()
                self.mutations[obj[1]] += 1
            self._idle.notify_all()

    def start(self) -> GcsProxy:
        handler = type("Handler", (_Handler,), {"proxy": self, "local": threading.local()})
        self._server = LoopbackServer(handler, "gcs-proxy")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def __enter__(self) -> GcsProxy:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    proxy: GcsProxy
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
        obj = mutated_object(self.command, self.path, body)
        if obj is not None and not self.proxy.admit(obj):
            json_type = [("Content-Type", "application/json; charset=UTF-8")]
            if self._precondition_fails(obj):
                # It would change nothing: answered as a failed precondition, not counted
                # against the limit (an assumption: the order of the two checks in Cloud
                # Storage is not documented; docs/local-replica.md).
                self._answer(412, "Precondition Failed", PRECONDITION_FAILED, json_type)
                return
            self.proxy.refused(obj)
            self._answer(429, "Too Many Requests", rate_limited_body(*obj), json_type)
            return
        status = 599  # what a forward that raised counts as
        try:
            status, reason, data, resp_headers = self._forward(body)
        finally:
            if obj is not None:
                self.proxy.done(obj, status)
        self._answer(status, reason, data, resp_headers)

    def _precondition_fails(self, obj: tuple[str, str]) -> bool:
        """Whether the request's ifGenerationMatch no longer holds for the object."""
        wanted = parse_qs(urlsplit(self.path).query).get("ifGenerationMatch")
        if not wanted:
            return False
        conn = self._upstream()
        try:
            conn.request("GET", f"/storage/v1/b/{quote(obj[0], safe='')}/o/"
                                f"{quote(obj[1], safe='')}")
            resp = conn.getresponse()
            data = resp.read()
        except (http.client.HTTPException, OSError):
            conn.close()
            self.local.conn = None
            return False
        current = "0" if resp.status == 404 else str(json.loads(data).get("generation", ""))
        return current != wanted[0]

    def _forward(self, body: bytes | None) -> tuple[int, str, bytes, list[tuple[str, str]]]:
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
        return resp.status, resp.reason, data, resp.getheaders()

    def _answer(self, status: int, reason: str, data: bytes,
                headers: list[tuple[str, str]]) -> None:
        self.send_response(status, reason)
        for key, value in headers:
            if key.lower() not in HOP_BY_HOP:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _relay

    def log_message(self, format: str, *args: Any) -> None:
        pass
