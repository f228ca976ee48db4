"""POST /interactions."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException

from memory_store import Interaction
from service.schemas import InteractionsRequest, InteractionsResponse, Problem
from service.state import RuntimeDep

router = APIRouter(tags=["interactions"])


@router.post(
    "/interactions",
    response_model=InteractionsResponse,
    responses={413: {"model": Problem}, 422: {"model": Problem}, 503: {"model": Problem}},
)
async def interactions(body: InteractionsRequest, rt: RuntimeDep) -> InteractionsResponse:
    """Record interactions: each appends to its user's history and adds one memory (key = the encoding of
    the history before the item), retrievable by the next /recommend. The whole batch is validated
    before anything is written; a rejected batch stores nothing. ``event_id`` makes a retry idempotent.
    An item the model was not trained on is registered (``MEMREC_NEW_ITEMS=accept``) or a 422
    (``reject``)."""
    limit = rt.settings.max_events_per_batch
    if len(body.events) > limit:
        raise HTTPException(413, f"batch holds {len(body.events)} events; the limit is {limit}")
    items = await rt.items.write([ev.item_id for ev in body.events], "events")
    now = time.time()
    events = [
        Interaction(ev.user_id, item, now if ev.timestamp is None else ev.timestamp, ev.event_id)
        for ev, item in zip(body.events, items, strict=True)
    ]
    accepted, duplicates = await rt.ingestor.ingest(events)
    return InteractionsResponse(accepted=accepted, duplicates=duplicates)
