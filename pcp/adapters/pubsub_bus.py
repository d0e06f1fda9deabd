"""The Bus port over Pub/Sub: publish to the stack's topics `pcp-<stack>-<kind>`.

The topics themselves are created by the Pulumi program (or by the local replica); this
adapter only publishes. `publish` blocks until the server has accepted the message, so a
handler that returns has really handed its command on; a failure propagates and the
trigger redelivers the event that caused it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from google.cloud import pubsub_v1

PUBLISH_TIMEOUT_S = 60.0


class PubSubBus:
    """Publisher for one stack. The client is built on first use, never at import time."""

    def __init__(self, project: str, stack: str,
                 publisher: pubsub_v1.PublisherClient | None = None,
                 timeout: float = PUBLISH_TIMEOUT_S) -> None:
        self.project = project
        self.stack = stack
        self.timeout = timeout
        self._publisher = publisher
        self._lock = threading.Lock()

    def topic_path(self, kind: str) -> str:
        return f"projects/{self.project}/topics/pcp-{self.stack}-{kind}"

    @property
    def publisher(self) -> pubsub_v1.PublisherClient:
        with self._lock:
            if self._publisher is None:
                # Honours PUBSUB_EMULATOR_HOST (the local replica); otherwise ADC.
                self._publisher = pubsub_v1.PublisherClient()
            return self._publisher

    def publish(self, topic: str, data: bytes, attributes: Mapping[str, str] | None = None) -> str:
        """Publish to topic kind `topic` ("start", "stop", "sweep", "shepherd")."""
        future = self.publisher.publish(self.topic_path(topic), bytes(data),
                                        **dict(attributes or {}))
        return str(future.result(timeout=self.timeout))
