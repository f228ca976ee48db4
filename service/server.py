"""``memrec serve``: settings from the environment and the command line, then uvicorn."""

from __future__ import annotations

import logging
import os
from typing import Any

import uvicorn
from pydantic import ValidationError

from service.app import create_app
from service.settings import Settings

log = logging.getLogger(__name__)


def serve(overrides: dict[str, Any]) -> int:
    """Run the server until interrupted; command-line values win over ``MEMREC_*`` variables."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        log.error("invalid settings: %s", exc)
        return 2
    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": settings.graceful_shutdown_s,
    }
    if settings.workers == 1:
        uvicorn.run(create_app(settings), access_log=False, **common)
        return 0
    # Worker processes build their app from the environment: hand the command-line values down.
    for name, value in overrides.items():
        os.environ[f"MEMREC_{name.upper()}"] = str(value)
    uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, access_log=False, **common)
    return 0
