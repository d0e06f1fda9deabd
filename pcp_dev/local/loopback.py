"""A threaded HTTP server on 127.0.0.1, on a free port, for the replica's stand-ins."""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class QuietHTTPServer(ThreadingHTTPServer):
    """A client that hung up before its answer was written (an abandoned hanging GET of the
    metadata server, a CLI process that exited) is no error of the stand-in: nothing is
    printed for it; anything else is reported as socketserver does."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class LoopbackServer:
    """`handler` served from a daemon thread until `close()` (idempotent)."""

    def __init__(self, handler: type[BaseHTTPRequestHandler], name: str) -> None:
        self._server: ThreadingHTTPServer | None = QuietHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        # A short poll interval: shutdown() waits for the loop to notice, 0.5 s by default.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True, name=name)
        self._thread.start()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread.join(timeout=5)
