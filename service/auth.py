"""Optional API key: when ``MEMREC_API_KEY`` is set, the API routes need it.

The key travels in the ``X-API-Key`` header or as ``Authorization: Bearer <key>``; it is compared in
constant time. The app factory attaches :func:`require_api_key` to the API routers only when a key is
set (so the OpenAPI document declares security exactly when it is enforced); ``/livez`` and ``/readyz``
stay open (probes carry no secrets), ``/metrics`` needs the key only when ``MEMREC_METRICS_REQUIRE_KEY``
is true. The key is never logged (a ``SecretStr`` setting).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.state import SettingsDep

_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the service's API key")
_bearer = HTTPBearer(auto_error=False, description="the service's API key as a bearer token")
HeaderKey = Annotated[str | None, Security(_header)]
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]

UNAUTHORIZED = "missing or wrong API key: send it in the X-API-Key header or as 'Authorization: Bearer <key>'"


def check_key(expected: str | None, header_key: str | None, bearer_key: str | None) -> bool:
    """True when no key is configured or the given one matches (constant time)."""
    if expected is None:
        return True
    given = header_key if header_key is not None else bearer_key
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


async def require_api_key(
    settings: SettingsDep,
    header_key: HeaderKey,
    bearer: BearerKey,
) -> None:
    expected = settings.api_key.get_secret_value() if settings.api_key is not None else None
    if not check_key(expected, header_key, bearer.credentials if bearer is not None else None):
        raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
