"""Resolve an image tag to its digest through the registry HTTP API v2 (OCI distribution).

`HEAD /v2/<repository>/manifests/<tag>` answers with the manifest's digest in
`Docker-Content-Digest`. A registry that wants a token answers 401 with
`WWW-Authenticate: Bearer realm=...,service=...,scope=...`; the token comes from the realm,
with the caller's Google access token as the password of user `oauth2accesstoken` when the
registry is Google's (Artifact Registry, Container Registry) and anonymously otherwise, so a
Google token is never sent to anyone else. A registry on the loopback address is spoken to
over plain HTTP (the local replica and the tests); every other one over HTTPS with its
certificate verified.

A refusal that cannot change by retrying (no such repository or tag, access denied) is a
`PermanentError`; anything else (the network, a 5xx) is a `RegistryUnavailable`, which the
function lets propagate so that Pub/Sub redelivers the request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from email.message import Message

from pcp.core.errors import PermanentError
from pcp.core.images import DIGEST_RE, ImageRef

#: Every manifest type a node's engine can pull: a multi-platform index resolves to the
#: index's digest (the engine picks the platform), a single manifest to its own.
ACCEPT = ", ".join((
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
))
CHALLENGE_RE = re.compile(r'([a-zA-Z_]+)="([^"]*)"')
TOKEN_USER = "oauth2accesstoken"


class RegistryUnavailable(Exception):
    """The registry could not be asked (network, 5xx, throttled): worth a retry."""


def base_url(ref: ImageRef) -> str:
    return f"{'http' if ref.loopback else 'https'}://{ref.registry}"


def _manifest_url(ref: ImageRef) -> str:
    return (f"{base_url(ref)}/v2/{ref.repository}/manifests/"
            f"{urllib.parse.quote(ref.tag or 'latest')}")


def _bearer_challenge(headers: Message) -> dict[str, str] | None:
    value = headers.get("WWW-Authenticate", "")
    if not value.lower().startswith("bearer "):
        return None
    return {k.lower(): v for k, v in CHALLENGE_RE.findall(value)}


def _open(req: urllib.request.Request, timeout: float) -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read() if e.fp is not None else b""
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RegistryUnavailable(f"{req.full_url}: {e}") from None


def _token(ref: ImageRef, challenge: dict[str, str], google_token: Callable[[], str] | None,
           timeout: float) -> str:
    realm = challenge.get("realm", "")
    parsed = urllib.parse.urlsplit(realm)
    realm_ref = ImageRef(parsed.netloc, "x")
    if parsed.scheme != "https" and not (parsed.scheme == "http" and realm_ref.loopback):
        raise PermanentError(f"registry {ref.registry} names a token service {realm!r} "
                             "that is not HTTPS")
    query = {k: challenge[k] for k in ("service", "scope") if k in challenge}
    query.setdefault("scope", f"repository:{ref.repository}:pull")
    req = urllib.request.Request(f"{realm}?{urllib.parse.urlencode(query)}")
    if ref.google and google_token is not None and realm_ref.google:
        secret = base64.b64encode(f"{TOKEN_USER}:{google_token()}".encode()).decode()
        req.add_header("Authorization", f"Basic {secret}")
    status, _, body = _open(req, timeout)
    if status in (401, 403):
        raise PermanentError(_denied(ref, status))
    if status != 200:
        raise RegistryUnavailable(f"token service of {ref.registry} answered HTTP {status}")
    try:
        answer = json.loads(body)
        return str(answer.get("token") or answer["access_token"])
    except (ValueError, KeyError, AttributeError, TypeError):
        raise RegistryUnavailable(f"token service of {ref.registry} gave no token") from None


def _denied(ref: ImageRef, status: int) -> str:
    who = ("grant the functions' service account roles/artifactregistry.reader on the "
           "repository" if ref.google else "the registry allows no anonymous pull of it")
    return f"image {ref}: registry {ref.registry} refused access (HTTP {status}): {who}"


def resolve_digest(ref: ImageRef, google_token: Callable[[], str] | None = None,
                   timeout: float = 20.0) -> str:
    """The digest (sha256:HEX) the registry has for `ref`'s tag now."""
    if ref.digest is not None:
        return ref.digest
    url = _manifest_url(ref)
    auth: str | None = None
    for method in ("HEAD", "GET"):  # GET: a registry that sends no digest on HEAD
        for _ in range(2):
            req = urllib.request.Request(url, method=method, headers={"Accept": ACCEPT})
            if auth:
                req.add_header("Authorization", auth)
            status, headers, body = _open(req, timeout)
            challenge = _bearer_challenge(headers) if status == 401 and auth is None else None
            if challenge is None:
                break
            auth = f"Bearer {_token(ref, challenge, google_token, timeout)}"
        if status == 404:
            raise PermanentError(f"image {ref}: the registry has no such repository or tag "
                                 f"(HEAD {url} answered 404)")
        if status in (401, 403):
            raise PermanentError(_denied(ref, status))
        if status != 200:
            raise RegistryUnavailable(f"{method} {url} answered HTTP {status}")
        digest = headers.get("Docker-Content-Digest", "")
        if DIGEST_RE.match(digest):
            return digest
        if method == "GET" and body:
            return "sha256:" + hashlib.sha256(body).hexdigest()
    raise RegistryUnavailable(f"{url} gave no sha256 digest")
