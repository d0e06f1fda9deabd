"""The functions fuzzed through the real functions-framework runtime, on the emulators.

Each input is an HTTP request as a hostile publisher could send it: a structured or binary
CloudEvent, a legacy push body, or bytes that are none of these; its payload a mutated pcp
message. Whatever arrives, the answer is 200 (acknowledged: no HTTP 400 or 500 that the
trigger would redeliver for a day), and nothing is started: for the start function, inputs
whose start request would parse are left out, so every one there must be refused.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pcp.core.errors import PermanentError
from pcp.core.messages import START_FIELDS, StartRequest
from tests.functions.conftest import MakeStack, make_stack  # noqa: F401 - the fixture
from tests.fuzz import strategies as s
from tests.fuzz.conftest import budget, tally
from tests.fuzz.test_parsers import START

pytestmark = [pytest.mark.fuzz, pytest.mark.functions, pytest.mark.emulator]

TOPICS = {"on_start": "start", "on_stop": "stop", "on_marker": "markers", "on_sweep": "sweep",
          "on_budget": "budget"}
SOURCES = st.sampled_from([f"//pubsub.googleapis.com/projects/pcp-test/topics/pcp-tiny-{t}"
                           for t in TOPICS.values()])
PAYLOADS = s.messages(START, START_FIELDS).map(
    lambda d: d if isinstance(d, bytes) else d.encode("utf-8", "surrogatepass"))
ATTRS = st.fixed_dictionaries({}, optional={
    "specversion": st.just("1.0") | s.TEXT, "id": st.just("42") | s.TEXT,
    "type": st.just("google.cloud.pubsub.topic.v1.messagePublished") | s.TEXT,
    "source": SOURCES | s.TEXT})


def envelope(payload: bytes, message_id: Any) -> dict[str, Any]:
    return {"message": {"data": base64.b64encode(payload).decode(), "attributes": {},
                        "messageId": message_id}, "subscription": "projects/p/subscriptions/s"}


def _ascii(text: str) -> str:
    """A header value HTTP can carry: no line breaks, Latin-1 (escaped here as ASCII)."""
    return text.encode("ascii", "backslashreplace").decode().replace("\r", " ").replace(
        "\n", " ")


REQUESTS = st.one_of(
    # structured mode: the attributes in the body
    st.builds(lambda a, p, mid: ("/", {"Content-Type": "application/cloudevents+json"},
                                 s.dumps({**a, "data": envelope(p, mid)}).encode()),
              ATTRS, PAYLOADS, st.just("42") | s.JSON_VALUES),
    # binary mode: the attributes in ce- headers (HTTP headers are Latin-1 text)
    st.builds(lambda a, p: ("/", {"Content-Type": "application/json",
                                  **{f"ce-{k}": _ascii(v) for k, v in a.items()}},
                            json.dumps(envelope(p, "42")).encode()), ATTRS, PAYLOADS),
    # a legacy push body, to the topic's path or another
    st.builds(lambda path, p: (path, {"Content-Type": "application/json"},
                               json.dumps(envelope(p, "42")).encode()),
              st.sampled_from([*(f"/projects/pcp-test/topics/pcp-tiny-{t}"
                                 for t in TOPICS.values()), "/",
                               "/projects/pcp-test/topics/pcp-huge-start"]), PAYLOADS),
    # anything at all
    st.builds(lambda ct, body: ("/", {"Content-Type": ct}, body),
              st.sampled_from(["application/json", "application/cloudevents+json",
                               "text/plain"]), st.binary(max_size=300) | PAYLOADS),
)


def parses(body: bytes) -> bool:
    """Whether the start request some part of this request carries would be accepted."""
    try:
        outer = json.loads(body)
        data = outer.get("data", outer)["message"]["data"]
        StartRequest.from_json(base64.b64decode(data), "42")
        return True
    except PermanentError:
        return False
    except Exception:  # noqa: BLE001 - not even an envelope: nothing to start
        return False


@pytest.mark.parametrize("target", TOPICS)
def test_every_function_acknowledges_anything_and_starts_nothing(
        make_stack: MakeStack, target: str) -> None:  # noqa: F811
    """No run exists, so a stop, a tick or a marker can start nothing whatever it says; a
    start could, so starts that would parse are left out."""
    fn = make_stack(workers=1)
    client = fn.apps[target].test_client()

    @settings(max_examples=budget(0.25), deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(REQUESTS)
    def post(request: tuple[str, dict[str, str], bytes]) -> None:
        path, headers, body = request
        if target == "on_start":
            assume(not parses(body))
        response = client.post(path, data=body, headers=headers)
        assert response.status_code == 200, (response.status_code, response.data[:300])
        tally(f"runtime: {target}", "acknowledged")

    post()
    assert fn.running() == [] and fn.compute.count("start") == 0
    state = fn.read("control/stack.json")
    assert state is None or (state["active"] is None and state["queue"] == [])
