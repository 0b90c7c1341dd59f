"""ASGI middleware: request body limit (413) and per-route request metrics.

Written as plain ASGI (not `BaseHTTPMiddleware`) so bodies stream through without being
buffered twice and the limit applies to chunked uploads that send no Content-Length.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import error_response
from service.metrics import Metrics


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, larger: dict[str, int] | None = None) -> None:
        """`larger`: path -> limit for the few routes that take big bodies (dataset uploads)."""
        self.app = app
        self.max_bytes = max_bytes
        self.larger = larger or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.larger.get(scope.get("path", ""), self.max_bytes)
        if limit != self.max_bytes:
            await self.app(scope, receive, send)  # the route enforces its own limit while streaming
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        received = 0
        rejected = False

        async def limited_receive() -> Message:
            # Past the limit, answer 413 ourselves and tell the app the client left, so it
            # stops reading; whatever it then tries to send is dropped (see guarded_send).
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    rejected = True
                    await self._reject(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not rejected:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            f"request body is larger than {self.max_bytes} bytes (DUET_MAX_BODY_BYTES); send fewer or "
            "smaller inputs per request",
            "request_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


class MetricsMiddleware:
    """Counts requests and latency by route template (not raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics_getter: Any) -> None:
        self.app = app
        self.metrics_getter = metrics_getter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            metrics: Metrics | None = self.metrics_getter()
            if metrics is not None:
                route = scope.get("route")
                label = getattr(route, "path", "unmatched")
                metrics.requests.labels(label, str(status)).inc()
                metrics.request_latency.labels(label).observe(time.perf_counter() - started)
