"""The ASGI middleware that applies the keys, the route policy and the client's limits.

Auth is ASGI middleware, not a FastAPI dependency, because FastAPI reads and validates the
body before it runs dependencies: a 422 (or a 413 for a big upload) would answer a caller
who has not even presented a key. Here a request is refused before its body is read.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from common.logs import bind, unbind
from service.auth.keys import ANY_KEY, ApiKey, KeyRing, default_limits
from service.auth.route_policy import PUBLIC, AppRoute, RouteRule, app_routes, rule_for, unmapped_routes
from service.errors import error_response
from service.limits import Decision, Limiter, Limits, release_shielded
from service.settings import Settings

logger = logging.getLogger(__name__)


class AuthMiddleware:
    """401/403 by key and scope, then 429 by the client's limits, before the app reads a byte
    of the body. The key's name is bound to the request's log lines (never the key)."""

    def __init__(
        self, app: ASGIApp, router: Any, keys: KeyRing, limiter: Limiter, settings: Settings, metrics_getter: Any
    ) -> None:
        """Built by Starlette at the first request, when every route is included."""
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.settings = settings
        self.metrics_getter = metrics_getter
        self.defaults = default_limits(settings)
        self.routes = app_routes(router.routes)
        self._rules = {(route.path, m): rule_for(route, m, settings) for route in self.routes for m in route.methods}
        if keys.enabled:
            for route in unmapped_routes(self.routes):
                logger.warning(
                    "route %s has no scope in service/auth/route_policy.py ROUTE_SCOPES: it needs an admin key", route
                )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not (self.keys.enabled or self.defaults.active):
            await self.app(scope, receive, send)  # the embedded default: nothing to check
            return
        rule, route = self._rule(scope)
        if route is not None:
            scope["duet.route"] = route  # labels the request metrics of a request refused here
        if rule.scope == PUBLIC:
            await self.app(scope, receive, send)
            return
        token = None
        if self.keys.enabled:
            key, refusal = self._authenticate(scope, rule)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
            assert key is not None
            client, limits = f"key:{key.name}", key.limits
            scope["duet.key"] = key.name  # for the access line, written outside this middleware
            token = bind(key=key.name)
        else:
            client, limits = f"ip:{(scope.get('client') or ('unknown',))[0]}", self.defaults
        try:
            await self._limited(client, limits, rule, scope, receive, send)
        finally:
            if token is not None:
                unbind(token)

    def _rule(self, scope: Scope) -> tuple[RouteRule, AppRoute | None]:
        """The rule of the route the router will pick: first full match (path and method), else
        the first path match (a 405 to come), else none (a 404 to come: it needs a valid key, so
        paths cannot be probed without one)."""
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        method = scope.get("method", "GET")
        partial = None
        for route in self.routes:
            if route.regex.match(path):
                if method in route.methods:
                    return self._rules[(route.path, method)], route
                partial = partial or route
        if partial is None:
            return RouteRule(ANY_KEY), None
        return rule_for(partial, method, self.settings), partial

    def _authenticate(self, scope: Scope, rule: RouteRule) -> tuple[ApiKey | None, Any]:
        presented = _presented_key(scope)
        if presented is None:
            return None, self._refuse(
                401,
                "an API key is required: send 'Authorization: Bearer <key>' (or 'X-API-Key: <key>')",
                "missing_api_key",
                {"WWW-Authenticate": 'Bearer realm="duet"'},
            )
        key = self.keys.verify(presented)
        if key is None:
            return None, self._refuse(
                401,
                "the API key is not valid",
                "invalid_api_key",
                {"WWW-Authenticate": 'Bearer realm="duet", error="invalid_token"'},
            )
        if not key.allows(rule.scope):
            needed = "any scope" if rule.scope == ANY_KEY else f"the '{rule.scope}' scope"
            return key, self._refuse(
                403,
                f"API key '{key.name}' lacks {needed} needed for {scope.get('method')} {scope.get('path')} "
                f"(it has: {', '.join(sorted(key.scopes)) or 'no scopes'})",
                "insufficient_scope",
                {"WWW-Authenticate": f'Bearer realm="duet", error="insufficient_scope", scope="{rule.scope}"'},
            )
        return key, None

    async def _limited(
        self, client: str, limits: Limits, rule: RouteRule, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if not limits.active:
            await self.app(scope, receive, send)
            return
        decision: Decision = await self.limiter.acquire(client, limits, concurrent=not rule.stream)
        if not decision.allowed:
            metrics = self.metrics_getter()
            if metrics is not None:
                metrics.rate_limited.labels(decision.limit).inc()
            what = (
                f"more than {limits.per_second:g} requests per second (burst {limits.bucket})"
                if decision.limit == "rate"
                else f"more than {limits.concurrency} requests at once"
            )
            response = self._refuse(
                429,
                f"rate limit: {what} for this {'key' if client.startswith('key:') else 'client'}; "
                f"retry after {decision.retry_after_header} s",
                "rate_limited" if decision.limit == "rate" else "too_many_concurrent_requests",
                {"Retry-After": decision.retry_after_header},
            )
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await release_shielded(self.limiter, decision)

    def _refuse(self, status: int, message: str, code: str, headers: dict[str, str]):
        metrics = self.metrics_getter()
        if metrics is not None:
            metrics.errors.labels(code).inc()
        return error_response(status, message, code, headers=headers)


def _presented_key(scope: Scope) -> str | None:
    authorization = x_api_key = None
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            authorization = value
        elif name == b"x-api-key":
            x_api_key = value
    if authorization is not None:
        scheme, _, credentials = authorization.decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if x_api_key is not None and x_api_key.strip():
        return x_api_key.decode("latin-1").strip()
    return None
