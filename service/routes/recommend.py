"""POST /recommend."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException

from service.pipeline import Answer, Query, Why
from service.responses import OrjsonResponse
from service.routes.items import ItemNames
from service.schemas import Problem, RecommendRequest, RecommendResponse
from service.state import MetricsDep, OutcomesDep, VersionsDep

router = APIRouter(tags=["recommend"])


@router.post(
    "/recommend",
    response_model=RecommendResponse,
    response_model_exclude_none=True,
    response_class=OrjsonResponse,
    responses={422: {"model": Problem}, 503: {"model": Problem}},
)
async def recommend(
    body: RecommendRequest, versions: VersionsDep, metrics: MetricsDep, outcomes: OutcomesDep
) -> OrjsonResponse:
    """Top-n items for a user: stored history (+ ``history``) → encode → retrieve → fuse → rank.
    A user without any history gets the most popular items of the training data (``strategy`` popular).
    While the store is unreachable the answer is ``degraded``: the request's own ``history`` (or the
    popular items) with this replica's index, instead of an error. Items marked unavailable are never
    returned. Item ids unknown to the service are skipped in ``history`` and ``exclude_items``
    (``MEMREC_NEW_ITEMS=accept``) or a 422 (``reject``). With two model versions served side by side the
    user's version answers (``model_version``), always the same one for the same user."""
    t0 = time.perf_counter()
    rt = versions.for_user(body.user_id)
    cap = rt.settings.max_request_items
    for name, values in (("history", body.history), ("exclude_items", body.exclude_items)):
        if values is not None and len(values) > cap:
            raise HTTPException(422, f"{name} holds {len(values)} items; the limit is {cap}")
    query = Query(
        user_id=body.user_id,
        n=body.n,
        history=tuple(await rt.items.read(body.history, "history")) if body.history else (),
        exclude_seen=body.exclude_seen,
        exclude_items=tuple(await rt.items.read(body.exclude_items, "exclude_items"))
        if body.exclude_items
        else (),
        explain=body.explain,
    )
    answer = await rt.pipeline.recommend(query)
    names = await rt.items.names()
    out = answer_json(body.user_id, answer, rt.model_version, names)
    if body.explain:
        out["memories"] = _memories(answer, names, await rt.store.unavailable_items())
    outcomes.answered(body.user_id, rt.model_version, [item["item_id"] for item in out["items"]])
    metrics.recommendations.labels(rt.model_version, answer.strategy).inc()
    metrics.recommend_latency.labels(rt.model_version).observe(time.perf_counter() - t0)
    return OrjsonResponse(out)


def answer_json(user_id: str, answer: Answer, model_version: str, names: ItemNames) -> dict[str, Any]:
    """The answer in ``RecommendResponse``'s shape (fields left out where it leaves out a None), as plain
    dicts and lists: no pydantic object per item."""
    ext = names.external
    scores = answer.scores.tolist()
    if answer.why:
        items = [
            {"item_id": ext(i), "score": s, "why": _why(w, names)}
            for i, s, w in zip(answer.items.tolist(), scores, answer.why, strict=True)
        ]
    else:
        items = [{"item_id": ext(i), "score": s} for i, s in zip(answer.items.tolist(), scores, strict=True)]
    return {
        "user_id": user_id,
        "items": items,
        "k_used": answer.k_used,
        "model_version": model_version,
        "strategy": answer.strategy,
        "degraded": answer.degraded,
    }


def _memories(answer: Answer, names: ItemNames, unavailable: np.ndarray) -> list[dict[str, Any]]:
    """The fused memories as ``MemoryOut``; ``unavailable`` (m,): the items marked unavailable, which the
    memories naming them say."""
    ext = names.external
    off = np.isin(np.asarray([m.item for m in answer.memories], np.int64), unavailable).tolist()
    return [
        {
            "memory_id": m.memory_id,
            "item_id": ext(m.item),
            "user_id": m.user_id,
            "similarity": m.similarity,
            "prefix_len": m.prefix_len,
            "timestamp": m.timestamp,
            "available": not gone,
        }
        for m, gone in zip(answer.memories, off, strict=True)
    ]


def _why(w: Why, names: ItemNames) -> dict[str, Any]:
    """One item's ``ItemWhy``."""
    ext = names.external
    return {
        "encoder_rank": w.encoder_rank,
        "model": w.model,
        "vote": w.vote,
        "transitions": w.transitions,
        "memories": list(w.memories),
        "follows": [{"item_id": ext(a), "weight": share} for a, share in w.follows],
    }
