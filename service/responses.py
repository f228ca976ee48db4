"""JSON answers serialised by orjson, for the routes on the request path.

A route that returns one of these skips FastAPI's response-model pass (the answer's pydantic objects
built, validated and serialised again): the route builds plain dicts and lists in the documented shape,
and orjson writes them in one C call. The route keeps its ``response_model`` for the OpenAPI document.
FastAPI's own ``ORJSONResponse`` does the same, but is deprecated (FastAPI 0.165) and warns on every
instance it makes.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


class OrjsonResponse(JSONResponse):
    """A JSON response (FastAPI documents a JSONResponse subclass with the route's response model)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
