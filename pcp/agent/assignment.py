"""Where a node learns what to run: instance metadata (worker) or a subscription (shepherd).

Worker: `http://$GCE_METADATA_HOST/computeMetadata/v1/instance/attributes/pcp-assignment`
with `Metadata-Flavor: Google`, the same request every GCE guest tool makes; the local
replica serves the same path. Shepherd: a streaming pull on `pcp-<stack>-shepherd-host`
with at most one outstanding message. Every message is acknowledged once it is parsed and
queued, malformed ones too (logged), so nothing is redelivered forever; a start that is lost
with the agent is re-sent by the sweeper while the shepherd has not booted.
"""

from __future__ import annotations

import os
import queue
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any

from pcp.agent.log import Log
from pcp.core.errors import PermanentError
from pcp.core.messages import ShepherdCommand
from pcp.core.names import Names

if TYPE_CHECKING:
    from google.cloud import pubsub_v1

DEFAULT_METADATA_HOST = "metadata.google.internal"


class MetadataError(OSError):
    """The metadata server could not be asked (as opposed to: the key is not set)."""


class Metadata:
    """Instance attributes from the metadata server. Blocking, a few seconds at most."""

    def __init__(self, host: str | None = None, timeout: float = 5.0) -> None:
        self.host = host or os.environ.get("GCE_METADATA_HOST") or DEFAULT_METADATA_HOST
        self.timeout = timeout

    def attribute(self, key: str) -> str | None:
        """The attribute's value, or None when it is not set (HTTP 404)."""
        url = (f"http://{self.host}/computeMetadata/v1/instance/attributes/"
               f"{urllib.parse.quote(key, safe='')}")
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body: bytes = response.read()
                # Invalid UTF-8 stays visible (as surrogates) for the parser to refuse clearly.
                return body.decode("utf-8", "surrogateescape")
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise MetadataError(f"metadata server {self.host}: HTTP {e.code} for {key}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise MetadataError(f"metadata server {self.host}: {e}") from None


def subscription_name(stack: str) -> str:
    return Names(stack).shepherd_subscription


class ShepherdSubscription:
    """Streaming pull of shepherd commands into a queue. Honours PUBSUB_EMULATOR_HOST."""

    def __init__(self, project: str, stack: str, commands: queue.Queue[ShepherdCommand],
                 log: Log) -> None:
        self.project = project
        self.stack = stack
        self.commands = commands
        self.log = log
        self._client: pubsub_v1.SubscriberClient | None = None
        self._future: Any = None

    @property
    def path(self) -> str:
        return f"projects/{self.project}/subscriptions/{subscription_name(self.stack)}"

    def open(self) -> None:
        """(Re)start the streaming pull; errors surface later through `failed()`."""
        from google.cloud import pubsub_v1

        if self._client is None:
            self._client = pubsub_v1.SubscriberClient()
        flow = pubsub_v1.types.FlowControl(max_messages=1)
        self._future = self._client.subscribe(self.path, callback=self._on_message,
                                              flow_control=flow)
        self.log.info("subscribed", f"streaming pull on {self.path}")

    def failed(self) -> str | None:
        """Why the streaming pull stopped, if it did (it is then re-opened by the caller)."""
        if self._future is None or not self._future.done():
            return None
        try:
            self._future.result(timeout=0)
        except Exception as e:  # noqa: BLE001 - any reason is reported, then re-opened
            return f"{type(e).__name__}: {e}"
        return "the streaming pull ended"

    def close(self) -> None:
        if self._future is not None:
            self._future.cancel()
            try:
                self._future.result(timeout=10)
            except Exception:  # noqa: BLE001 - cancelled on purpose
                pass
        if self._client is not None:
            self._client.close()
            self._client = None

    def _on_message(self, message: Any) -> None:
        try:
            command = ShepherdCommand.from_json(message.data)
        except PermanentError as e:
            self.log.error("command_rejected", f"malformed shepherd command acknowledged: {e}",
                           message_id=message.message_id)
            message.ack()
            return
        self.log.info("command_received", f"{command.action} run {command.run_id} "
                      f"attempt {command.attempt}", message_id=message.message_id)
        self.commands.put(command)
        message.ack()
