"""Cross-request dynamic batching: a queue and worker threads per loaded model.

Requests never run a model on the event loop. They put their inputs on a bounded queue and
await futures; each of the model's worker threads repeatedly picks one batch from what is
waiting, runs it, and hands its results back to the event loop. A batch always holds the
oldest waiting input (so nothing waits behind a stream of better-fitting inputs) and only
inputs of its modality, under a budget: for a model that runs text unpadded (packed), the
oldest texts up to a token count; for padded text, the run of similar lengths around the
oldest input that wastes the fewest padded tokens; for images, the oldest up to a count.
Whatever is not picked stays queued with what arrives meanwhile, so each pick chooses from
everything waiting then: under many small requests the workers never sit idle while the
event loop answers the last batch, and no fixed wait window delays a lone request.

Admission control: a request is admitted or refused (`QueueFullError`, HTTP 429 + Retry-After)
when it arrives, before its tokens are counted or its images decoded. `admit(n)` reserves its
inputs; they count as work ahead of every later request from then on, while they are still
being prepared, then queued, then run. A request is refused when the work ahead of it, divided
by the measured throughput, exceeds the wait budget (`max_queue_wait_s`), or when its inputs
would overflow the queue's bound in inputs. So overload turns into 429s instead of latency:
what is accepted waits about the budget at most, never an unbounded backlog.

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
from service.limits import return_freed_memory
from service.metrics import Metrics

logger = logging.getLogger(__name__)

EncodeFn = Callable[[list[Any], Modality], np.ndarray]
BUSY_WINDOW_S = 1.0  # busy seconds per throughput sample


class QueueFullError(Exception):
    """A request refused at admission; `model` (the batcher's model ref) and `retry_after` are what
    service/errors.py's table renders into the 429 and its Retry-After."""

    def __init__(self, pending: int, limit: int, retry_after: int, detail: str | None = None, *, model: str) -> None:
        super().__init__(detail or f"queue full: {pending} inputs pending, limit {limit}")
        self.retry_after = retry_after
        self.model = model


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
    """`max_batch_tokens` bounds padded tokens (batch size x longest), or, with `packed` (the
    model runs text unpadded), the sum of the batch's lengths."""

    max_batch_tokens: int = 16384
    max_batch_size: int = 256
    max_batch_images: int = 64
    max_queue_items: int = 8192
    packed: bool = False
    max_queue_wait_s: float = 0.0  # admission's wait budget; 0: only the queue's bound in inputs


def wait_refusal(ahead: int, rate: float, budget_s: float) -> int | None:
    """Admission by estimated wait: None to admit, else the Retry-After seconds.

    `ahead` is the work admitted before this request and not yet finished (inputs being
    prepared, queued or running), `rate` the measured throughput in inputs/s. The wait is
    `ahead / rate`; past `budget_s` the request is refused, and told to come back once the
    excess has drained. The request's own size is not counted (its own forward passes are
    not waiting), so a large legal request is admitted whenever a small one would be.
    Admitted when the budget is off, before any throughput is measured, or when nothing is ahead.
    """
    if budget_s <= 0 or rate <= 0 or ahead <= 0:
        return None
    wait = ahead / rate
    if wait <= budget_s:
        return None
    return max(1, min(60, math.ceil(wait - budget_s)))


def pick_batch(waiting: Sequence[_Item], limits: BatchLimits) -> list[_Item]:
    """The next batch from `waiting` (queue order, oldest first; not empty).

    It holds `waiting[0]`, so every input is run after at most as many batches as there are
    inputs ahead of it, and only inputs of its modality. Images cost the same per input: the
    oldest ones, up to `max_batch_images`. Packed text costs its real tokens: the oldest texts
    while their lengths fit `max_batch_tokens`. Padded text costs `batch size x longest`: among
    the texts sorted by length, the window of `max_batch_size` around the oldest one with the
    fewest padding tokens, shrunk until it fits `max_batch_tokens`. An input over the budget
    by itself runs alone.
    """
    oldest = waiting[0]
    same = [i for i in waiting if i.modality == oldest.modality]
    if oldest.modality == "image":
        return same[: limits.max_batch_images]
    if limits.packed:
        return _oldest_within_budget(same, limits)
    return _least_padded_window(same, oldest, limits)


def _oldest_within_budget(texts: list[_Item], limits: BatchLimits) -> list[_Item]:
    batch, tokens = [texts[0]], texts[0].cost
    for item in texts[1 : limits.max_batch_size]:
        if tokens + item.cost > limits.max_batch_tokens:
            break
        batch.append(item)
        tokens += item.cost
    return batch


def _least_padded_window(texts: list[_Item], oldest: _Item, limits: BatchLimits) -> list[_Item]:
    ranked = sorted(texts, key=lambda i: i.cost)  # stable: equal lengths keep queue order
    at = next(n for n, item in enumerate(ranked) if item is oldest)
    for size in range(min(len(ranked), limits.max_batch_size), 1, -1):
        best: tuple[int, list[_Item]] | None = None
        for start in range(max(0, at - size + 1), min(at, len(ranked) - size) + 1):
            window = ranked[start : start + size]
            padded = size * window[-1].cost
            if padded <= limits.max_batch_tokens:
                waste = padded - sum(i.cost for i in window)
                if best is None or waste < best[0]:
                    best = (waste, window)
        if best is not None:
            return best[1]
    return [oldest]


@dataclass
class Throughput:
    """Exponential moving average of the batcher's inputs/second while it is busy, for admission
    and Retry-After. Fed once per `BUSY_WINDOW_S` of busy time (some batch in flight), with the
    inputs delivered in it: all workers together, and everything that slows them down (other
    processes, the event loop, the GIL) is in it, while idle time is not."""

    rate: float = 0.0
    alpha: float = 0.2

    def update(self, count: int, seconds: float) -> None:
        if seconds > 0:
            sample = count / seconds
            self.rate = sample if self.rate == 0 else (1 - self.alpha) * self.rate + self.alpha * sample


@dataclass
class Batcher:
    """Queue + worker threads for one model. Create, `start()`, `await embed(...)`, `stop()`.

    `workers` threads take batches from the one queue and run them at once (`encode` must be
    thread-safe): on a CPU, one single-threaded forward pass per core keeps every core busy,
    where one pass spread over all cores stalls whenever the event loop takes one of them.
    """

    name: str
    encode: EncodeFn
    limits: BatchLimits
    metrics: Metrics
    workers: int = 1
    _queue: deque[_Item] = field(default_factory=deque, init=False)
    _cond: threading.Condition = field(default_factory=threading.Condition, init=False)
    _pending: int = field(default=0, init=False)
    _stopping: bool = field(default=False, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    throughput: Throughput = field(default_factory=Throughput)
    clock: Callable[[], float] = time.monotonic
    _reserved: int = field(default=0, init=False)  # admitted inputs not yet queued
    _running: int = field(default=0, init=False)  # batches taken and not yet delivered
    _busy_mark: float = field(default=0.0, init=False)
    _busy_seconds: float = field(default=0.0, init=False)
    _busy_inputs: int = field(default=0, init=False)
    last_error: str | None = field(default=None, init=False)

    def start(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, name=f"batcher-{self.name}-{n}", daemon=True)
            for n in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        """Every worker thread is running (one that died means a bug: `/health` turns red)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def reserved(self) -> int:
        """Inputs admitted and still being prepared (not yet queued)."""
        return self._reserved

    @property
    def rate(self) -> float:
        """Measured inputs/s of all workers together; 0 until a batch has run."""
        return self.throughput.rate

    def retry_after(self, extra: int = 0) -> int:
        rate = self.rate or 50.0 * self.workers
        return max(1, min(60, math.ceil((self._pending + self._reserved + extra) / rate)))

    def admit(self, count: int) -> Admission:
        """Admit a request of `count` inputs, or raise `QueueFullError` (see the module doc).

        Call it before any expensive work for the request; pass the ticket to `embed`, and
        release it (it is a context manager) when the request ends, whatever happened."""
        with self._cond:
            self._check_room(count)
            self._reserved += count
        return Admission(self, count)

    def _check_room(self, count: int) -> None:
        """Under `_cond`: raise unless `count` more inputs may join the work ahead."""
        if self._stopping or not self.alive:
            raise WorkerStoppedError(f"the batch worker for {self.name} is not running")
        ahead = self._pending + self._reserved
        if ahead + count > self.limits.max_queue_items:
            raise QueueFullError(ahead, self.limits.max_queue_items, self.retry_after(count), model=self.name)
        rate = self.rate
        refusal = wait_refusal(ahead, rate, self.limits.max_queue_wait_s)
        if refusal is not None:
            raise QueueFullError(
                ahead,
                self.limits.max_queue_items,
                refusal,
                f"estimated wait {ahead / rate:.1f}s ({ahead} inputs ahead at {rate:.0f} inputs/s) is over "
                f"the {self.limits.max_queue_wait_s:g}s budget (DUET_MAX_QUEUE_WAIT_MS)",
                model=self.name,
            )

    def _unreserve(self, count: int) -> None:
        with self._cond:
            self._reserved -= count

    async def embed(
        self, payloads: Sequence[Any], modality: Modality, costs: Sequence[int], admission: Admission | None = None
    ) -> np.ndarray:
        """Embed `payloads` (all of one modality); rows come back in input order.

        With `admission` (from `admit`), the inputs were admitted already and move from its
        reservation to the queue; without, they are admitted here."""
        if not payloads:
            raise ValueError("nothing to embed")
        loop = asyncio.get_running_loop()
        items = [_Item(p, modality, c, loop.create_future(), loop) for p, c in zip(payloads, costs)]
        with self._cond:
            admitted = admission.take(len(items)) if admission is not None else 0
            self._reserved -= admitted
            if self._stopping or not self.alive:
                raise WorkerStoppedError(f"the batch worker for {self.name} is not running")
            if admitted < len(items):
                self._check_room(len(items) - admitted)
            self._pending += len(items)
            self._queue.extend(items)
            self.metrics.queue_depth.labels(self.name).set(self._pending)
            self._cond.notify()
        results = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        vectors: list[np.ndarray] = []
        for index, result in enumerate(results):
            if isinstance(result, BaseException):
                raise ItemError(index, result)
            vectors.append(result)
        return np.stack(vectors)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # -- worker thread -----------------------------------------------------------------

    def _next_batch(self) -> list[_Item] | None:
        """Wait for inputs, then take one batch off the queue (None once stopping and drained).

        Only the front of the queue is considered (a bounded sort per batch however long the
        queue); inputs whose clients went away are dropped there. The rest go back in order.
        """
        window = 4 * max(self.limits.max_batch_size, self.limits.max_batch_images)
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self._cond.wait(timeout=1.0)
                if not self._queue:
                    return None
                front = [self._queue.popleft() for _ in range(min(window, len(self._queue)))]
                live = [i for i in front if not i.future.cancelled()]
                self._pending -= len(front) - len(live)
                if live:
                    break
            batch = pick_batch(live, self.limits)
            self._started_batch()
            picked = {id(i) for i in batch}
            self._queue.extendleft(reversed([i for i in live if id(i) not in picked]))
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
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
        self.metrics.batch_size.labels(self.name, modality).observe(len(batch))
        self.metrics.inference_latency.labels(self.name, modality).observe(elapsed)
        self.metrics.inputs.labels(self.name, modality).inc(len(batch))
        if modality == "text":
            tokens = sum(i.cost for i in batch) if self.limits.packed else len(batch) * max(i.cost for i in batch)
            self.metrics.batch_tokens.labels(self.name).observe(tokens)
        self._deliver(batch, vectors)
        if modality == "image" and not self._queue:
            # The image batches are done: hand the tens of MB their tensors freed back to the system.
            return_freed_memory(force=True)

    def _run_single(self, item: _Item) -> Any:
        try:
            return self.encode([item.payload], item.modality)[0]
        except Exception as exc:
            return exc

    def _started_batch(self) -> None:
        """Under `_cond`: a batch was taken; busy time starts when the first one in flight does."""
        if self._running == 0:
            self._busy_mark = self.clock()
        self._running += 1

    def _finished_batch(self, count: int) -> None:
        """Under `_cond`: a batch of `count` inputs was delivered; measure throughput over busy time."""
        now = self.clock()
        self._busy_seconds += now - self._busy_mark
        self._busy_mark = now
        self._busy_inputs += count
        self._running -= 1
        if self._busy_seconds >= BUSY_WINDOW_S:
            self.throughput.update(self._busy_inputs, self._busy_seconds)
            self._busy_seconds, self._busy_inputs = 0.0, 0

    def _deliver(self, batch: list[_Item], results: list[Any]) -> None:
        with self._cond:
            self._pending -= len(batch)
            self._finished_batch(len(batch))
            self.metrics.queue_depth.labels(self.name).set(self._pending)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for item, result in zip(batch, results):
            by_loop.setdefault(item.loop, []).append((item.future, result))
        for loop, pairs in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed (app shut down): nobody waits
                loop.call_soon_threadsafe(_settle, pairs)


class Admission:
    """A request's admitted inputs, held from `Batcher.admit` until they are queued by `embed`
    or the request ends (`release`, or leaving the `with` block), so they count as work ahead
    of later requests while they are still being prepared."""

    def __init__(self, batcher: Batcher, count: int) -> None:
        self._batcher = batcher
        self.remaining = count

    def take(self, count: int) -> int:
        """Hand up to `count` inputs over to the queue (the caller holds the batcher's lock)."""
        taken = min(count, self.remaining)
        self.remaining -= taken
        return taken

    def release(self) -> None:
        """Give back what was never queued (the request failed or ended early)."""
        if self.remaining:
            count, self.remaining = self.remaining, 0
            self._batcher._unreserve(count)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _settle(pairs: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in pairs:
        if future.done():
            continue
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
