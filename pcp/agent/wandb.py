"""wandb for the binary: the environment, and the API key from Secret Manager.

A run that names a wandb project (its request, or the stack's `pcp:wandb_project`) gives the
binary WANDB_PROJECT, WANDB_ENTITY (when known), WANDB_RUN_GROUP (the run id: one group per
run, one wandb run per node), WANDB_NAME (`<run id>-<node>`), WANDB_DIR (the node's output
directory, so an offline run directory is uploaded with the outputs) and WANDB_API_KEY.

The key lives in the stack's Secret Manager secret `pcp-<stack>-wandb-api-key` (created empty
by the Pulumi program, filled by a person, readable only by the nodes' service accounts). A
worker reads it with the REST call every client makes,
`GET https://secretmanager.googleapis.com/v1/projects/P/secrets/S/versions/latest:access`,
authorised by its service account's token from the metadata server; the shepherd host (no
metadata server) uses its Application Default Credentials, or `--wandb-key-file`.
`PCP_SECRETMANAGER_ENDPOINT` points the call elsewhere (the tests' stand-in).

The key goes only into the binary's environment: never into a log line, a label, a marker or
the bucket (tests/agent/test_wandb.py scans everything the agent writes for it). A key that
cannot be read is logged (without it) and the binary runs without WANDB_API_KEY: wandb then
fails or runs offline on its own terms; the training is not refused for its dashboard.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pcp.agent.assignment import Metadata, MetadataError
from pcp.agent.log import Log
from pcp.core.messages import Assignment
from pcp.core.names import Names

DEFAULT_ENDPOINT = "https://secretmanager.googleapis.com"
TOKEN_PATH = "/computeMetadata/v1/instance/service-accounts/default/token"
MAX_KEY_BYTES = 4096


class SecretError(Exception):
    """The key could not be read; the message never holds the key."""


def metadata_token(metadata: Metadata) -> str:
    """The VM's service-account access token, as every Google client on GCE gets it."""
    url = f"http://{metadata.host}{TOKEN_PATH}"
    request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=metadata.timeout) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as e:
        raise SecretError(f"no access token from the metadata server {metadata.host}: "
                          f"{e}") from None
    token = body.get("access_token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise SecretError(f"the metadata server {metadata.host} gave no access_token")
    return token


def adc_token() -> str:
    """An access token from Application Default Credentials (the shepherd host's key)."""
    try:
        import google.auth
        import google.auth.transport.requests

        credentials, _ = google.auth.default(
            scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
    except Exception as e:  # noqa: BLE001 - any failure means: no key
        raise SecretError(f"no access token from Application Default Credentials: "
                          f"{type(e).__name__}") from None
    return str(credentials.token)


def access_secret(project: str, secret: str, token: str, endpoint: str | None = None,
                  timeout: float = 10.0) -> str:
    """The latest version of a secret, as text (`versions/latest:access`, Secret Manager v1)."""
    base = (endpoint or os.environ.get("PCP_SECRETMANAGER_ENDPOINT") or DEFAULT_ENDPOINT)
    path = (f"/v1/projects/{urllib.parse.quote(project, safe='')}/secrets/"
            f"{urllib.parse.quote(secret, safe='')}/versions/latest:access")
    request = urllib.request.Request(base.rstrip("/") + path, method="GET", headers={
        "Authorization": f"Bearer {token}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as e:
        status = _error_status(e)
        hint = {404: "the secret or its version does not exist: add the key with "
                     f"`gcloud secrets versions add {secret} --project {project} "
                     "--data-file=-`",
                403: "this node's service account may not read the secret"}.get(e.code, "")
        raise SecretError(f"Secret Manager answered {e.code} {status} for {secret}"
                          + (f": {hint}" if hint else "")) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as e:
        raise SecretError(f"Secret Manager unreachable for {secret}: {e}") from None
    payload = body.get("payload") if isinstance(body, dict) else None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, str):
        raise SecretError(f"Secret Manager's answer for {secret} has no payload.data")
    try:
        raw = base64.b64decode(data, validate=True)
    except ValueError:
        raise SecretError(f"the payload of {secret} is not base64") from None
    crc = payload.get("dataCrc32c") if isinstance(payload, dict) else None
    if crc is not None and str(crc) != str(_crc32c(raw)):
        raise SecretError(f"the payload of {secret} fails its dataCrc32c check")
    return _key_text(raw, secret)


def _crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected 0x82F63B78), the checksum Secret Manager sends."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _key_text(raw: bytes, where: str) -> str:
    if len(raw) > MAX_KEY_BYTES:
        raise SecretError(f"the key in {where} is longer than {MAX_KEY_BYTES} bytes")
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SecretError(f"the key in {where} is not ASCII text") from None
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise SecretError(f"the key in {where} is empty or holds spaces or control characters")
    return key


def _error_status(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
        return str(body["error"]["status"])
    except Exception:  # noqa: BLE001 - only for the message
        return ""


def file_key(path: Path) -> str:
    try:
        return _key_text(path.read_bytes(), str(path))
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror}") from None


KeySource = Callable[[], str]


def secret_manager_source(project: str | None, stack: str, token: Callable[[], str]) -> KeySource:
    def read() -> str:
        if not project:
            raise SecretError("the project is unknown, so the key's secret cannot be named")
        return access_secret(project, Names(stack).wandb_secret, token())
    return read


def wandb_env(a: Assignment, output_dir: str, key: KeySource | None, log: Log) -> dict[str, str]:
    """The binary's wandb variables; {} when the run names no wandb project."""
    if not a.wandb_project:
        return {}
    env = {"WANDB_PROJECT": a.wandb_project, "WANDB_RUN_GROUP": a.run_id,
           "WANDB_NAME": f"{a.run_id}-{a.node}", "WANDB_DIR": output_dir}
    if a.wandb_entity:
        env["WANDB_ENTITY"] = a.wandb_entity
    if key is None:
        log.warning("wandb_key_missing", "no source for the wandb API key on this node; "
                    "the binary runs without WANDB_API_KEY")
        return env
    try:
        env["WANDB_API_KEY"] = key()
    except SecretError as e:
        log.warning("wandb_key_missing", f"{e}; the binary runs without WANDB_API_KEY")
    except MetadataError as e:
        log.warning("wandb_key_missing", f"{e}; the binary runs without WANDB_API_KEY")
    else:
        log.info("wandb", f"project {a.wandb_project}, group {a.run_id} (key read)")
    return env
