"""POST /interactions."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, HTTPException

from memory_store import Interaction
from service.schemas import InteractionsRequest, InteractionsResponse, Problem
from service.state import OutcomesDep, VersionsDep
from service.versions import Outcomes, Versions

router = APIRouter(tags=["interactions"])


@router.post(
    "/interactions",
    response_model=InteractionsResponse,
    responses={413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
)
async def interactions(
    body: InteractionsRequest, versions: VersionsDep, outcomes: OutcomesDep
) -> InteractionsResponse:
    """Record interactions: each appends to its user's history and adds one memory (key = the encoding of
    the history before the item), retrievable by the next /recommend. The whole batch is validated
    before anything is written; a rejected batch stores nothing. ``event_id`` makes a retry idempotent.
    An item the model was not trained on is registered (``MEMREC_NEW_ITEMS=accept``) or a 422
    (``reject``). With two model versions served side by side both store the batch (the primary's
    counts are answered); a retry after a failure is safe, by ``event_id``."""
    limit = versions.primary.settings.max_events_per_batch
    if len(body.events) > limit:
        raise HTTPException(413, f"batch holds {len(body.events)} events; the limit is {limit}")
    with versions.writes.write():
        return await _store(body, versions, outcomes)


async def _store(body: InteractionsRequest, versions: Versions, outcomes: Outcomes) -> InteractionsResponse:
    """The batch into every version's store; the primary's counts."""
    # Every version's ids first: a 422 (reject mode, in a serving version) stores nothing anywhere. A
    # version being moved to takes whatever the serving ones took.
    externals = [ev.item_id for ev in body.events]
    ids = [await rt.items.write(externals, "events") for rt in versions.serving]
    ids += [await rt.items.write(externals, "events", accept=True) for rt in versions.warming]
    now = time.time()
    # While a version is being moved to, an event without an id gets one: the move replays what the
    # serving version logged, and the id makes an event written both ways count once (service.swap).
    fresh = bool(versions.warming)
    event_ids = [ev.event_id or (f"auto:{uuid.uuid4().hex}" if fresh else None) for ev in body.events]
    counts = []
    for rt, items in zip(versions.runtimes, ids, strict=True):
        events = [
            Interaction(ev.user_id, item, now if ev.timestamp is None else ev.timestamp, event_id)
            for ev, item, event_id in zip(body.events, items, event_ids, strict=True)
        ]
        counts.append(await rt.ingestor.ingest(events))
    accepted, duplicates = counts[0]
    if accepted == len(body.events):  # a retry (duplicates) is not a second outcome
        for ev in body.events:
            outcomes.interacted(ev.user_id, ev.item_id)
    return InteractionsResponse(accepted=accepted, duplicates=duplicates)
