"""ASGI middleware: request ids, access lines and per-route request metrics; request body limit (413).

Written as plain ASGI (not `BaseHTTPMiddleware`) so bodies stream through without being
buffered twice and the limit applies to chunked uploads that send no Content-Length.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.logs import bind, clean_request_id, unbind
from service.errors import error_response
from service.metrics import Metrics

access_logger = logging.getLogger("duet.access")


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


class HeadMiddleware:
    """HEAD wherever GET is answered (load balancers probe with HEAD): the request runs as a GET
    (the same route, auth scope and status) and the response keeps its headers, Content-Length
    included, without its body. FastAPI routes declare only GET; Starlette's own routes add HEAD
    but FastAPI's do not, so one place does it for every route, pages and docs included.

    Once the response has started, the app is told the client left, so a stream (job events)
    ends instead of running on for a body nobody reads."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return
        started = False

        async def head_receive() -> Message:
            if started:
                return {"type": "http.disconnect"}
            return await receive()

        async def head_send(message: Message) -> None:
            # The response ends with its headers; the app's body messages are dropped.
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                await send(message)
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        inner = {**scope, "method": "GET"}
        try:
            await self.app(inner, head_receive, head_send)
        finally:
            # What the router and auth noted, for the access line and metrics outside (by route).
            for key in ("route", "duet.route", "duet.key"):
                if key in inner:
                    scope[key] = inner[key]


class RequestIdMiddleware:
    """Gives every request an id: the client's `X-Request-ID` (cleaned, at most 128 characters)
    or a new one. It is bound to every log line of the request (a contextvar, so concurrent
    requests never mix), returned in the response's `X-Request-ID`, stored in jobs the request
    creates, and ends in one access line (method, path, status, duration, key name).

    It also counts requests and latency by route template (not raw path: bounded label
    values): the access line and the metrics need the same status and duration, so one
    wrapper on the hot path measures both."""

    def __init__(self, app: ASGIApp, metrics_getter: Any = None) -> None:
        self.app = app
        self.metrics_getter = metrics_getter or (lambda: None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope.get("headers") or () if k == b"x-request-id"), b"")
        request_id = clean_request_id(raw.decode("latin-1"))
        token = bind(request_id=request_id)
        header = (b"x-request-id", request_id.encode())
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, send_with_id)
            failed = False
        finally:
            elapsed = time.perf_counter() - started
            self._count(scope, status, elapsed)
            if access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    "%s %s %d",
                    scope.get("method"),
                    scope.get("path"),
                    status,
                    extra={
                        "method": scope.get("method"),
                        "path": scope.get("path"),
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                        "client": (scope.get("client") or ("",))[0],
                        **({"key": scope["duet.key"]} if "duet.key" in scope else {}),
                    },
                )
            # After an exception the id stays bound: the 500 handler outside this middleware logs
            # with it, and the request's task ends there, taking its context with it.
            if not failed:
                unbind(token)

    def _count(self, scope: Scope, status: int, elapsed: float) -> None:
        metrics: Metrics | None = self.metrics_getter()
        if metrics is not None:
            route = scope.get("route") or scope.get("duet.route")  # the latter: refused by auth
            label = getattr(route, "path", "unmatched")
            metrics.requests.labels(label, str(status)).inc()
            metrics.request_latency.labels(label).observe(elapsed)
