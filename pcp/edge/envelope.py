"""Requests functions-framework itself cannot decode: acknowledged with a reason, not retried.

functions-framework decodes the HTTP request into a CloudEvent before pcp's code runs. When
it cannot (no `ce-id` or `ce-type`, a body that is neither a CloudEvent nor a Pub/Sub push
envelope, JSON nested too deeply for its parser), it answers 400 or 500, and Pub/Sub push or
Eventarc redelivers the same request for as long as the subscription keeps messages, with
no pcp log line and nothing recorded.

`install` registers, on the Flask app the framework builds for an entry point (main.py runs
inside that app's context), a hook that runs before the framework's view: it decodes the
request exactly as the framework will (cloudevents' `from_http`, then the framework's own
conversion of a legacy push body) and, when that fails, logs the reason, records it under
control/rejected/ and answers 200 so the delivery is acknowledged. A 400 the framework raises
anyway is handled the same way.
"""

from __future__ import annotations

import json
from typing import Any

from pcp.edge.rejections import record_rejection
from pcp.edge.services import build_service, now
from pcp.logs import log
from pcp.settings import Settings

#: entry point -> the event kind it logs and records
KINDS = {"on_start": "start", "on_stop": "stop", "on_marker": "marker", "on_sweep": "sweep",
         "on_budget": "budget"}
MAX_REASON = 400


def refusal(request: Any) -> str | None:
    """Why functions-framework cannot turn `request` into a CloudEvent; None when it can."""
    from cloudevents import exceptions as ce_errors
    from cloudevents.http import from_http
    from functions_framework import event_conversion

    try:
        from_http(request.headers, request.get_data())
        return None
    except (ce_errors.MissingRequiredFields, ce_errors.InvalidRequiredFields):
        pass  # not a CloudEvent: the framework tries a legacy push body next
    except RecursionError:
        return "the request is not a CloudEvent: its JSON is nested too deeply to parse"
    except Exception as e:  # noqa: BLE001 - any failure to decode is the sender's
        return f"the request is not a CloudEvent the runtime can decode: {_short(e)}"
    try:
        event_conversion.background_event_to_cloud_event(request)
        return None
    except RecursionError:
        return "the request is not a Pub/Sub push body: its JSON is nested too deeply to parse"
    except Exception as e:  # noqa: BLE001
        return ("the request is neither a CloudEvent (it lacks ce-id, ce-type, ce-source or "
                f"ce-specversion) nor a Pub/Sub push body: {_short(e)}")


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= MAX_REASON else text[:MAX_REASON] + "..."


def _message_id(request: Any) -> str:
    """The delivery's id for the record: the ce-id header or the push body's messageId."""
    try:
        header = request.headers.get("ce-id")
        if header:
            return str(header)
        body = json.loads(request.get_data())
        message = body.get("message") if isinstance(body, dict) else None
        value = message.get("messageId") if isinstance(message, dict) else None
        return str(value) if isinstance(value, str | int) else ""
    except Exception:  # noqa: BLE001 - only a label for the record
        return ""


def acknowledge(settings: Settings, kind: str, reason: str, request: Any) -> tuple[str, int]:
    """Log and record a request the runtime refused; the 200 acknowledges the delivery."""
    message_id = _message_id(request)
    detail = f"refused before decoding: {reason}"
    record_rejection(build_service(settings).store, kind, message_id, detail, now())
    log("WARNING", kind, stack=settings.stack, reason=f"rejected: {detail}",
        message_id=message_id, rejected=True)
    return "", 200


def install(app: Any, settings: Settings) -> None:
    """Register the hook and the 400 handler on `app`, if it serves one of pcp's functions."""
    kind = KINDS.get(getattr(app, "name", ""))
    if kind is None:
        return

    def before() -> tuple[str, int] | None:
        from flask import request

        if request.method != "POST" or request.routing_exception is not None:
            return None  # GET / and unknown routes keep the framework's answer
        reason = refusal(request)
        return None if reason is None else acknowledge(settings, kind, reason, request)

    def bad_request(e: Any) -> tuple[str, int]:
        from flask import request

        return acknowledge(settings, kind, _short(e), request)

    app.before_request(before)
    app.register_error_handler(400, bad_request)


def install_current(settings: Settings) -> None:
    """`install` on the app whose context is active (the framework's, while main.py loads)."""
    import flask

    if flask.has_app_context():
        install(flask.current_app._get_current_object(), settings)  # type: ignore[attr-defined]
