"""The BlobStore port over a GCS bucket (google-cloud-storage).

Compare-and-swap is an upload with `if_generation_match`; GCS answers a lost race with 412,
which becomes `Conflict` so the service re-reads and decides again.

Retries: uploads default to the library's `DEFAULT_RETRY` (429, 5xx, connection errors and
timeouts, with backoff). For a conditional put that is safe: a replayed request can never
overwrite a newer generation, because the precondition still guards it. The one ambiguity
is a request that succeeded while its response was lost: the replay then fails with 412 and
we report `Conflict`; the caller re-reads, sees its own write, and decides again from there
(decisions are idempotent, commands are re-issued level-triggered). An unconditional put is
last-writer-wins anyway, so replaying it changes nothing the caller could rely on. Errors
left after the retries propagate, so the trigger redelivers the event.

Every 429 the library is about to retry on an object write (Cloud Storage's limit of about
one update per second per object: `rateLimitExceeded`) is logged as one WARNING line with the
stable fields `throttled=true`, `http_status=429` and `object`, so the log-based metric
`storage-429s` counts them (docs/architecture.md, "Log lines and metrics").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from google.api_core import retry as api_retry
from google.api_core.exceptions import NotFound, PreconditionFailed
from google.cloud import storage
from google.cloud.storage.retry import DEFAULT_RETRY

from pcp.core.errors import Conflict
from pcp.core.ports import Blob, Listed
from pcp.logs import log


def http_status(exc: BaseException) -> int | None:
    """The HTTP status of an error the storage library retries: an api_core error (`code`) or
    an upload's `InvalidResponse` (`response.status_code`)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


class GcsStore:
    """Objects in one bucket. The client is built on first use, never at import time."""

    def __init__(self, bucket: str, client: storage.Client | None = None,
                 project: str | None = None, stack: str = "-", *,
                 read_limits: Mapping[str, Any] | None = None) -> None:
        self.bucket_name = bucket
        self.stack = stack
        self._client = client
        self._project = project
        self._bucket: storage.Bucket | None = None
        self._lock = threading.Lock()
        # `timeout` and `retry` for reads (get, list, scan); the library's defaults (60 s a
        # request, retried for up to 120 s) unless given: a reader a person watches (the CLI)
        # wants to hear of an unreachable bucket in seconds.
        self.read_limits = dict(read_limits or {})

    def with_read_limits(self, **limits: Any) -> GcsStore:
        """The same bucket and client, reads bounded by `limits` (`timeout`, `retry`)."""
        other = GcsStore(self.bucket_name, self._client, self._project, self.stack,
                         read_limits=limits)
        other._bucket = self._bucket
        return other

    @property
    def bucket(self) -> storage.Bucket:
        with self._lock:
            if self._bucket is None:
                if self._client is None:
                    # Honours STORAGE_EMULATOR_HOST, which is how the local replica's functions
                    # reach fake-gcs-server; otherwise Application Default Credentials.
                    self._client = storage.Client(project=self._project)
                self._bucket = self._client.bucket(self.bucket_name)
            return self._bucket

    def get(self, name: str) -> Blob | None:
        # One request: the media download carries the generation in x-goog-generation, so
        # data and generation always belong together (a metadata read first could race).
        blob = self.bucket.blob(name)
        try:
            data = blob.download_as_bytes(**self.read_limits)
        except NotFound:
            return None
        if blob.generation is None:  # a server that omits the header: ask for it
            blob.reload(**self.read_limits)
        return Blob(data, int(blob.generation))

    def put(self, name: str, data: bytes, *, if_generation_match: int | None = None,
            content_type: str = "application/json",
            metadata: Mapping[str, str] | None = None) -> int:
        blob = self.bucket.blob(name)
        if metadata:
            blob.metadata = dict(metadata)
        try:
            blob.upload_from_string(data, content_type=content_type,
                                    if_generation_match=if_generation_match,
                                    retry=self._write_retry(name))
        except PreconditionFailed as exc:
            raise Conflict(f"gs://{self.bucket_name}/{name}: generation is not "
                           f"{if_generation_match}") from exc
        return int(blob.generation)

    def _write_retry(self, name: str) -> api_retry.Retry:
        """The library's default retry of a write, logging each 429 it is about to retry."""
        retryable = DEFAULT_RETRY._predicate  # noqa: SLF001 - the library's own predicate

        def predicate(exc: Exception) -> bool:
            again = bool(retryable(exc))
            if again and http_status(exc) == 429:
                log("WARNING", "storage", stack=self.stack,
                    reason=f"429 rateLimitExceeded writing gs://{self.bucket_name}/{name} "
                           "(about one update per second per object); retrying with backoff",
                    throttled=True, http_status=429, object=name)
            return again

        return DEFAULT_RETRY.with_predicate(predicate)

    def list(self, prefix: str) -> list[str]:
        client = self.bucket.client
        return sorted(b.name for b in client.list_blobs(self.bucket, prefix=prefix,
                                                          **self.read_limits))

    def scan(self, prefix: str) -> list[Listed]:
        client = self.bucket.client
        found = [Listed(b.name, int(b.generation or 0), dict(b.metadata or {}))
                 for b in client.list_blobs(self.bucket, prefix=prefix, **self.read_limits)]
        return sorted(found, key=lambda x: x.name)
