"""Cold start of functions/main.py: settings checked at import, no heavy import, no output.

A missing variable must fail the deployment's first request with its name, not a later event
with a KeyError; and the marker and start functions must not pay 1.5 s for compute_v1 before
they know they need it. (Cold import time itself is measured by the benchmark, not here.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import functions_framework
import pytest

from pcp.settings import REQUIRED, SettingsError

pytestmark = pytest.mark.functions

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "functions" / "main.py"
TARGETS = ("on_start", "on_stop", "on_marker", "on_sweep")
ENV = {
    "PCP_STACK": "tiny",
    "PCP_PROJECT": "pcp-test",
    "PCP_ZONE": "us-central1-a",
    "PCP_BUCKET": "pcp-tiny-pcp-test",
    "PCP_WORKER_COUNT": "1",
    "PCP_SHEPHERD_HOST": "shepherd.test",
}

PROBE = """
import json, sys
import functions_framework
apps = [functions_framework.create_app(t, source=sys.argv[1], signature_type="cloudevent")
        for t in ("on_start", "on_stop", "on_marker", "on_sweep")]
loaded = sorted(m for m in sys.modules if m.startswith("google.cloud."))
sys.stderr.write(json.dumps({"apps": len(apps), "google_cloud": loaded}) + "\\n")
"""


@pytest.fixture
def settings_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("missing", REQUIRED)
def test_missing_variable_fails_create_app_naming_it(settings_env: None, missing: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(missing)
    with pytest.raises(SettingsError, match=missing):
        functions_framework.create_app("on_start", source=str(MAIN), signature_type="cloudevent")


def test_malformed_variable_fails_create_app_naming_it(settings_env: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCP_WORKER_COUNT", "two")
    with pytest.raises(SettingsError, match="PCP_WORKER_COUNT"):
        functions_framework.create_app("on_marker", source=str(MAIN), signature_type="cloudevent")


@pytest.mark.parametrize("target", TARGETS)
def test_every_entry_point_loads_as_a_cloudevent_function(settings_env: None, target: str) -> None:
    app = functions_framework.create_app(target, source=str(MAIN), signature_type="cloudevent")
    assert app.test_client().get("/").status_code == 405  # only POSTed CloudEvents are served


def test_import_builds_no_client_and_skips_compute_v1() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("STORAGE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST")}
    env.update(ENV, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", PROBE, str(MAIN)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "", "importing the functions must print nothing"
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["apps"] == 4
    loaded = report["google_cloud"]
    assert "google.cloud.compute_v1" not in loaded
    # No client library is even imported before the first event asks for it.
    assert not [m for m in loaded if m.startswith(("google.cloud.storage",
                                                   "google.cloud.pubsub"))], loaded


def test_settings_round_trip_through_the_environment() -> None:
    from pcp.core.policy import Policy
    from pcp.settings import Settings

    policy = Policy(stack="small", worker_count=3, shepherd_host="mac.example", tcp_port=9100,
                    max_run_hours=2.5, boot_timeout_minutes=20, keep_alive_hours=0.25,
                    sweep_interval_minutes=1 / 12, default_binary="github:o/r#t",
                    worker_hourly_usd=0.7312, shepherd_hourly_usd=0.1)
    settings = Settings(stack="small", project="p-1", zone="z", bucket="b", policy=policy,
                        compute_endpoint="http://127.0.0.1:1")
    env = settings.to_env()
    assert all(isinstance(v, str) for v in env.values())
    assert Settings.from_env(env) == settings
