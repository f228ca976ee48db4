"""GET /livez, GET /readyz: open to probes whatever the API key setting."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.errors import store_errors
from service.schemas import ReadyResponse
from service.state import MetricsDep
from service.versions import Versions

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 1.0


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}})
async def readyz(request: Request, metrics: MetricsDep) -> JSONResponse:
    """Ready when the model is loaded, the memory bank is in the store and the store answers; with two
    model versions side by side, both (the second's checks end in ``_b``)."""
    versions: Versions | None = getattr(request.app.state, "versions", None)
    checks = {"model": "ok" if versions is not None else "not loaded"}
    for rt, suffix in zip(versions.serving if versions else (), ("", "_b"), strict=False):
        try:
            stats = await asyncio.wait_for(rt.store.stats(), READY_TIMEOUT_S)
            if not suffix:
                metrics.observe_store(stats)
            checks["store" + suffix] = "ok"
            checks["index" + suffix] = f"ok ({stats.index_size} memories, {stats.index_kind})"
        except store_errors() as exc:
            checks["store" + suffix] = f"unavailable: {exc}"
    ready = all(v.startswith("ok") for v in checks.values())
    body = ReadyResponse(
        ready=ready,
        checks=checks,
        model_version=versions.primary.model_version if versions else None,
        model_versions=versions.names if versions else [],
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
