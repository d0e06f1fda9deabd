"""The torchrun launcher's rendezvous store: `python rendezvous.py --port=PORT`.

The shepherd of a `torchrun:` run starts this instead of a binary (pcp/agent/torchrun.py). It
hosts a c10d TCPStore on PORT, listening on every interface, for the workers' torchrun agents
(`--rdzv-backend=c10d --rdzv-endpoint=SHEPHERD:PORT --rdzv-conf=is_host=false`), and runs
until SIGTERM or SIGINT, then exits 0: the shepherd agent stops it once every worker has
written a successful done marker, or when the run ends. It imports only the standard
library and torch, so it runs under whichever interpreter has torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from datetime import timedelta
from types import FrameType

NO_TORCH = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rendezvous.py", allow_abbrev=False,
                                     description="c10d rendezvous store for torchrun")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--status-interval", type=float, default=30.0, metavar="S",
                        help="print the number of keys this often (default 30)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    try:
        from torch.distributed import TCPStore
    except ImportError as e:
        print(f"pcp rendezvous: the torchrun launcher needs torch in {sys.executable} ({e})",
              file=sys.stderr, flush=True)
        return NO_TORCH
    # The server listens on every interface; 127.0.0.1 is only this process's own client.
    store = TCPStore("127.0.0.1", args.port, None, True, timedelta(seconds=60),
                     wait_for_workers=False, multi_tenant=True)
    # After the store: its server's threads must not take the signals (they would die
    # with the default action), so they are set up once it runs.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"pcp rendezvous: c10d store listening on port {args.port}", flush=True)
    while not stop.wait(args.status_interval):
        print(f"pcp rendezvous: {store.num_keys()} keys", flush=True)
    print("pcp rendezvous: stopping the store", flush=True)
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
