"""Per-client rate and concurrency limits: in this process, or shared through Redis.

A client is an API key (auth on) or a client address (auth off). Two limits, each off at 0:
- rate: a token bucket of `burst` tokens refilled at `per_second`; a request takes one;
- concurrency: requests of the client in flight at once.

With `redis_url` set every replica counts in the same Redis, atomically (one Lua script per
check), so the limits hold for the whole deployment. A concurrency slot is a member of a
sorted set scored with its lease's expiry: released when the request ends (every path: the
release runs shielded from cancellation), and renewed while the request runs, so the slots of
a replica that dies expire within `lease_seconds` instead of blocking the client forever.

If Redis cannot be reached the limiter fails open: requests pass unlimited (logged once per
outage, counted in `duet_limiter_unavailable_total`) and Redis is tried again a few seconds
later. Refusing all traffic because the limiter's store is away would turn a Redis blip into
an outage of embeddings and search, which do not otherwise need Redis.

Also here: `MemoryBudget`, the bytes decoded images may hold at once in this process (see
`service.inputs.prepare`), and `return_freed_memory`, which hands freed heap back to the system.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

RETRY_REDIS_AFTER_SECONDS = 5.0
MAX_LOCAL_CLIENTS = 10_000


@dataclass(frozen=True)
class Limits:
    """What one client may do; 0 turns a limit off."""

    per_second: float = 0.0
    burst: int = 0
    concurrency: int = 0

    @property
    def active(self) -> bool:
        return self.per_second > 0 or self.concurrency > 0

    @property
    def bucket(self) -> int:
        """Bucket size: `burst`, or one second's worth of requests (at least 1)."""
        return self.burst if self.burst > 0 else max(1, math.ceil(self.per_second))


@dataclass
class Decision:
    allowed: bool
    limit: str = ""  # "rate" or "concurrency" when refused
    retry_after: float = 0.0
    lease: Any = None  # what `release` needs; None when nothing is held

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after)))


class LocalLimiter:
    """Limits kept in this process: right for one replica, or when there is no Redis."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self._in_flight: dict[str, int] = {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def acquire(self, client: str, limits: Limits, concurrent: bool = True) -> Decision:
        """Runs on the event loop without awaiting, so check-and-take is atomic here."""
        if limits.per_second > 0:
            wait = self._take_token(client, limits)
            if wait > 0:
                return Decision(False, "rate", wait)
        if limits.concurrency > 0 and concurrent:
            held = self._in_flight.get(client, 0)
            if held >= limits.concurrency:
                return Decision(False, "concurrency", 1.0)
            self._in_flight[client] = held + 1
            return Decision(True, lease=client)
        return Decision(True)

    async def release(self, decision: Decision) -> None:
        client = decision.lease
        if client is None:
            return
        left = self._in_flight.get(client, 0) - 1
        if left > 0:
            self._in_flight[client] = left
        else:
            self._in_flight.pop(client, None)

    def _take_token(self, client: str, limits: Limits) -> float:
        """Take a token; 0 when taken, else the seconds until one is there."""
        now = time.monotonic()
        size = limits.bucket
        tokens, at = self._buckets.get(client, (float(size), now))
        tokens = min(float(size), tokens + (now - at) * limits.per_second)
        if tokens >= 1:
            self._buckets[client] = (tokens - 1, now)
            if len(self._buckets) > MAX_LOCAL_CLIENTS:
                self._forget_idle(now, limits)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1 - tokens) / limits.per_second

    def _forget_idle(self, now: float, limits: Limits) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing), so clients seen
        once (auth off: any address) cannot grow the table without bound."""
        full_after = limits.bucket / limits.per_second
        self._buckets = {c: (t, at) for c, (t, at) in self._buckets.items() if now - at < full_after}


# KEYS[1] bucket; ARGV: rate, size. Redis' own clock, so replicas with skewed clocks agree.
_RATE_LUA = """
local rate = tonumber(ARGV[1])
local size = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = size
  at = now
end
tokens = math.min(size, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(size / rate * 1000) + 1000)
return tostring(wait)
"""

# KEYS[1] slots (sorted set: token -> lease expiry); ARGV: limit, lease seconds, token.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000))
return 1
"""

# KEYS[1] slots; ARGV: lease seconds, tokens...: push the leases of requests still running.
_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 1000))
return 1
"""


class RedisLimiter:
    """Limits shared by every replica through Redis; fails open while Redis is unreachable."""

    def __init__(
        self,
        url: str,
        prefix: str,
        lease_seconds: float = 30.0,
        timeout_s: float = 0.5,
        metrics: Callable[[], Metrics | None] | None = None,
    ) -> None:
        self.url = url
        self.prefix = f"{prefix}:limit"
        self.lease_seconds = lease_seconds
        self.timeout_s = timeout_s
        self.metrics_getter = metrics or (lambda: None)
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._held: dict[str, str] = {}  # token -> slots key, renewed while the request runs
        self._down_until = 0.0
        self._renewer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._renewer = asyncio.create_task(self._renew_loop())

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio as redis

            self._client = redis.Redis.from_url(
                self.url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s, decode_responses=True
            )
            self._scripts = {
                "rate": self._client.register_script(_RATE_LUA),
                "acquire": self._client.register_script(_ACQUIRE_LUA),
                "renew": self._client.register_script(_RENEW_LUA),
            }
        return self._client

    async def acquire(self, client: str, limits: Limits, concurrent: bool = True) -> Decision:
        if time.monotonic() < self._down_until:
            return self._fail_open(None)
        self._redis()
        try:
            if limits.per_second > 0:
                bucket = f"{self.prefix}:rate:{client}"
                wait = float(await self._scripts["rate"](keys=[bucket], args=[limits.per_second, limits.bucket]))
                if wait > 0:
                    return Decision(False, "rate", wait)
            if limits.concurrency > 0 and concurrent:
                key, token = f"{self.prefix}:slots:{client}", uuid.uuid4().hex
                taken = await self._scripts["acquire"](keys=[key], args=[limits.concurrency, self.lease_seconds, token])
                if not int(taken):
                    return Decision(False, "concurrency", 1.0)
                self._held[token] = key
                return Decision(True, lease=token)
        except Exception as exc:  # noqa: BLE001 - any Redis failure: fail open, never refuse traffic for it
            return self._fail_open(exc)
        return Decision(True)

    async def release(self, decision: Decision) -> None:
        token = decision.lease
        key = self._held.pop(token, None) if token is not None else None
        if key is None:
            return
        try:
            await self._redis().zrem(key, token)
        except Exception as exc:  # noqa: BLE001 - the lease expires on its own
            logger.warning("could not release a concurrency slot (it expires in %.0f s): %s", self.lease_seconds, exc)

    def _fail_open(self, exc: Exception | None) -> Decision:
        if exc is not None:
            if time.monotonic() >= self._down_until:
                logger.warning(
                    "rate limiter: Redis unreachable, letting requests through unlimited for %.0f s: %s",
                    RETRY_REDIS_AFTER_SECONDS,
                    exc,
                )
            self._down_until = time.monotonic() + RETRY_REDIS_AFTER_SECONDS
        metrics = self.metrics_getter()
        if metrics is not None:
            metrics.limiter_unavailable.inc()
        return Decision(True)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            by_key: dict[str, list[str]] = {}
            for token, key in list(self._held.items()):
                by_key.setdefault(key, []).append(token)
            for key, tokens in by_key.items():
                try:
                    await self._scripts["renew"](keys=[key], args=[self.lease_seconds, *tokens])
                except Exception as exc:  # noqa: BLE001 - renewed again next turn
                    logger.warning("could not renew concurrency leases: %s", exc)
                    break


Limiter = LocalLimiter | RedisLimiter


def build_limiter(settings: Settings, metrics_getter: Callable[[], Metrics | None] | None = None) -> Limiter:
    if settings.redis_url:
        return RedisLimiter(
            settings.redis_url, settings.redis_prefix, settings.limit_lease_seconds, metrics=metrics_getter
        )
    return LocalLimiter()


async def release_shielded(limiter: Limiter, decision: Decision) -> None:
    """Release even when the request's task is being cancelled (a client that disconnected)."""
    with anyio.CancelScope(shield=True):
        await limiter.release(decision)


# -- memory for decoded images ------------------------------------------------------------------


class ImageMemoryError(Exception):
    """A request's decoded images do not fit the image memory budget (DUET_MAX_IMAGE_MEMORY_BYTES);
    service/errors.py's table says how each refusal answers."""


class ImagesTooLargeError(ImageMemoryError):
    """The images need more than the whole budget: this request can never be decoded (413)."""

    def __init__(self, need: int, total: int) -> None:
        super().__init__(
            f"the images of this request need {need} bytes of memory once decoded; the server allows "
            f"{total} (DUET_MAX_IMAGE_MEMORY_BYTES): send fewer or smaller images per request"
        )
        self.need = need
        self.total = total


class ImageMemoryFullError(ImageMemoryError):
    """Other requests' images hold the room this one needs now: a retry soon may fit (429). A
    background re-embed waits `retry_after` seconds and tries again instead of failing."""

    retry_after = 1

    def __init__(self, need: int) -> None:
        super().__init__(
            f"the server is decoding other images and has no room for this request's {need} bytes now; retry"
        )
        self.need = need


class MemoryBudget:
    """Bytes that decoded images may hold at once in this process, all requests together.

    Memory belongs to the process, so there is one budget per configured size
    (`memory_budget`), shared by every app in it. `reserve` is all-or-nothing and thread-safe.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, amount: int) -> bool:
        """Take `amount` bytes if they fit now; False (nothing taken) if they do not."""
        with self._lock:
            if self.used + amount > self.total:
                return False
            self.used += amount
            return True

    def claim(self, amount: int) -> None:
        """`reserve`, or say why not: `ImagesTooLargeError` when `amount` can never fit,
        `ImageMemoryFullError` when it does not fit now."""
        if amount > self.total:
            raise ImagesTooLargeError(amount, self.total)
        if not self.reserve(amount):
            raise ImageMemoryFullError(amount)

    def release(self, amount: int) -> None:
        with self._lock:
            self.used = max(0, self.used - amount)


_BUDGETS: dict[int, MemoryBudget] = {}
_BUDGETS_LOCK = threading.Lock()


def memory_budget(total: int) -> MemoryBudget:
    """The process's budget of `total` bytes (created on first use, never at import)."""
    with _BUDGETS_LOCK:
        budget = _BUDGETS.get(total)
        if budget is None:
            budget = _BUDGETS[total] = MemoryBudget(total)
        return budget


_TRIM_EVERY_S = 1.0
_trimmed_at = 0.0


def return_freed_memory(force: bool = False) -> bool:
    """Hand the heap's free pages back to the system (glibc `malloc_trim`), at most once a second.

    Decoding large images frees tens of MB at a time; glibc keeps freed heap memory (in every
    thread's arena) for reuse, so without this the process stays at its peak RSS after a burst
    of big images. A no-op where there is no glibc. True when it ran."""
    global _trimmed_at
    now = time.monotonic()
    if not force and now - _trimmed_at < _TRIM_EVERY_S:
        return False
    _trimmed_at = now
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
