"""POST /admin/reload: check the model path now and move to the version it leads to (service.swap)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter

from service.schemas import Problem, SwapResponse
from service.swap import SwapperDep

router = APIRouter(tags=["admin"])


@router.post("/admin/reload", response_model=SwapResponse, responses={503: {"model": Problem}})
async def reload_model(swapper: SwapperDep) -> SwapResponse:
    """Resolve ``MEMREC_MODEL_DIR`` now (as the periodic check does) and, when it leads to another
    model version, move this replica to it without downtime; answers when the move is over (at the
    Beauty bank size, tens of seconds). ``outcome``: ``switched``, ``current`` (nothing to do) or
    ``failed`` (``error`` says why; the old version serves on). Other replicas and workers follow at
    their own next check."""
    return SwapResponse(**asdict(await swapper.check()))
