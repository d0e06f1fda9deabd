"""The Cloud Functions' edge: what the entry points in functions/main.py share.

`events` decodes CloudEvents (Pub/Sub messages, new marker objects), `services` holds the clock
and the per-process Service, `rejections` records input that can never succeed, `logline`
writes each invocation's one structured line. The entry points stay about fifteen lines each:
parse, call the service, log.

Nothing here builds a client at import time: the cold start pays only for what it uses, and
`google.cloud.compute_v1` (1.5 s to import) is never imported by these modules themselves.
"""
