"""Malformed input is acknowledged (HTTP 200), logged with its reason, recorded, starts nothing.

Retrying bad input can never help, so the trigger must not redeliver it forever; the reason
must reach the person who sent it (`pcp status` reads the records checked here).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.functions import events
from tests.functions.conftest import FnStack, MakeStack, log_lines

pytestmark = [pytest.mark.functions, pytest.mark.emulator]

OVERSIZE = "--x " + "y" * (16 * 1024)

# (case id, keyword arguments for FnStack.start, a fragment of the expected reason)
START_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("bad-base64", {"body": b"", "raw_data": "eyJydW5faWQiOiJ4In0=!!"}, "not valid base64"),
    ("not-json", {"body": "{run_id: exp}"}, "not valid JSON"),
    ("json-array", {"body": '["exp"]'}, "must be a JSON object"),
    ("wrong-type", {"body": {"run_id": "bad-type", "keep_vm_alive": "yes"}},
     "keep_vm_alive must be true or false"),
    ("unknown-field", {"body": {"run_id": "typo", "keep_vm_alvie": True}},
     "unknown field 'keep_vm_alvie' in start request (did you mean 'keep_vm_alive'?)"),
    ("oversize-config", {"body": {"run_id": "big", "training_config": OVERSIZE}},
     "the limit is 16384 (16 KiB)"),
    ("unbalanced-quotes", {"body": {"run_id": "quotes", "training_config": "--name 'abc"}},
     "unbalanced quotes"),
    ("other-stack", {"body": {"run_id": "elsewhere", "stack": "huge"}},
     "start request is for stack 'huge', but this is stack 'tiny'"),
    ("bad-run-id", {"body": {"run_id": "Bad Run!"}}, "run_id 'Bad Run!' is invalid"),
]


def assert_nothing_started(fn: FnStack) -> None:
    assert fn.running() == []
    assert fn.compute.count("start") == 0
    assert fn.state()["active"] is None and fn.state()["queue"] == []


def warning(out: str, event: str) -> dict[str, Any]:
    [line] = [x for x in log_lines(out) if x["event"] == event]
    assert line["severity"] == "WARNING", line
    return line


@pytest.mark.parametrize(("kwargs", "reason"), [c[1:] for c in START_CASES],
                         ids=[c[0] for c in START_CASES])
def test_bad_start_is_acknowledged_recorded_and_starts_nothing(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str],
        kwargs: dict[str, Any], reason: str) -> None:
    fn = make_stack(workers=1)
    response = fn.start(message_id="777", **kwargs)
    assert response.status_code == 200, response.data
    assert reason in warning(capsys.readouterr().out, "start")["reason"]
    [rejected] = fn.state()["recent"]
    assert rejected["status"] == "rejected" and reason in rejected["detail"]
    record = fn.read(f"runs/{rejected['run_id']}/run.json")
    assert record is not None and record["status"] == "rejected"
    assert_nothing_started(fn)


def test_rejected_start_keeps_its_run_id_when_that_much_parsed(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    fn.start({"run_id": "typo", "keep_vm_alvie": True}, message_id="778")
    fn.start("not json", message_id="779")
    assert sorted(r["run_id"] for r in fn.state()["recent"]) == ["run-779", "typo"]


def test_redelivered_bad_start_is_recorded_once(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    for _ in range(3):
        assert fn.start("not json", message_id="780").status_code == 200
    assert [r["run_id"] for r in fn.state()["recent"]] == ["run-780"]
    assert fn.names("control/rejected/") == []


MARKER = "markers/run-1/worker-0/done.json"


@pytest.mark.parametrize("shape", ["finalized", "notification"])
@pytest.mark.parametrize(("where", "reason"), [
    ("outside", "is outside markers/"),
    ("other-bucket", "is in another bucket"),
    ("not-a-marker", "is not a node marker"),
    ("missing", "does not exist"),
])
def test_bad_marker_event_is_acknowledged_recorded_and_starts_nothing(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], shape: str, where: str,
        reason: str) -> None:
    fn = make_stack(workers=1)
    bucket, name = fn.bucket.name, MARKER
    if where == "outside":
        name = "runs/run-1/worker-0/stdout.log"
    elif where == "other-bucket":
        bucket = "someone-elses-bucket"
    elif where == "not-a-marker":
        name = "markers/run-1/worker-0/notes.txt"
    build = events.finalized_event if shape == "finalized" else events.notification_event
    response = fn.post("on_marker", build(bucket, name, 1))
    assert response.status_code == 200, response.data
    assert reason in warning(capsys.readouterr().out, "marker")["reason"]
    [record_name] = fn.names("control/rejected/")
    record = fn.read(record_name)
    assert record["kind"] == "marker" and reason in record["detail"]
    assert fn.running() == [] and fn.compute.count("start") == 0


def test_bad_marker_body_is_recorded(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    blob = fn.bucket.client.bucket(fn.bucket.name).blob(MARKER)
    blob.upload_from_string(json.dumps({"run_id": "run-1", "exit_code": "zero"}))
    response = fn.post("on_marker", events.finalized_event(fn.bucket.name, MARKER,
                                                           blob.generation))
    assert response.status_code == 200
    [name] = fn.names("control/rejected/")
    assert "exit_code must be a whole number" in fn.read(name)["detail"]


@pytest.mark.parametrize("kind", ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE"])
def test_other_notifications_are_ignored(make_stack: MakeStack, kind: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    response = fn.post("on_marker", events.notification_event(fn.bucket.name, MARKER, 1,
                                                              event_type=kind))
    assert response.status_code == 200
    [line] = log_lines(capsys.readouterr().out)
    assert line["severity"] == "INFO" and line["reason"].startswith("ignored: " + kind)
    assert fn.names("") == []  # nothing recorded, no state written
