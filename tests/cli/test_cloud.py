"""Cloud mode without the cloud: missing credentials, and the sweep job through the real
`CloudSchedulerClient` (REST) talking to a local stand-in for the Cloud Scheduler API.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pcp.cli.config import resolve
from pcp.cli.context import NO_CREDENTIALS, Context

pytestmark = pytest.mark.cli

JOB = "projects/real-proj/locations/europe-west4/jobs/pcp-tiny-sweep"
NO_CREDS_ENV = {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/pcp-test-credentials.json",
                "PCP_PROJECT": "real-proj", "CLOUDSDK_CONFIG": "/nonexistent/gcloud"}


@pytest.mark.parametrize("args", [["status"], ["run"], ["stop", "r-x"], ["runs"],
                                  ["results", "r-x", "--dest", "out"]])
def test_missing_credentials_is_one_line(args, invoke, tmp_path) -> None:
    result = invoke(args, env={**NO_CREDS_ENV, "PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr == f"pcp: error: {NO_CREDENTIALS}\n"
    assert "Traceback" not in result.output


def test_missing_credentials_from_the_console_script(tmp_path) -> None:
    """The installed entry point, as a real process: no traceback reaches the user."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), **NO_CREDS_ENV,
           "PCP_LOCAL_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", "from pcp.cli import main; main()", "status"],
                          env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr == f"pcp: error: {NO_CREDENTIALS}\n"


def test_doctor_reports_missing_credentials_as_a_check(invoke, tmp_path) -> None:
    result = invoke(["doctor"], env={**NO_CREDS_ENV, "PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert f"✗ credentials: {NO_CREDENTIALS}" in result.stdout
    assert "– bucket: not checked without credentials" in result.stdout


def test_no_names_anywhere_is_one_line(invoke, tmp_path) -> None:
    result = invoke(["status"], env={"PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr.startswith("pcp: error: no resource names for stack tiny")
    assert len(result.stderr.splitlines()) == 1


def test_unknown_stack_from_the_environment(invoke, tmp_path) -> None:
    result = invoke(["runs"], env={"PCP_STACK": "giant", "PCP_LOCAL_DIR": str(tmp_path)})
    assert result.exit_code == 1
    assert result.stderr == ("pcp: error: unknown stack 'giant': use one of tiny, small, large, "
                             "huge\n")


def cloud_context(stack, scheduler) -> Context:
    config = resolve({}, {"PCP_PROJECT": "real-proj", "PCP_REGION": "europe-west4"})
    return Context("tiny", store=stack.store, bus=stack.bus, config=config,
                   scheduler=scheduler, local=False, credentials=lambda: "test credentials")


def test_sweep_runs_the_scheduler_job(stack, invoke, scheduler_server,
                                      scheduler_client) -> None:
    scheduler_server.jobs[JOB] = "ENABLED"
    result = invoke(["sweep"], obj=cloud_context(stack, scheduler_client))
    assert result.exit_code == 0, result.output
    assert f"ran Cloud Scheduler job {JOB}" in result.stdout
    assert scheduler_server.calls == [("run", JOB)]
    assert stack.published("sweep") == []  # the job publishes, not the CLI


def test_sweep_of_a_missing_job_is_one_line(stack, invoke, scheduler_server,
                                            scheduler_client) -> None:
    result = invoke(["sweep"], obj=cloud_context(stack, scheduler_client))
    assert result.exit_code == 1
    assert result.stderr == (f"pcp: error: the scheduler job {JOB} does not exist: run "
                             "`pulumi up` for stack tiny\n")


@pytest.mark.parametrize("state, ok", [("ENABLED", True), ("PAUSED", False)])
def test_doctor_checks_the_safety_net(stack, invoke, scheduler_server,
                                      scheduler_client, state, ok) -> None:
    scheduler_server.jobs[JOB] = state
    result = invoke(["doctor"], obj=cloud_context(stack, scheduler_client))
    assert result.exit_code == (0 if ok else 1), result.output
    if ok:
        assert "✓ scheduler job: " + JOB + " is ENABLED (*/5 * * * *): the safety net is armed" \
            in result.stdout
    else:
        assert f"✗ scheduler job: {JOB} is PAUSED: the safety net is NOT armed" in result.stdout
    data = json.loads(invoke(["doctor", "--json"], obj=cloud_context(stack,
                                                                     scheduler_client)).stdout)
    assert data["ok"] is ok
    assert ("get", JOB) in scheduler_server.calls


def test_doctor_without_the_job(stack, invoke, scheduler_server, scheduler_client) -> None:
    result = invoke(["doctor"], obj=cloud_context(stack, scheduler_client))
    assert result.exit_code == 1
    assert f"✗ scheduler job: {JOB} does not exist" in result.stdout


def test_doctor_without_a_region(stack, invoke) -> None:
    config = resolve({}, {"PCP_PROJECT": "real-proj"})
    ctx = Context("tiny", store=stack.store, bus=stack.bus, config=config, local=False,
                  credentials=lambda: "test credentials")
    result = invoke(["doctor"], obj=ctx)
    assert result.exit_code == 1 and "✗ scheduler job: region unknown" in result.stdout
    sweep = invoke(["sweep"], obj=ctx)
    assert sweep.exit_code == 1 and "the sweep job's region is unknown" in sweep.stderr


def test_a_stale_local_replica_file_is_one_line(invoke, tmp_path) -> None:
    """A state file left behind by a replica that is gone: no minutes of retries."""
    from pcp_dev.local.emulators import free_port

    port = free_port()  # free a moment ago: nothing listens there
    (tmp_path / "tiny.json").write_text(json.dumps({
        "project": "pcp-local", "bucket": "b", "storage_endpoint": f"http://127.0.0.1:{port}",
        "pubsub_host": f"127.0.0.1:{port}"}))
    env = {"PCP_LOCAL_DIR": str(tmp_path)}
    for args, endpoint in ((["status"], f"http://127.0.0.1:{port}"),
                           # `run` reads the stack's limits (control/policy.json) first
                           (["run"], f"http://127.0.0.1:{port}")):
        result = invoke(args, env=env)
        assert result.exit_code == 1
        assert result.stderr == (f"pcp: error: the local replica of stack tiny is not running "
                                 f"(nothing answers at {endpoint}): run `pcp local up --stack "
                                 f"tiny`\n")
    doctor = invoke(["doctor"], env=env)
    assert doctor.exit_code == 1 and "✗ bucket" in doctor.stdout and "✗ topics" in doctor.stdout
