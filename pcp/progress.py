"""Where a run's node phases come from: the markers in the bucket, not the stack document.

Each node writes `markers/<run>/<node>/booted.json` and `done.json`, which describe
themselves in their object metadata, so one listing tells every node's phase. The stack
document holds only what changes with the run (`pcp.core.lifecycle.compact`); the functions,
the sweeper, the CLI and the summary all read node phases through `observe`, so there is one
definition of a node's phase (`pcp.core.lifecycle.fold_markers`).
"""

from __future__ import annotations

from pcp.core.errors import PermanentError
from pcp.core.lifecycle import LIVE, fold_markers, markers_in
from pcp.core.messages import NodeMarker
from pcp.core.names import markers_prefix
from pcp.core.ports import BlobStore, Listed
from pcp.core.state import StackState


def observe(store: BlobStore, state: StackState, unless: str | None = None,
            listing: list[Listed] | None = None) -> tuple[StackState, tuple[NodeMarker, ...]]:
    """`state` with its active run's node phases derived from the run's markers, and those
    markers. One listing (or `listing`, when the caller just listed that run's markers), plus
    a read for each marker whose writer did not describe it in its metadata; `unless` names a
    marker object to leave out (the event being handled)."""
    run = state.active
    if run is None or run.phase not in LIVE:
        return state, ()
    if listing is None or not all(i.name.startswith(markers_prefix(run.run_id))
                                  for i in listing):
        listing = store.scan(markers_prefix(run.run_id))
    listing = [i for i in listing if i.name != unless]
    markers, unread = markers_in(listing)
    for name in unread:
        blob = store.get(name)
        try:
            if blob is not None:
                markers += (NodeMarker.from_json(blob.data, name),)
        except PermanentError:
            continue  # a malformed marker is ignored here as it was by its own event
    return fold_markers(state, markers), markers
