"""Pin a start request's image to its digest, once, where the request is accepted.

decide() is pure, so like the run's secret the digest is found here and rides on the accepted
request (`pinned_image`) into the run record; every node and every restart of the run pulls
that digest, whatever the tag points to later. The function resolves (not the CLI) so that a
request published by any means (the workflow, `gcloud pubsub topics publish`, `pcp run`) and a
stack's default image are pinned alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from pcp.adapters.registry import resolve_digest
from pcp.core.images import parse_image, program_of
from pcp.core.messages import StartRequest
from pcp.core.policy import Policy

Resolver = Callable[..., str]


def google_access_token() -> str:
    """The function's own service account token (cloud-platform scope)."""
    import google.auth
    import google.auth.transport.requests

    credentials, _ = google.auth.default(
        scopes=["https://www.googleapis.com/auth/cloud-platform"])
    credentials.refresh(google.auth.transport.requests.Request())
    return str(credentials.token)


def pin_image(request: StartRequest, policy: Policy,
              resolve: Resolver = resolve_digest) -> StartRequest:
    """`request` with `pinned_image` set when its run runs an image; unchanged otherwise.

    A registry refusal raises `PermanentError` (the request is rejected with the reason); an
    unreachable registry raises what the resolver raised (the trigger retries)."""
    program = program_of(request.binary, request.image, policy.default_binary,
                         policy.default_image)
    if program.image is None:
        return request
    ref = parse_image(program.image)
    if not ref.pinned:
        ref = ref.with_digest(resolve(ref, google_access_token))
    return replace(request, pinned_image=ref.by_digest)
