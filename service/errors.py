"""Error kinds the API answers with, and the mapping of store failures to 503."""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from service.metrics import Metrics

ERROR_KINDS = {
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "validation",
}


def store_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean the store is down (connection refused, timeouts), whatever the backend."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)


def install_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def on_store_down(_: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels("store_unavailable").inc()
        return JSONResponse({"detail": f"memory store unavailable: {exc}"}, status_code=503)

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        metrics.errors.labels("validation").inc()
        assert isinstance(exc, RequestValidationError)
        return JSONResponse({"detail": jsonable(exc.errors())}, status_code=422)

    for kind in store_errors():
        app.add_exception_handler(kind, on_store_down)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        metrics.errors.labels(ERROR_KINDS.get(exc.status_code, f"http_{exc.status_code}")).inc()
        return await http_exception_handler(request, exc)

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http_error)


MAX_ECHO_CHARS = 200


def jsonable(errors: object) -> object:
    """Validation errors as strict JSON: non-finite floats (a ``NaN`` sent by the client) become text,
    lone surrogates are escaped, and echoed input is cut to ``MAX_ECHO_CHARS`` so a huge bad field is
    not sent back whole."""
    from fastapi.encoders import jsonable_encoder

    return _safe(jsonable_encoder(errors))


def _safe(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_ECHO_CHARS:
            value = value[:MAX_ECHO_CHARS] + f"... ({len(value)} characters)"
        # Text that has no UTF-8 form (a lone surrogate the client sent) is echoed escaped.
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    return value
