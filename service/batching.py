"""Cross-request dynamic batching: one worker thread per loaded model.

Requests never run a model on the event loop. They put their inputs on a bounded queue and
await futures; the model's worker thread takes what is waiting, sorts it by length, cuts it
into batches under a padded-token budget (texts) or an image count (images), runs each
batch, and hands results back to the event loop. While one batch runs, new requests pile up
and form the next one, so batching costs no added delay at low load.

Backpressure: the queue is bounded in inputs; a request that would overflow it is refused
at once with `QueueFullError` (HTTP 429 + Retry-After), never parked in an unbounded backlog.

Isolation: if a batch fails, its inputs are retried one by one so only the bad input's
request sees an error, and the worker thread itself never exits on an input error; `alive`
turns false only if the thread dies, which `/health` reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from encoders.contract import Modality
from service.metrics import Metrics

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[Any], Modality], np.ndarray]


class QueueFullError(Exception):
    def __init__(self, pending: int, limit: int, retry_after: int) -> None:
        super().__init__(f"queue full: {pending} inputs pending, limit {limit}")
        self.retry_after = retry_after


class WorkerStoppedError(RuntimeError):
    """The worker thread is gone (stopped, or died); `/health` is red."""


class ItemError(Exception):
    """One input failed inside the model; `index` is its position in the submitted list."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(f"input {index}: {cause}")
        self.index = index
        self.cause = cause


@dataclass(eq=False)
class _Item:
    payload: Any
    modality: Modality
    cost: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_batch_images: int = 64
    max_queue_items: int = 8192


def plan_batches(items: Sequence[_Item], limits: BatchLimits) -> list[list[_Item]]:
    """Group items by modality, sort by cost, cut under the budgets.

    Text budget is on *padded* tokens (batch size x longest input), which is what the forward
    pass really computes; sorting first keeps padding low.
    """
    batches: list[list[_Item]] = []
    for modality in ("text", "image"):
        group = sorted((i for i in items if i.modality == modality), key=lambda i: i.cost)
        current: list[_Item] = []
        for item in group:
            if current and not _fits(current, item, modality, limits):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
    return batches


def _fits(current: list[_Item], item: _Item, modality: str, limits: BatchLimits) -> bool:
    size = len(current) + 1
    if modality == "image":
        return size <= limits.max_batch_images
    longest = max(item.cost, current[-1].cost)
    return size <= limits.max_batch_size and size * longest <= limits.max_batch_tokens


@dataclass
class _Throughput:
    """Exponential moving average of inputs/second, for Retry-After estimates."""

    rate: float = 0.0
    alpha: float = 0.2

    def update(self, count: int, seconds: float) -> None:
        if seconds > 0:
            sample = count / seconds
            self.rate = sample if self.rate == 0 else (1 - self.alpha) * self.rate + self.alpha * sample


@dataclass
class Batcher:
    """Queue + worker thread for one model. Create, `start()`, `await embed(...)`, `stop()`."""

    name: str
    encode: EncodeFn
    limits: BatchLimits
    metrics: Metrics
    _queue: deque[_Item] = field(default_factory=deque, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _pending: int = field(default=0, init=False)
    _stopping: bool = field(default=False, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _throughput: _Throughput = field(default_factory=_Throughput, init=False)
    last_error: str | None = field(default=None, init=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    def retry_after(self, extra: int = 0) -> int:
        rate = self._throughput.rate or 50.0
        return max(1, min(60, math.ceil((self._pending + extra) / rate)))

    async def embed(self, payloads: Sequence[Any], modality: Modality, costs: Sequence[int]) -> np.ndarray:
        """Embed `payloads` (all of one modality); rows come back in input order."""
        if not payloads:
            raise ValueError("nothing to embed")
        loop = asyncio.get_running_loop()
        items = [_Item(p, modality, c, loop.create_future(), loop) for p, c in zip(payloads, costs)]
        with self._cond:
            if self._stopping or not self.alive:
                raise WorkerStoppedError(f"the batch worker for {self.name} is not running")
            if self._pending + len(items) > self.limits.max_queue_items:
                raise QueueFullError(self._pending, self.limits.max_queue_items, self.retry_after(len(items)))
            self._pending += len(items)
            self._queue.extend(items)
            self.metrics.queue_depth.labels(self.name).set(self._pending)
            self._cond.notify()
        results = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                raise ItemError(index, result)
        return np.stack(results)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- worker thread -----------------------------------------------------------------

    def _take(self) -> list[_Item] | None:
        window = 4 * max(self.limits.max_batch_size, self.limits.max_batch_images)
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait(timeout=1.0)
            if self._stopping and not self._queue:
                return None
            taken = [self._queue.popleft() for _ in range(min(window, len(self._queue)))]
            live = [i for i in taken if not i.future.cancelled()]  # their clients went away
            self._pending -= len(taken) - len(live)
        return live

    def _run(self) -> None:
        while True:
            taken = self._take()
            if taken is None:
                return
            for batch in plan_batches(taken, self.limits):
                try:
                    self._run_batch(batch)
                except Exception as exc:  # the loop must outlive any single batch
                    logger.exception("batch of %d failed in %s", len(batch), self.name)
                    self._deliver(batch, [exc] * len(batch))

    def _run_batch(self, batch: list[_Item]) -> None:
        modality = batch[0].modality
        started = time.perf_counter()
        try:
            vectors: list[Any] = list(self.encode([i.payload for i in batch], modality))
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            if len(batch) == 1:
                vectors = [exc]
            else:
                logger.warning("batch of %d failed (%s); retrying inputs one by one", len(batch), exc)
                vectors = [self._run_single(i) for i in batch]
        elapsed = time.perf_counter() - started
        self._throughput.update(len(batch), elapsed)
        self.metrics.batch_size.labels(self.name, modality).observe(len(batch))
        self.metrics.inference_latency.labels(self.name, modality).observe(elapsed)
        self.metrics.inputs.labels(self.name, modality).inc(len(batch))
        if modality == "text":
            self.metrics.batch_tokens.labels(self.name).observe(len(batch) * batch[-1].cost)
        self._deliver(batch, vectors)

    def _run_single(self, item: _Item) -> Any:
        try:
            return self.encode([item.payload], item.modality)[0]
        except Exception as exc:
            return exc

    def _deliver(self, batch: list[_Item], results: list[Any]) -> None:
        with self._cond:
            self._pending -= len(batch)
            self.metrics.queue_depth.labels(self.name).set(self._pending)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for item, result in zip(batch, results):
            by_loop.setdefault(item.loop, []).append((item.future, result))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (app shut down): nobody waits
                loop.call_soon_threadsafe(_settle, pairs)


def _settle(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in pairs:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
