"""The node agent: runs one node's part of a run on a worker VM or on the shepherd host.

A worker agent reads its assignment from instance metadata and powers the VM off when it is
done; the shepherd agent takes start and stop commands from a Pub/Sub subscription and never
powers its host off. Both realise the binary, write `booted`, run the binary with its logs
streamed to the bucket, write `done`, and stop the binary when the run ends elsewhere, at
the deadline or on SIGTERM (the binary contract in docs/agent.md).
"""
