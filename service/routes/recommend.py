"""POST /recommend."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException

from service.pipeline import Answer, Query, Why
from service.routes.items import ItemNames
from service.schemas import (
    FollowOut,
    ItemWhy,
    MemoryOut,
    Problem,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
)
from service.state import RuntimeDep

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    response_model_exclude_none=True,
    responses={422: {"model": Problem}, 503: {"model": Problem}},
)
async def recommend(body: RecommendRequest, rt: RuntimeDep) -> RecommendResponse:
    """Top-n items for a user: stored history (+ ``history``) → encode → retrieve → fuse → rank.
    A user without any history gets the most popular items of the training data (``strategy`` popular).
    While the store is unreachable the answer is ``degraded``: the request's own ``history`` (or the
    popular items) with this replica's index, instead of an error. Items marked unavailable are never
    returned. Item ids unknown to the service are skipped in ``history`` and ``exclude_items``
    (``MEMREC_NEW_ITEMS=accept``) or a 422 (``reject``)."""
    cap = rt.settings.max_request_items
    for name, values in (("history", body.history), ("exclude_items", body.exclude_items)):
        if values is not None and len(values) > cap:
            raise HTTPException(422, f"{name} holds {len(values)} items; the limit is {cap}")
    query = Query(
        user_id=body.user_id,
        n=body.n,
        history=tuple(await rt.items.read(body.history or [], "history")),
        exclude_seen=body.exclude_seen,
        exclude_items=tuple(await rt.items.read(body.exclude_items or [], "exclude_items")),
        explain=body.explain,
    )
    answer = await rt.pipeline.recommend(query)
    unavailable = await rt.store.unavailable_items()
    return _response(body, answer, rt, await rt.items.names(), unavailable)


def _response(
    body: RecommendRequest, answer: Answer, rt: RuntimeDep, names: ItemNames, unavailable: np.ndarray
) -> RecommendResponse:
    """``unavailable``: (m,) the items marked unavailable, which the memories naming them say."""
    ext = names.external
    memories = None
    if body.explain:
        off = np.isin(np.asarray([m.item for m in answer.memories], np.int64), unavailable)
        memories = [
            MemoryOut(
                memory_id=m.memory_id,
                item_id=ext(m.item),
                user_id=m.user_id,
                similarity=m.similarity,
                prefix_len=m.prefix_len,
                timestamp=m.timestamp,
                available=not unavailable_item,
            )
            for m, unavailable_item in zip(answer.memories, off.tolist(), strict=True)
        ]
    whys: list[ItemWhy | None] = [None] * len(answer.items)
    if body.explain and answer.why:
        whys = [_why(w, names) for w in answer.why]
    return RecommendResponse(
        user_id=body.user_id,
        items=[
            ScoredItem(item_id=ext(int(i)), score=float(s), why=w)
            for i, s, w in zip(answer.items, answer.scores, whys, strict=True)
        ],
        k_used=answer.k_used,
        model_version=rt.model_version,
        strategy=answer.strategy,
        degraded=answer.degraded,
        memories=memories,
    )


def _why(w: Why, names: ItemNames) -> ItemWhy:
    ext = names.external
    return ItemWhy(
        encoder_rank=w.encoder_rank,
        model=w.model,
        vote=w.vote,
        transitions=w.transitions,
        memories=list(w.memories),
        follows=[FollowOut(item_id=ext(a), weight=share) for a, share in w.follows],
    )
