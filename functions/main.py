"""Cloud Functions entry points: parse the event, call the service, log one line.

Input that can never succeed (`PermanentError`) is logged, recorded where `pcp status` shows it,
and acknowledged by returning normally (HTTP 200), so the trigger does not redeliver it forever.
Any other exception propagates: HTTP 500 makes Pub/Sub or Eventarc retry the event.

The `pcp` package is shipped beside this file in the deployed archive.
"""

from __future__ import annotations

from typing import Any

import functions_framework

from pcp import entry
from pcp.core.errors import PermanentError
from pcp.core.messages import StartRequest, StopRequest, SweepTick
from pcp.settings import Settings

# Read at cold start: a missing variable fails the deployment's first request, naming it.
SETTINGS = Settings.from_env()


@functions_framework.cloud_event
def on_start(cloud_event: Any) -> None:
    """A start request on pcp-<stack>-start: queue the run, or start it if the stack is free."""
    now, message_id, data = entry.now(), entry.event_id(cloud_event), None
    service = entry.build_service(SETTINGS)
    try:
        data, _, message_id = entry.pubsub_payload(cloud_event)
        request = StartRequest.from_json(data, message_id)
    except PermanentError as e:
        entry.reject_start(service, SETTINGS, data, message_id, str(e), now)
        return
    with entry.transient(SETTINGS, "start", request.run_id):
        outcome = service.handle(request, now)
    entry.log_outcome(SETTINGS, "start", outcome, request.run_id, message_id=message_id)


@functions_framework.cloud_event
def on_stop(cloud_event: Any) -> None:
    """A stop request on pcp-<stack>-stop: cancel a run, drop it from the queue, end a lease."""
    now, message_id = entry.now(), entry.event_id(cloud_event)
    service = entry.build_service(SETTINGS)
    try:
        data, _, message_id = entry.pubsub_payload(cloud_event)
        request = StopRequest.from_json(data)
    except PermanentError as e:
        entry.reject_event(service, SETTINGS, "stop", message_id, str(e), now)
        return
    with entry.transient(SETTINGS, "stop", request.run_id):
        outcome = service.handle(request, now)
    entry.log_outcome(SETTINGS, "stop", outcome, request.run_id, message_id=message_id)


@functions_framework.cloud_event
def on_marker(cloud_event: Any) -> None:
    """A node wrote markers/<run>/<node>/booted.json or done.json: advance the run."""
    now, message_id, name = entry.now(), entry.event_id(cloud_event), ""
    service = entry.build_service(SETTINGS)
    try:
        _, name = entry.marker_object(cloud_event, SETTINGS.bucket)
        with entry.transient(SETTINGS, "marker", entry.marker_run_id(name)):
            outcome = service.handle_marker(name, now, entry.object_metadata(cloud_event))
    except entry.Ignored as e:
        entry.log_ignored(SETTINGS, "marker", str(e), message_id=message_id)
        return
    except PermanentError as e:
        entry.reject_event(service, SETTINGS, "marker", message_id, str(e), now,
                           entry.marker_run_id(name))
        return
    entry.log_outcome(SETTINGS, "marker", outcome, entry.marker_run_id(name), object=name)


@functions_framework.cloud_event
def on_sweep(cloud_event: Any) -> None:
    """A tick from Cloud Scheduler: reconcile the stack with its real VMs and markers."""
    now, message_id = entry.now(), entry.event_id(cloud_event)
    service = entry.build_service(SETTINGS)
    try:
        data, _, message_id = entry.pubsub_payload(cloud_event)
        SweepTick.from_json(data)
    except PermanentError as e:
        entry.reject_event(service, SETTINGS, "sweep", message_id, str(e), now)
        return
    with entry.transient(SETTINGS, "sweep", None):
        outcome = service.sweep(now)
    active = outcome.transition.state.active
    entry.log_outcome(SETTINGS, "sweep", outcome, active.run_id if active else None)
