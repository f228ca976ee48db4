"""DELETE /users/{user_id}: erase a user.

Everything the store holds of the user goes, on every replica: their history, the memories built from
it (so no other user's answer retrieves, explains, votes with or counts a transition of them again),
their per-user memories and the idempotency keys of their events. Idempotent: erasing a user the store
holds nothing of answers 200 with zero counts. The user's id is not logged.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam

from service.schemas import ErasureResponse, Problem, UserId
from service.state import MetricsDep, OutcomesDep, VersionsDep
from service.swap import SwapperDep

log = logging.getLogger(__name__)
router = APIRouter(tags=["users"])


@router.delete(  # an id may hold a '/' (as GET /users/{user_id}/history)
    "/users/{user_id:path}",
    response_model=ErasureResponse,
    responses={422: {"model": Problem}, 503: {"model": Problem}},
)
async def erase_user(
    versions: VersionsDep,
    metrics: MetricsDep,
    outcomes: OutcomesDep,
    swapper: SwapperDep,
    user_id: Annotated[UserId, PathParam(min_length=1, max_length=256)],
) -> ErasureResponse:
    """Erase everything stored about the user and answer what was removed. Once it returns, this
    replica's answers hold nothing of them; the others' within their replication lag. With two model
    versions side by side both erase them (the primary's counts are answered)."""
    with versions.writes.write():
        erased = [await rt.store.erase_user(user_id) for rt in versions.runtimes][0]
    outcomes.forget(user_id)
    swapper.erased(user_id)
    metrics.erasures.inc()
    log.info("erased a user: %d history items, %d memories", erased.history, erased.memories)
    return ErasureResponse(
        user_id=user_id,
        history_items=erased.history,
        memories=erased.memories,
        user_memories=erased.user_memories,
        event_ids=erased.event_ids,
        interactions=erased.interactions,
    )
