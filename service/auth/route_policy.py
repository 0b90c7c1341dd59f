"""Which scope each route needs: the `ROUTE_SCOPES` table, and how a request finds its rule.

Every route's scope is in `ROUTE_SCOPES`, one table to review; a route missing from it needs
`admin` (closed by default) and start-up logs it. Page routes (router tag "pages") and the
OpenAPI docs are public: the pages call the API with a key the user types. Kept apart from the
middleware because it is policy, read by reviewers and by `service.errors` (the 405's `Allow`).
"""

from __future__ import annotations

from dataclasses import dataclass
from re import Pattern
from typing import Any

from starlette.routing import compile_path

from service.auth.keys import ANY_KEY
from service.settings import Settings

PUBLIC = "public"

# (method, route template) -> scope. Reads of the model list are open to any key (clients pick a
# model by them); dropping a whole collection is destructive and irreversible, so admin.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("POST", "/v1/embeddings"): "embed",
    ("GET", "/v1/models"): ANY_KEY,
    ("GET", "/v1/models/{name}"): ANY_KEY,
    ("GET", "/v1/models/{name}/versions"): ANY_KEY,
    ("GET", "/v1/models/{name}/versions/{version}"): ANY_KEY,
    ("GET", "/v1/models/{name}/aliases"): ANY_KEY,
    ("PUT", "/v1/models/{name}/aliases/{alias}"): "write",
    ("GET", "/v1/collections"): "search",
    ("GET", "/v1/collections/{name}"): "search",
    ("GET", "/v1/collections/{name}/items"): "search",
    ("GET", "/v1/collections/{name}/items/{item_id:path}"): "search",
    ("POST", "/v1/collections/{name}/search"): "search",
    ("POST", "/v1/collections"): "write",
    ("PUT", "/v1/collections/{name}/items"): "write",
    ("POST", "/v1/collections/{name}/items/delete"): "write",
    ("POST", "/v1/collections/{name}/rebuild"): "write",
    ("POST", "/v1/collections/{name}/reembed"): "write",
    ("DELETE", "/v1/collections/{name}"): "admin",
    ("POST", "/v1/jobs"): "train",
    ("GET", "/v1/jobs"): "train",
    ("GET", "/v1/jobs/{job_id}"): "train",
    ("GET", "/v1/jobs/{job_id}/events"): "train",
    ("POST", "/v1/jobs/{job_id}/cancel"): "train",
    ("POST", "/v1/jobs/{job_id}/resume"): "train",
    ("POST", "/v1/datasets"): "train",
    ("GET", "/v1/datasets"): "train",
}
# Long-lived streams: rate-limited when they start, but not held against the concurrency limit
# (a client watching a few jobs would otherwise use up its slots for hours).
STREAMS = {"/v1/jobs/{job_id}/events"}
DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PAGE_TAG = "pages"


@dataclass(frozen=True)
class RouteRule:
    scope: str  # a scope, ANY_KEY or PUBLIC
    stream: bool = False


@dataclass(frozen=True)
class AppRoute:
    """One route as a request sees it: full path template, methods, and its router's tags."""

    path: str
    methods: frozenset[str]
    tags: tuple[str, ...]
    regex: Pattern[str]


def app_routes(routes: list[Any]) -> list[AppRoute]:
    """Every route of the app, flattened. FastAPI >= 0.16x keeps included routers as branches
    (`app.routes` lists them, not their routes); its `iter_route_contexts` flattens them, with
    the prefixes applied. Older versions list the routes themselves."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:
        flat: list[Any] = list(routes)
    else:
        flat = list(iter_route_contexts(routes))
    found = []
    for route in flat:
        path = getattr(route, "path", None)
        if not path:
            continue
        original = getattr(route, "original_route", route)
        found.append(
            AppRoute(
                path=path,
                methods=frozenset(getattr(route, "methods", None) or ()),
                tags=tuple(getattr(original, "tags", None) or ()),
                regex=compile_path(path)[0],
            )
        )
    return found


def rule_for(route: AppRoute, method: str, settings: Settings) -> RouteRule:
    path = route.path
    if PAGE_TAG in route.tags or path in DOCS:
        return RouteRule(PUBLIC)
    if path in ("/health", "/ready"):
        return RouteRule(PUBLIC if settings.auth_public_health else ANY_KEY)
    if path == "/metrics":
        return RouteRule(PUBLIC if settings.auth_public_metrics else ANY_KEY)
    scope = ROUTE_SCOPES.get((method, path))
    if scope is None:
        known = any((m, path) in ROUTE_SCOPES for m in route.methods)
        scope = ANY_KEY if method not in route.methods and known else "admin"  # a 405 needs only a valid key
    return RouteRule(scope, stream=path in STREAMS)


def unmapped_routes(routes: list[AppRoute]) -> list[str]:
    """Routes that fall to the admin default because `ROUTE_SCOPES` does not name them."""
    missing = []
    for route in routes:
        if route.path in ("/health", "/ready", "/metrics", *DOCS) or PAGE_TAG in route.tags:
            continue
        missing += [
            f"{m} {route.path}" for m in sorted(route.methods) if m != "HEAD" and (m, route.path) not in ROUTE_SCOPES
        ]
    return missing
