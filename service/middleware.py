"""ASGI middleware: request latency and in-flight metrics, and the request body size limit."""

from __future__ import annotations

import json
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics


class ObserveRequests:
    """Times every HTTP request by route template (never by raw path) and rejects bodies over a limit."""

    def __init__(self, app: ASGIApp, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            await self._too_large(scope, send)
            return
        status = 500
        seen = 0
        refused = False

        async def counting_receive() -> Message:
            # A body without a declared length is counted as it streams: past the limit the 413 goes
            # out at once and the app sees a disconnect (whatever it answers then is dropped).
            nonlocal seen, refused, status
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body and not refused:
                refused, status = True, 413
                await self._too_large(scope, send)
            return {"type": "http.disconnect"} if refused else message

        async def recording_send(message: Message) -> None:
            nonlocal status
            if refused:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, recording_send)
        except Exception:
            if refused:  # the app failed on the cut-off body; the client already has its 413
                return
            self.metrics.errors.labels("internal").inc()
            raise
        finally:
            self.metrics.in_flight.dec()
            self.metrics.request_latency.labels(_route(scope), scope["method"], f"{status // 100}xx").observe(
                time.perf_counter() - t0
            )

    async def _too_large(self, scope: Scope, send: Send) -> None:
        self.metrics.errors.labels("payload_too_large").inc()
        body = json.dumps({"detail": f"request body over the limit of {self.max_body} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
