"""Input a hostile publisher could send, through the real functions-framework runtime.

Each class here once made a function answer HTTP 500 (or the framework answer 400), so the
trigger redelivered the same poison message for a day with no pcp log line and nothing
recorded. Now each is acknowledged (200), logged with its reason, recorded, and starts nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pcp.core.names import STACK_DOC, corrupt_stack_doc
from tests.functions import events
from tests.functions.conftest import FnStack, MakeStack, log_lines

pytestmark = [pytest.mark.functions, pytest.mark.emulator]
ROOT = Path(__file__).resolve().parents[2]

# Deep enough to exhaust the JSON parser's recursion, small enough to pass the 64 KiB limit.
DEEP = "[" * 30000 + "]" * 30000
HUGE_INT = "1" * 5000  # past Python's integer-string conversion limit (4300 digits)
SURROGATE = '"\\ud800"'  # a JSON escape that decodes to a lone surrogate


def rejected(out: str, event: str) -> dict[str, Any]:
    lines = [x for x in log_lines(out) if x["event"] == event and x.get("rejected")]
    assert lines, f"no rejection logged for {event}: {log_lines(out)}"
    assert lines[-1]["severity"] == "WARNING"
    return lines[-1]


def assert_nothing_started(fn: FnStack) -> None:
    assert fn.running() == [] and fn.compute.count("start") == 0
    state = fn.read(STACK_DOC)
    assert state is None or (state["active"] is None and state["queue"] == [])


def recorded(fn: FnStack, kind: str, reason: str) -> None:
    details = [fn.read(n) for n in fn.names("control/rejected/")]
    assert any(d["kind"] == kind and reason in d["detail"] for d in details), details


# ---------------------------------------------------------------- bodies the parser cannot take

BODIES = [
    ("deep-nesting", DEEP, "nested too deeply"),
    ("huge-integer", '{"run_id": "big", "max_restarts": ' + HUGE_INT + "}", "4300"),
    ("lone-surrogate", '{"run_id": "sur", "requested_by": ' + SURROGATE + "}",
     "not valid Unicode text"),
]


@pytest.mark.parametrize(("body", "reason"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_start_the_parser_cannot_take_is_a_rejected_run(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], body: str,
        reason: str) -> None:
    fn = make_stack(workers=1)
    response = fn.start(body, message_id="901")
    assert response.status_code == 200, response.data
    assert reason in rejected(capsys.readouterr().out, "start")["reason"]
    [run] = fn.state()["recent"]
    assert run["status"] == "rejected" and reason in run["detail"]
    assert_nothing_started(fn)


STOP_BODIES = [
    ("deep-nesting", DEEP, "nested too deeply"),
    ("huge-integer", '{"run_id": "x", "reason": ' + HUGE_INT + "}", "4300"),
    ("lone-surrogate", '{"run_id": "x", "reason": ' + SURROGATE + "}", "not valid Unicode"),
]


@pytest.mark.parametrize(("body", "reason"), [b[1:] for b in STOP_BODIES],
                         ids=[b[0] for b in STOP_BODIES])
@pytest.mark.parametrize("kind", ["stop", "sweep"])
def test_stop_and_tick_the_parser_cannot_take_are_recorded(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], kind: str, body: str,
        reason: str) -> None:
    fn = make_stack(workers=1)
    if kind == "sweep":
        body = body.replace('"run_id": "x", "reason"', '"requested_by"')
    target = {"stop": "on_stop", "sweep": "on_sweep"}[kind]
    response = fn.post(target, events.pubsub_event(body, topic=f"pcp-tiny-{kind}"))
    assert response.status_code == 200, response.data
    assert reason in rejected(capsys.readouterr().out, kind)["reason"]
    recorded(fn, kind, reason)
    assert_nothing_started(fn)


MARKER = "markers/run-1/worker-0/done.json"
MARKER_BODIES = [
    ("deep-nesting", DEEP, "nested too deeply"),
    ("huge-integer", '{"exit_code": ' + HUGE_INT + "}", "4300"),
    ("lone-surrogate", '{"exit_code": 0, "at": "2026-11-29T12:00:00Z", "host": '
     + SURROGATE + "}", "not valid Unicode"),
]


@pytest.mark.parametrize(("body", "reason"), [b[1:] for b in MARKER_BODIES],
                         ids=[b[0] for b in MARKER_BODIES])
@pytest.mark.parametrize("where", ["object", "metadata"])
def test_marker_the_parser_cannot_take_is_recorded(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], where: str, body: str,
        reason: str) -> None:
    fn = make_stack(workers=1)
    if where == "object":
        name, generation = fn.write_marker("run-1", "worker-0", "done", body=body.encode())
        event = fn.marker_event(name, generation, "notification")
    else:  # the marker as the agent describes it in the object's custom metadata
        name, generation = fn.write_marker("run-1", "worker-0", "done")
        event = fn.marker_event(name, generation, "finalized", metadata={"pcp-marker": body})
    response = fn.post("on_marker", event)
    assert response.status_code == 200, response.data
    assert reason in rejected(capsys.readouterr().out, "marker")["reason"]
    recorded(fn, "marker", reason)
    assert_nothing_started(fn)


def test_a_pathological_stack_document_is_set_aside_by_the_sweeper(
        make_stack: MakeStack) -> None:
    """Valid JSON, nested past the parser's depth: the sweeper survives it as it survives
    any corrupt document (kept for a person, the state rebuilt)."""
    fn = make_stack(workers=1)
    doc = ('{"schema": 1, "queue": ' + DEEP + "}").encode()
    blob = fn.bucket.client.bucket(fn.bucket.name).blob(STACK_DOC)
    blob.upload_from_string(doc)
    response = fn.sweep()
    assert response.status_code == 200, response.data
    assert fn.state()["active"] is None
    kept = fn.bucket.client.bucket(fn.bucket.name).get_blob(
        corrupt_stack_doc(int(blob.generation)))
    assert kept is not None and kept.download_as_bytes() == doc
    assert_nothing_started(fn)


# ---------------------------------------------------------------- what the framework refuses


def binary_headers(event: dict[str, Any], drop: str) -> dict[str, str]:
    headers = {f"ce-{k}": str(v) for k, v in event.items()
               if k not in ("data", "datacontenttype", drop)}
    headers["Content-Type"] = "application/json"
    return headers


FRAMEWORK_CASES = [
    ("binary-without-ce-id", "id"),
    ("binary-without-ce-type", "type"),
    ("binary-without-ce-source", "source"),
]


@pytest.mark.parametrize("drop", [c[1] for c in FRAMEWORK_CASES],
                         ids=[c[0] for c in FRAMEWORK_CASES])
def test_an_event_the_framework_cannot_decode_is_acknowledged_and_recorded(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], drop: str) -> None:
    fn = make_stack(workers=1)
    event = events.pubsub_event(json.dumps({"run_id": "framework"}))
    client = fn.apps["on_start"].test_client()
    # A binary-mode event whose body is the request itself, not a push envelope
    response = client.post("/", data=json.dumps({"run_id": "framework"}),
                           headers=binary_headers(event, drop))
    assert response.status_code == 200, response.data
    assert "refused before decoding" in rejected(capsys.readouterr().out, "start")["reason"]
    recorded(fn, "start", "neither a CloudEvent")
    assert_nothing_started(fn)


@pytest.mark.parametrize(("body", "reason"), [
    ('{"foo": 1}', "neither a CloudEvent"),
    ('{"message": {"attributes": {}}, "subscription": "s"}', "neither a CloudEvent"),
    ("not json at all", "neither a CloudEvent"),
    (DEEP, "nested too deeply"),
], ids=["not-an-envelope", "push-without-data", "not-json", "deep-nesting"])
@pytest.mark.parametrize("target", ["on_start", "on_marker"])
def test_a_body_that_is_no_push_envelope_is_acknowledged(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], target: str, body: str,
        reason: str) -> None:
    fn = make_stack(workers=1)
    response = fn.apps[target].test_client().post(
        "/", data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.data
    kind = {"on_start": "start", "on_marker": "marker"}[target]
    assert reason in rejected(capsys.readouterr().out, kind)["reason"]
    recorded(fn, kind, reason)
    assert_nothing_started(fn)


def test_a_structured_event_nested_too_deeply_is_acknowledged(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    body = '{"specversion": "1.0", "id": "1", "type": "t", "source": "s", "data": ' + DEEP + "}"
    response = fn.apps["on_stop"].test_client().post(
        "/", data=body, headers={"Content-Type": "application/cloudevents+json"})
    assert response.status_code == 200, response.data
    assert "nested too deeply" in rejected(capsys.readouterr().out, "stop")["reason"]
    assert_nothing_started(fn)


def test_get_keeps_the_framework_answer(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    assert fn.apps["on_start"].test_client().get("/").status_code == 405
    assert fn.names("") == []


# ---------------------------------------------------------------- events from elsewhere


@pytest.mark.parametrize(("target", "kind", "body"), [
    ("on_start", "start", {"run_id": "wrong-stack"}),
    ("on_stop", "stop", {"run_id": "wrong-stack"}),
    ("on_sweep", "sweep", {"op": "tick"}),
])
def test_an_event_from_another_stacks_topic_is_refused(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str], target: str, kind: str,
        body: dict[str, Any]) -> None:
    fn = make_stack(workers=1)
    response = fn.post(target, events.pubsub_event(json.dumps(body), topic=f"pcp-huge-{kind}"))
    assert response.status_code == 200, response.data
    line = rejected(capsys.readouterr().out, kind)
    assert "pcp-huge-" + kind in line["reason"] and "is not this stack's" in line["reason"]
    assert_nothing_started(fn)
    if kind == "start":
        assert fn.state()["recent"][0]["status"] == "rejected"


def test_a_topic_of_another_project_is_refused(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    fn.post("on_start", events.pubsub_event('{"run_id": "elsewhere"}', topic="pcp-tiny-start",
                                            project="someone-else"))
    assert_nothing_started(fn)
    assert fn.state()["recent"][0]["status"] == "rejected"


def test_a_push_to_a_bare_url_names_no_topic_and_is_refused(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str]) -> None:
    fn = make_stack(workers=1)
    push = events.pubsub_event(json.dumps({"run_id": "bare"}))["data"]
    response = fn.apps["on_start"].test_client().post("/", json=push)
    assert response.status_code == 200
    assert "names no topic" in rejected(capsys.readouterr().out, "start")["reason"]
    assert_nothing_started(fn)


def test_a_push_naming_another_topic_in_its_path_is_refused(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    push = events.pubsub_event(json.dumps({"run_id": "other"}))["data"]
    client = fn.apps["on_start"].test_client()
    assert client.post("/projects/pcp-test/topics/pcp-small-start", json=push).status_code == 200
    assert_nothing_started(fn)


def test_a_notification_from_another_stacks_topic_is_refused(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    assert fn.start({"run_id": "run-1"}).status_code == 200
    fn.write_marker("run-1", "shepherd", "booted")  # its event not delivered: the worker's
    name, generation = fn.write_marker("run-1", "worker-0", "booted")  # would make it running
    event = events.notification_event(fn.bucket.name, name, generation, topic="pcp-huge-markers")
    before = fn.read("control/stack.json")
    assert fn.post("on_marker", event).status_code == 200
    # Refused before the service ran: the stack document is as it was. (The marker object
    # itself is in the bucket, so readers that fold the markers see the node booted.)
    assert fn.read("control/stack.json") == before
    recorded(fn, "marker", "is not this stack's")


def test_a_finalized_event_whose_source_is_another_bucket_is_refused(
        make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    assert fn.start({"run_id": "run-1"}).status_code == 200
    fn.write_marker("run-1", "shepherd", "booted")  # its event not delivered: the worker's
    name, generation = fn.write_marker("run-1", "worker-0", "booted")  # would make it running
    event = events.finalized_event(fn.bucket.name, name, generation)
    event["source"] = "//storage.googleapis.com/projects/_/buckets/pcp-huge-elsewhere"
    before = fn.read("control/stack.json")
    assert fn.post("on_marker", event).status_code == 200
    # Refused before the service ran: the stack document is as it was. (The marker object
    # itself is in the bucket, so readers that fold the markers see the node booted.)
    assert fn.read("control/stack.json") == before
    recorded(fn, "marker", "pcp-huge-elsewhere")


# ---------------------------------------------------------------- the run's secret


def test_every_run_gets_a_secret_only_its_nodes_receive(
        make_stack: MakeStack, capsys: pytest.CaptureFixture[str]) -> None:
    """Drawn by the function that accepts the run; in the workers' assignment and the
    shepherd command, the same for all nodes, never in a label, a log line or the request."""
    fn = make_stack(workers=2)
    assert fn.start({"run_id": "secret-a"}).status_code == 200
    secret = fn.state()["active"]["secret"]
    assert re.fullmatch(r"[0-9a-f]{64}", secret)
    [command] = fn.pull_shepherd(1)
    assert command.assignment is not None and command.assignment.secret == secret
    assert command.assignment.env("/out")["PCP_RUN_SECRET"] == secret
    for vm in fn.vm_names:
        record = fn.vm(vm)
        assert json.loads(record.metadata["pcp-assignment"])["secret"] == secret
        assert secret not in json.dumps(record.labels)
    assert "secret" not in fn.state()["active"]["request"]
    assert secret not in capsys.readouterr().out
    assert secret not in repr(command)

    for node in ("shepherd", "worker-0", "worker-1"):
        fn.marker("secret-a", node, "booted")
        fn.marker("secret-a", node, "done")
    assert fn.start({"run_id": "secret-b"}).status_code == 200
    other = fn.state()["active"]["secret"]
    assert re.fullmatch(r"[0-9a-f]{64}", other) and other != secret


def test_a_start_request_cannot_choose_its_secret(make_stack: MakeStack) -> None:
    fn = make_stack(workers=1)
    fn.start({"run_id": "chosen", "secret": "0" * 64})
    [run] = fn.state()["recent"]
    assert run["status"] == "rejected" and "unknown field 'secret'" in run["detail"]
    assert_nothing_started(fn)


# ---------------------------------------------------------------- the real server process


@pytest.fixture
def served(make_stack: MakeStack, tmp_path: Path) -> Iterator[tuple[FnStack, str]]:
    """on_start behind the real `functions-framework` server (gunicorn), on the emulators."""
    fn = make_stack(workers=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, **fn.env, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": str(runtime)}
    argv = [sys.executable, "-m", "functions_framework", "--target", "on_start", "--source",
            str(ROOT / "functions" / "main.py"), "--signature-type", "cloudevent",
            "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=1)
            except urllib.error.HTTPError:
                break  # answering (GET / is 405)
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()
                assert time.monotonic() < deadline, "functions-framework never answered"
                time.sleep(0.1)
        yield fn, url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def http_post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_the_real_server_acknowledges_what_the_framework_cannot_decode(
        served: tuple[FnStack, str]) -> None:
    fn, url = served
    event = events.pubsub_event(json.dumps({"run_id": "served"}))
    push = json.dumps(event["data"]).encode()
    plain = {"Content-Type": "application/json"}
    # no ce-id: the framework would answer 400
    assert http_post(url + "/", b'{"run_id": "served"}',
                     binary_headers(event, "id")) == 200
    assert http_post(url + "/", b"not json", plain) == 200  # the framework: 400
    assert http_post(url + "/", DEEP.encode(), plain) == 200  # the framework: 500
    assert http_post(url + "/", push, plain) == 200  # a push naming no topic
    assert_nothing_started(fn)
    details = [fn.read(n)["detail"] for n in fn.names("control/rejected/")]
    assert sum("refused before decoding" in d for d in details) == 3, details
    # the same push to the topic's path, as the replica sends it, is served
    assert http_post(url + "/projects/pcp-test/topics/pcp-tiny-start", push, plain) == 200
    assert fn.state()["active"]["run_id"] == "served"


def test_the_sweeper_survives_pathological_markers_records_and_metrics(
        make_stack: MakeStack) -> None:
    """Everything else the sweeper reads from the bucket is untrusted too: a marker body or
    marker metadata it cannot parse is ignored (as its own event would have been refused),
    unreadable metrics leave the summary without metrics, and an unreadable run record is
    written again."""
    fn = make_stack(workers=1)
    assert fn.start({"run_id": "run-1"}).status_code == 200
    bucket = fn.bucket.client.bucket(fn.bucket.name)
    bucket.blob("markers/run-1/worker-0/done.json").upload_from_string(DEEP)
    hostile = bucket.blob("markers/run-1/shepherd/booted.json")
    hostile.metadata = {"pcp-marker": '{"attempt": ' + HUGE_INT + "}"}
    hostile.upload_from_string(b"{}")
    assert fn.sweep().status_code == 200
    nodes = {n["name"]: n["phase"] for n in fn.state()["active"]["nodes"]}
    assert nodes == {"shepherd": "pending", "worker-0": "pending"}

    bucket.blob("runs/run-1/shepherd/metrics.json").upload_from_string(DEEP)
    for node in ("shepherd", "worker-0"):
        assert fn.marker("run-1", node, "booted").status_code == 200
        assert fn.marker("run-1", node, "done").status_code == 200
    assert fn.read("runs/run-1/summary.json")["metrics"] == {}
    bucket.blob("runs/run-1/run.json").upload_from_string(b'{"phase": ' + DEEP.encode() + b"}")
    assert fn.sweep().status_code == 200
    assert fn.read("runs/run-1/run.json")["status"] == "succeeded"
