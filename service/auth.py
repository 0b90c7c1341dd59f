"""API keys with scopes, and the middleware that checks them and applies the limits.

Keys come from `DUET_API_KEYS_FILE` (YAML or JSON list) and/or `DUET_API_KEYS` (JSON), each
`{name, key_sha256 (or hash), salt?, scopes, rate_limit_per_second?, rate_limit_burst?,
concurrency_limit?}`. Only hashes are configured (`duet keys create` prints a key once, with
its entry); a presented key is hashed and compared in constant time, and is never logged or
kept. No keys configured: auth is off (the embedded default works with no setup), and the
limits apply per client address.

Auth is ASGI middleware, not a FastAPI dependency, because FastAPI reads and validates the
body before it runs dependencies: a 422 (or a 413 for a big upload) would answer a caller
who has not even presented a key. Here a request is refused before its body is read.

Every route's scope is in `ROUTE_SCOPES`, one table to review; a route missing from it needs
`admin` (closed by default) and start-up logs it. Page routes (router tag "pages") and the
OpenAPI docs are public: the pages call the API with a key the user types.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from re import Pattern
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.routing import compile_path
from starlette.types import ASGIApp, Receive, Scope, Send

from common.logs import bind, unbind
from service.errors import error_response
from service.limits import Decision, Limiter, Limits, release_shielded
from service.settings import Settings

logger = logging.getLogger(__name__)

SCOPES = ("embed", "search", "write", "train", "admin")
ANY_KEY = "any"  # a route any valid key may call, whatever its scopes
PUBLIC = "public"
MAX_KEY_CHARS = 512

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


class KeyConfig(BaseModel):
    """One configured key: its hash, never the key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=100)
    key_sha256: str = Field(
        validation_alias=AliasChoices("key_sha256", "hash"),
        description="hex sha256 of salt + key (of the key alone without a salt)",
    )
    salt: str = ""
    scopes: list[str]
    rate_limit_per_second: float | None = Field(default=None, ge=0)
    rate_limit_burst: int | None = Field(default=None, ge=0)
    concurrency_limit: int | None = Field(default=None, ge=0)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.removeprefix("sha256:").strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a hex sha256 digest (64 hex characters; `duet keys create` prints one)")
        return value

    @field_validator("scopes", mode="before")
    @classmethod
    def _known_scopes(cls, value: Any) -> list[str]:
        scopes = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        scopes = [s for s in scopes if s]
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; scopes are {', '.join(SCOPES)}")
        return scopes


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    salt: bytes
    scopes: frozenset[str]
    limits: Limits

    def allows(self, scope: str) -> bool:
        return scope == ANY_KEY or "admin" in self.scopes or scope in self.scopes


def hash_key(key: str, salt: str = "") -> str:
    return hashlib.sha256(salt.encode() + key.encode()).hexdigest()


class KeyRing:
    """The configured keys. `verify` hashes a presented key once per distinct salt and
    compares against every digest with `hmac.compare_digest`; hits are cached by the
    presented key's unsalted hash, so a busy key costs one sha256 per request."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique; repeated: {duplicates}")
        self.keys = keys
        self._salts = sorted({k.salt for k in keys})
        self._cache: dict[bytes, ApiKey] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def verify(self, presented: str) -> ApiKey | None:
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        raw = presented.encode()
        cache_key = hashlib.sha256(raw).digest()
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        digests = {salt: hashlib.sha256(salt + raw).digest() for salt in self._salts}
        found = None
        for key in self.keys:
            if hmac.compare_digest(digests[key.salt], key.digest):
                found = key
        if found is not None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[cache_key] = found
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Keys from the file and the environment together; any problem stops start-up with
        a message naming the entry (a service that silently runs without auth is worse)."""
        entries: list[tuple[str, Any]] = []
        if settings.api_keys_file is not None:
            entries += [(f"{settings.api_keys_file}[{i}]", e) for i, e in enumerate(_read_keys_file(settings))]
        entries += [(f"DUET_API_KEYS[{i}]", e) for i, e in enumerate(settings.api_keys or [])]
        keys = []
        for where, entry in entries:
            try:
                config = KeyConfig.model_validate(entry)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"invalid API key entry {where}: {problems}") from None
            keys.append(_api_key(config, settings))
        return cls(keys)


def _read_keys_file(settings: Settings) -> list[Any]:
    path = Path(settings.api_keys_file or "")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"DUET_API_KEYS_FILE {path}: {exc}") from None
    loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if isinstance(loaded, dict) and "keys" in loaded:
        loaded = loaded["keys"]
    if not isinstance(loaded, list):
        raise ValueError(f"DUET_API_KEYS_FILE {path}: expected a list of keys (or a mapping with 'keys')")
    return loaded


def default_limits(settings: Settings) -> Limits:
    return Limits(settings.rate_limit_per_second, settings.rate_limit_burst, settings.concurrency_limit)


def _api_key(config: KeyConfig, settings: Settings) -> ApiKey:
    defaults = default_limits(settings)
    limits = Limits(
        per_second=_pick(config.rate_limit_per_second, defaults.per_second),
        burst=_pick(config.rate_limit_burst, defaults.burst),
        concurrency=_pick(config.concurrency_limit, defaults.concurrency),
    )
    return ApiKey(
        name=config.name,
        digest=bytes.fromhex(config.key_sha256),
        salt=config.salt.encode(),
        scopes=frozenset(config.scopes),
        limits=limits,
    )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


# -- the middleware ------------------------------------------------------------------------------


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
                logger.warning("route %s has no scope in service/auth.py ROUTE_SCOPES: it needs an admin key", route)

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
