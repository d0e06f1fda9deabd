"""Cloud Functions entry points: parse the event, call the service, log one line.

Input that can never succeed (`PermanentError`) is logged, recorded where `pcp status` shows it,
and acknowledged by returning normally (HTTP 200), so the trigger does not redeliver it forever.
Any other exception propagates: HTTP 500 makes Pub/Sub or Eventarc retry the event.

Every event is decoded through one layer (pcp/edge/events.py over the parsers of
pcp/core/messages.py): any failure to decode, parse, validate or encode it is a
`PermanentError`, and an event from another stack's topic or bucket is one too. A request the
framework itself cannot decode is acknowledged the same way (pcp/edge/envelope.py).

The `pcp` package (its shipped part: core, adapters, service, edge) is beside this file in the
deployed archive.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import functions_framework

from pcp.core.errors import PermanentError
from pcp.core.messages import (
    BudgetNotification,
    BudgetResume,
    StartRequest,
    SweepTick,
    parse_stop_topic,
)
from pcp.core.names import Names
from pcp.edge import envelope, events
from pcp.edge.images import pin_image
from pcp.edge.logline import log_ignored, log_outcome, transient
from pcp.edge.rejections import reject_event, reject_start
from pcp.edge.services import build_service, invocation, new_secret, now
from pcp.settings import Settings

# Read at cold start: a missing variable fails the deployment's first request, naming it.
SETTINGS = Settings.from_env()
NAMES = Names(SETTINGS.stack, SETTINGS.project)
# The framework runs this file inside the app it built for one entry point: hook that app.
envelope.install_current(SETTINGS)


def _source(kind: str) -> str:
    """Where this stack's events of `kind` come from: its own topic."""
    return events.topic_source(SETTINGS.project, NAMES.topic(kind))


@functions_framework.cloud_event
def on_start(cloud_event: Any) -> None:
    """A start request on pcp-<stack>-start: queue the run, or start it if the stack is free."""
    at, message_id, data = now(), events.event_id(cloud_event), None
    service = build_service(SETTINGS)
    try:
        data, _, message_id = events.pubsub_payload(cloud_event, _source("start"))
        request = replace(StartRequest.from_json(data, message_id), secret=new_secret())
    except PermanentError as e:
        reject_start(service, SETTINGS, data, message_id, str(e), at)
        return
    with transient(SETTINGS, "start", request.run_id), invocation(service, SETTINGS):
        try:  # a tag becomes the digest every node of the run pulls (pcp/edge/images.py)
            request = pin_image(request, SETTINGS.policy)
        except PermanentError as e:
            reject_start(service, SETTINGS, data, message_id, str(e), at)
            return
        outcome = service.handle(request, at)
    log_outcome(SETTINGS, "start", outcome, request.run_id, message_id=message_id)


@functions_framework.cloud_event
def on_stop(cloud_event: Any) -> None:
    """A stop request on pcp-<stack>-stop: cancel a run, drop it from the queue, end a lease;
    or `pcp budget resume`: lift the stack's budget hold."""
    at, message_id = now(), events.event_id(cloud_event)
    service = build_service(SETTINGS)
    try:
        data, _, message_id = events.pubsub_payload(cloud_event, _source("stop"))
        request = parse_stop_topic(data)
    except PermanentError as e:
        reject_event(service, SETTINGS, "stop", message_id, str(e), at)
        return
    run_id = None if isinstance(request, BudgetResume) else request.run_id
    with transient(SETTINGS, "stop", run_id), invocation(service, SETTINGS):
        outcome = service.handle(request, at)
    log_outcome(SETTINGS, "stop", outcome, run_id, message_id=message_id)


@functions_framework.cloud_event
def on_marker(cloud_event: Any) -> None:
    """A node wrote markers/<run>/<node>/booted.json or done.json: advance the run."""
    at, message_id, marker = now(), events.event_id(cloud_event), None
    service = build_service(SETTINGS)
    try:
        marker = events.marker_object(cloud_event, SETTINGS.bucket, _source("markers"))
        with transient(SETTINGS, "marker", marker.run_id), invocation(service, SETTINGS):
            outcome = service.handle_marker(marker.name, at, marker.metadata)
    except events.Ignored as e:
        log_ignored(SETTINGS, "marker", str(e), message_id=message_id)
        return
    except PermanentError as e:
        reject_event(service, SETTINGS, "marker", message_id, str(e), at,
                     marker.run_id if marker else None)
        return
    log_outcome(SETTINGS, "marker", outcome, marker.run_id, object=marker.name)


@functions_framework.cloud_event
def on_sweep(cloud_event: Any) -> None:
    """A tick from Cloud Scheduler: reconcile the stack with its real VMs and markers."""
    at, message_id = now(), events.event_id(cloud_event)
    service = build_service(SETTINGS)
    try:
        data, _, message_id = events.pubsub_payload(cloud_event, _source("sweep"))
        SweepTick.from_json(data)
    except PermanentError as e:
        reject_event(service, SETTINGS, "sweep", message_id, str(e), at)
        return
    with transient(SETTINGS, "sweep", None), invocation(service, SETTINGS):
        outcome = service.sweep(at)
    active = outcome.transition.state.active
    log_outcome(SETTINGS, "sweep", outcome, active.run_id if active else None)


@functions_framework.cloud_event
def on_budget(cloud_event: Any) -> None:
    """A Cloud Billing budget notification on pcp-<stack>-budget: past the threshold, stop
    every VM of the stack and refuse new starts until `pcp budget resume` (the last guard:
    notifications lag real spend by hours)."""
    at, message_id = now(), events.event_id(cloud_event)
    service = build_service(SETTINGS)
    try:
        data, attributes, message_id = events.pubsub_payload(cloud_event, _source("budget"))
        notification = BudgetNotification.from_message(data, attributes)
        notification.check_budget(SETTINGS.policy.budget_id, SETTINGS.policy.billing_account)
    except PermanentError as e:
        reject_event(service, SETTINGS, "budget", message_id, str(e), at)
        return
    with transient(SETTINGS, "budget", None), invocation(service, SETTINGS):
        outcome = service.handle(notification, at)
    log_outcome(SETTINGS, "budget", outcome, None, message_id=message_id)
