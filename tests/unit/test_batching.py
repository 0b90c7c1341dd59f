"""The batcher with a deterministic numpy 'model': budgets, isolation, backpressure."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import Batcher, BatchLimits, ItemError, QueueFullError, WorkerStoppedError, _Item, plan_batches
from service.metrics import Metrics


def _items(costs, modality="text"):
    return [_Item(payload=str(c), modality=modality, cost=c, future=None, loop=None) for c in costs]


def test_plan_sorts_by_length_and_respects_padded_token_budget():
    limits = BatchLimits(max_batch_tokens=100, max_batch_size=8)
    batches = plan_batches(_items([50, 5, 10, 5, 25, 10]), limits)
    assert [[i.cost for i in b] for b in batches] == [[5, 5, 10, 10], [25, 50]]
    for batch in batches:
        assert len(batch) * max(i.cost for i in batch) <= 100


def test_plan_caps_batch_size_and_separates_modalities():
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3, max_batch_images=2)
    batches = plan_batches(_items([1] * 7) + _items([1] * 3, "image"), limits)
    assert [(b[0].modality, len(b)) for b in batches] == [
        ("text", 3),
        ("text", 3),
        ("text", 1),
        ("image", 2),
        ("image", 1),
    ]


def test_oversized_single_input_still_gets_its_own_batch():
    assert [len(b) for b in plan_batches(_items([500, 1]), BatchLimits(max_batch_tokens=100))] == [1, 1]


def fake_encode(payloads, modality):
    """Embeds '<n>' as [n, 1]; the payload 'bad' makes the whole batch raise."""
    if "bad" in payloads:
        raise ValueError("cannot embed 'bad'")
    return np.array([[float(p), 1.0] for p in payloads], dtype=np.float32)


@pytest.fixture()
def batcher():
    b = Batcher(name="fake", encode=fake_encode, limits=BatchLimits(max_queue_items=16), metrics=Metrics())
    b.start()
    yield b
    b.stop()


def test_results_come_back_in_input_order(batcher):
    async def run():
        return await batcher.embed(["3", "1", "2"], "text", [3, 1, 2])

    np.testing.assert_array_equal(asyncio.run(run())[:, 0], [3, 1, 2])


def test_a_bad_input_fails_only_its_request_and_the_worker_survives(batcher):
    gate = threading.Event()
    original = batcher.encode

    def gated(payloads, modality):
        gate.wait(5)
        return original(payloads, modality)

    batcher.encode = gated

    async def run():
        good = asyncio.ensure_future(batcher.embed(["1", "2"], "text", [1, 1]))
        bad = asyncio.ensure_future(batcher.embed(["4", "bad"], "text", [1, 1]))
        await asyncio.sleep(0.05)
        gate.set()  # both requests are now queued together and land in one batch
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(run())
    np.testing.assert_array_equal(good[:, 0], [1, 2])
    assert isinstance(bad, ItemError) and bad.index == 1 and "cannot embed" in str(bad.cause)
    assert batcher.alive and batcher.pending == 0
    assert batcher.last_error is not None


def test_full_queue_refuses_at_once_with_retry_after(batcher):
    gate = threading.Event()
    original = batcher.encode
    batcher.encode = lambda p, m: (gate.wait(5), original(p, m))[1]

    async def run():
        first = asyncio.ensure_future(batcher.embed([str(i) for i in range(10)], "text", [1] * 10))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as refused:
            await batcher.embed([str(i) for i in range(10)], "text", [1] * 10)
        assert refused.value.retry_after >= 1
        gate.set()
        return await first

    assert len(asyncio.run(run())) == 10
    assert batcher.pending == 0


def test_cancelled_requests_are_dropped_from_the_queue(batcher):
    gate = threading.Event()
    original = batcher.encode
    batcher.encode = lambda p, m: (gate.wait(5), original(p, m))[1]

    async def run():
        blocker = asyncio.ensure_future(batcher.embed(["1"], "text", [1]))
        await asyncio.sleep(0.05)
        abandoned = asyncio.ensure_future(batcher.embed(["2", "3"], "text", [1, 1]))
        await asyncio.sleep(0.05)
        abandoned.cancel()
        gate.set()
        await blocker
        for _ in range(100):
            if batcher.pending == 0:
                return
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert batcher.pending == 0 and batcher.alive


def test_stopped_batcher_reports_dead(batcher):
    batcher.stop()
    assert not batcher.alive
    with pytest.raises(WorkerStoppedError, match="not running"):
        asyncio.run(batcher.embed(["1"], "text", [1]))
