"""GET /metrics (Prometheus text format); behind the API key when ``MEMREC_METRICS_REQUIRE_KEY``."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.errors import store_errors
from service.routes.health import READY_TIMEOUT_S
from service.state import MetricsDep, Runtime

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/metrics", response_class=Response)
async def prometheus(request: Request, metrics: MetricsDep) -> Response:
    """Prometheus text format; store gauges are refreshed on each scrape."""
    rt: Runtime | None = getattr(request.app.state, "runtime", None)
    if rt is not None:
        try:
            metrics.observe_store(await asyncio.wait_for(rt.store.stats(), READY_TIMEOUT_S))
        except store_errors() as exc:
            log.warning("store stats unavailable for /metrics: %s", exc)
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
