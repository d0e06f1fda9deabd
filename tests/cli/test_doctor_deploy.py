"""`pcp doctor` for a deploy: Compute Engine quotas through the real REST request against a
local stand-in of `regions.get`, which credential is in use, the GitHub environment, and a
stack check that reads only what it needs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from pcp.adapters.memory import MemoryStore
from pcp.cli.config import resolve
from pcp.cli.context import CloudContext, ComputeRegions, Context, describe_credential_file
from pcp.cli.doctor import _shepherd_credentials_check

pytestmark = pytest.mark.cli
REGION_PATH = "/compute/v1/projects/real-proj/regions/europe-west4"


@dataclass
class ComputeServer:
    """Answers `GET .../regions/R` like Compute Engine: the region with its quotas."""

    quotas: list[dict[str, Any]] = field(default_factory=list)
    status: int = 200
    port: int = 0
    paths: list[str] = field(default_factory=list)


@pytest.fixture
def compute_server() -> Iterator[ComputeServer]:
    state = ComputeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            state.paths.append(self.path)
            if self.path != REGION_PATH:
                body: dict[str, Any] = {"error": {"code": 404, "message": "not found"}}
                code = 404
            elif state.status != 200:
                code = state.status
                body = {"error": {"code": code, "message": "Required 'compute.regions.get' "
                                  "permission for 'projects/real-proj/regions/europe-west4'",
                                  "errors": [{"reason": "forbidden"}]}}
            else:
                code = 200
                body = {"kind": "compute#region", "name": "europe-west4", "status": "UP",
                        "quotas": state.quotas}
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def quota(metric: str, usage: float, limit: float) -> dict[str, Any]:
    return {"metric": metric, "usage": usage, "limit": limit}


class CountingStore(MemoryStore):
    """A MemoryStore that remembers which prefixes were listed."""

    def __init__(self) -> None:
        super().__init__()
        self.listed: list[str] = []

    def list(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        return super().list(prefix)


def cloud(server: ComputeServer | None, store: MemoryStore | None = None,
          region: str | None = "europe-west4") -> Context:
    env = {"PCP_PROJECT": "real-proj", **({"PCP_REGION": region} if region else {})}
    compute = None if server is None else ComputeRegions(
        requests.Session(), f"http://127.0.0.1:{server.port}")
    return Context("tiny", store=store or MemoryStore(), config=resolve({}, env), local=False,
                   compute=compute, credentials=lambda: "test credentials")


def checks(invoke, ctx: Context) -> dict[str, dict[str, str]]:  # noqa: ANN001
    result = invoke(["doctor", "--json"], obj=ctx)
    return {c["name"]: c for c in json.loads(result.stdout)["checks"]}


def test_quotas_are_reported(invoke, compute_server: ComputeServer) -> None:  # noqa: ANN001
    compute_server.quotas = [quota("CPUS", 8, 24), quota("SSD_TOTAL_GB", 500, 2048),
                             quota("IN_USE_ADDRESSES", 1, 8), quota("INSTANCES", 3, 960),
                             quota("NVIDIA_T4_GPUS", 0, 4), quota("NVIDIA_L4_GPUS", 0, 0),
                             quota("COMMITTED_NVIDIA_T4_GPUS", 0, 0)]
    result = invoke(["doctor"], obj=cloud(compute_server))
    assert ("✓ quotas: europe-west4: CPUS 8/24, SSD_TOTAL_GB 500/2048, IN_USE_ADDRESSES 1/8, "
            "NVIDIA_L4_GPUS 0/0, NVIDIA_T4_GPUS 0/4\n") in result.stdout
    assert compute_server.paths == [REGION_PATH]


def test_no_gpu_quota_fails(invoke, compute_server: ComputeServer) -> None:  # noqa: ANN001
    compute_server.quotas = [quota("CPUS", 0, 24), quota("NVIDIA_T4_GPUS", 0, 0)]
    result = invoke(["doctor"], obj=cloud(compute_server))
    assert result.exit_code == 1
    assert "✗ quotas: europe-west4: CPUS 0/24, NVIDIA_T4_GPUS 0/0; no NVIDIA GPU quota in " \
        "this region: the GPU workers cannot start" in result.stdout


def test_a_quota_at_its_limit_fails(invoke, compute_server: ComputeServer) -> None:  # noqa: ANN001
    compute_server.quotas = [quota("CPUS", 24, 24), quota("NVIDIA_T4_GPUS", 1, 4)]
    found = checks(invoke, cloud(compute_server))["quotas"]
    assert found["state"] == "fail" and "at the limit: CPUS" in found["detail"]


def test_quotas_without_permission(invoke, compute_server: ComputeServer) -> None:  # noqa: ANN001
    compute_server.status = 403
    found = checks(invoke, cloud(compute_server))["quotas"]
    assert found["state"] == "fail"
    assert found["detail"].startswith("cannot read the quotas of europe-west4: ")
    assert "roles/compute.viewer" in found["detail"]


def test_quotas_need_a_region(invoke, compute_server: ComputeServer) -> None:  # noqa: ANN001
    found = checks(invoke, cloud(compute_server, region=None))["quotas"]
    assert found["state"] == "fail" and found["detail"].startswith("region unknown")
    assert compute_server.paths == []


def test_in_memory_and_local_stacks_have_no_quotas(stack, invoke) -> None:  # noqa: ANN001
    assert checks(invoke, stack.context)["quotas"]["state"] == "skip"
    assert checks(invoke, cloud(None))["quotas"]["state"] == "skip"


def test_doctor_reads_only_the_stack_document(invoke) -> None:  # noqa: ANN001
    store = CountingStore()
    for i in range(50):
        store.put(f"control/sweeps/2026-12-01T10:{i:02d}:00Z.json", b"{}")
    store.put("control/stack.json", json.dumps({"stack": "tiny"}).encode())
    invoke(["doctor"], obj=Context("tiny", store=store))
    assert store.listed == ["control/stack.json"]


def test_doctor_names_the_github_environment(stack, invoke) -> None:  # noqa: ANN001
    found = checks(invoke, stack.context)["github environment"]
    assert found["state"] == "skip" and found["detail"].startswith("training-tiny: ")


# ---------------------------------------------------------------- which credential


def write(path: Path, info: dict[str, Any]) -> str:
    path.write_text(json.dumps(info))
    return str(path)


def test_a_service_account_key_is_named_as_such(tmp_path: Path) -> None:
    email = "pcp-tiny-shepherd@p.iam.gserviceaccount.com"
    path = write(tmp_path / "key.json", {"type": "service_account", "client_email": email})
    text = describe_credential_file(path)
    assert text.startswith(f"a service-account key file ({path}, "
                           "pcp-tiny-shepherd@p.iam.gserviceaccount.com)")
    assert "iam.disableServiceAccountKeyCreation" in text


@pytest.mark.parametrize(("source", "origin"), [
    ({"certificate": {"certificate_config_location": "/etc/pcp/certificate_config.json"}},
     "an X.509 certificate"),
    ({"executable": {"command": "/usr/local/bin/token"}}, "an executable"),
    ({"file": "/var/run/token"}, "a file"),
    ({"url": "http://127.0.0.1/token"}, "a URL"),
])
def test_workload_identity_federation_is_named_with_its_source(
        tmp_path: Path, source: dict[str, Any], origin: str) -> None:
    path = write(tmp_path / "wif.json", {
        "type": "external_account", "credential_source": source,
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/"
                    "pcp-tiny-mac/providers/mac",
        "service_account_impersonation_url": "https://iamcredentials.googleapis.com/v1/"
        "projects/-/serviceAccounts/pcp-tiny-shepherd@p.iam.gserviceaccount.com"
        ":generateAccessToken"})
    assert describe_credential_file(path) == (
        f"workload identity federation ({path}: external_account, token from {origin}, "
        "acting as pcp-tiny-shepherd@p.iam.gserviceaccount.com); no service-account key")


def test_other_and_unreadable_files(tmp_path: Path) -> None:
    user = write(tmp_path / "adc.json", {"type": "authorized_user"})
    assert describe_credential_file(user).startswith("user credentials")
    (tmp_path / "bad.json").write_text("{")
    assert "unreadable" in describe_credential_file(str(tmp_path / "bad.json"))
    assert "unreadable" in describe_credential_file(str(tmp_path / "missing.json"))


def test_the_cli_says_which_credential_file_it_uses(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real CloudContext with a real (generated) key: google.auth loads it, and doctor's
    line says it is a key file. No request is made."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    key = write(tmp_path / "key.json", {
        "type": "service_account", "project_id": "real-proj", "private_key_id": "1",
        "private_key": pem, "client_email": "ci@real-proj.iam.gserviceaccount.com",
        "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"})
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", key)
    ctx = CloudContext(resolve({}, {"PCP_PROJECT": "real-proj"}))
    assert ctx.credentials().startswith(f"a service-account key file ({key}, "
                                        "ci@real-proj.iam.gserviceaccount.com)")


def test_the_shepherd_credentials_on_the_mac(tmp_path: Path) -> None:
    missing = _shepherd_credentials_check(str(tmp_path / "none.json"))
    assert missing.state == "skip" and "not the shepherd host" in missing.detail
    path = write(tmp_path / "shepherd-key.json", {"type": "external_account",
                                                  "credential_source": {"certificate": {}}})
    found = _shepherd_credentials_check(path)
    assert found.state == "ok"
    assert found.detail.startswith("the shepherd daemon uses workload identity federation")
