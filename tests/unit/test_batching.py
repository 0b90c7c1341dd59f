"""The batcher with a deterministic numpy 'model': budgets, isolation, backpressure."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.batching import (
    Batcher,
    BatchLimits,
    ItemError,
    QueueFullError,
    Throughput,
    WorkerStoppedError,
    _Item,
    pick_batch,
    wait_refusal,
)
from service.metrics import Metrics


def _items(costs, modality="text"):
    return [_Item(payload=str(c), modality=modality, cost=c, future=None, loop=None) for c in costs]


def _costs(batch):
    return [i.cost for i in batch]


def test_padded_pick_holds_the_oldest_and_its_least_padded_neighbours():
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3)
    waiting = _items([10, 50, 9, 52, 11, 48])
    # Around the oldest (10), sorted lengths 9, 10, 11 waste 3 padded tokens; any window with 48+ wastes far more.
    assert _costs(pick_batch(waiting, limits)) == [9, 10, 11]
    assert _costs(pick_batch(_items([50, 10, 9, 52, 11, 48]), limits)) == [48, 50, 52]


def test_padded_pick_shrinks_to_the_token_budget_and_an_oversized_input_runs_alone():
    limits = BatchLimits(max_batch_tokens=100, max_batch_size=8)
    batch = pick_batch(_items([25, 5, 10, 5, 50, 10]), limits)
    assert 25 in _costs(batch) and len(batch) * max(_costs(batch)) <= 100
    assert _costs(pick_batch(_items([500, 1, 1]), limits)) == [500]


def test_packed_pick_takes_the_oldest_texts_up_to_the_real_token_budget():
    limits = BatchLimits(max_batch_tokens=100, max_batch_size=8, packed=True)
    assert _costs(pick_batch(_items([50, 5, 40, 5, 30]), limits)) == [50, 5, 40, 5]
    assert _costs(pick_batch(_items([300, 5]), limits)) == [300]
    assert len(pick_batch(_items([1] * 20), limits)) == 8


def test_pick_keeps_to_the_oldest_inputs_modality():
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=3, max_batch_images=2)
    mixed = _items([1], "image") + _items([1, 1]) + _items([1, 1], "image")
    assert [i.modality for i in pick_batch(mixed, limits)] == ["image", "image"]
    assert [i.modality for i in pick_batch(mixed[1:], limits)] == ["text", "text"]


def test_a_long_text_behind_a_stream_of_short_ones_is_not_starved():
    """Each pick holds the oldest input, so the queue drains in order of arrival at worst."""
    limits = BatchLimits(max_batch_tokens=10_000, max_batch_size=4)
    waiting = _items([200] + [5] * 30)
    first = pick_batch(waiting, limits)
    assert 200 in _costs(first)


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


def test_several_workers_run_batches_at_once_from_one_queue():
    both_running = threading.Barrier(2, timeout=5)
    threads_seen = set()

    def encode(payloads, modality):
        threads_seen.add(threading.current_thread().name)
        both_running.wait()  # fails (BrokenBarrierError) unless two batches are in flight together
        return fake_encode(payloads, modality)

    limits = BatchLimits(max_batch_size=2, max_queue_items=16)
    b = Batcher(name="pair", encode=encode, limits=limits, metrics=Metrics(), workers=2)
    b.start()
    try:

        async def run():
            return await asyncio.gather(b.embed(["1", "2"], "text", [1, 1]), b.embed(["3", "4"], "text", [1, 1]))

        first, second = asyncio.run(run())
    finally:
        b.stop()
    np.testing.assert_array_equal(first[:, 0], [1, 2])
    np.testing.assert_array_equal(second[:, 0], [3, 4])
    assert len(threads_seen) == 2
    assert not b.alive


# -- admission control: deterministic (a fixed throughput is injected, no timing is asserted) --


class FixedThroughput(Throughput):
    """A throughput that measuring does not move: the admission arithmetic is exact."""

    def update(self, count: int, seconds: float) -> None:
        pass


def test_wait_refusal_is_work_ahead_over_throughput_against_the_budget():
    assert wait_refusal(ahead=100, rate=100.0, budget_s=2.0) is None  # 1 s wait
    assert wait_refusal(ahead=200, rate=100.0, budget_s=2.0) is None  # exactly the budget
    assert wait_refusal(ahead=201, rate=100.0, budget_s=2.0) == 1
    assert wait_refusal(ahead=750, rate=100.0, budget_s=2.0) == 6  # back once the excess drained
    assert wait_refusal(ahead=10**9, rate=1.0, budget_s=2.0) == 60  # capped
    assert wait_refusal(ahead=0, rate=1.0, budget_s=0.5) is None  # nothing ahead: always admitted
    assert wait_refusal(ahead=500, rate=0.0, budget_s=2.0) is None  # nothing measured yet
    assert wait_refusal(ahead=500, rate=1.0, budget_s=0.0) is None  # budget off


def _gated_batcher(rate: float, budget_s: float, max_queue_items: int = 1000):
    gate = threading.Event()

    def encode(payloads, modality):
        gate.wait(5)
        return fake_encode(payloads, modality)

    limits = BatchLimits(max_queue_items=max_queue_items, max_queue_wait_s=budget_s)
    b = Batcher(name="gated", encode=encode, limits=limits, metrics=Metrics(), throughput=FixedThroughput(rate))
    b.start()
    return b, gate


def test_admitted_requests_count_as_work_ahead_before_they_reach_the_queue():
    """The overload attack: requests still counting tokens were invisible to the queue's bound,
    so 4x capacity turned into 13 s medians and no 429. Reservations close that gap."""
    b, gate = _gated_batcher(rate=10.0, budget_s=2.0)  # 20 inputs of work fit the budget
    try:
        first = b.admit(8)  # being prepared: nothing is queued yet
        second = b.admit(8)
        third = b.admit(8)  # 16 ahead: 1.6 s, admitted
        assert b.pending == 0 and b.reserved == 24
        with pytest.raises(QueueFullError) as refused:
            b.admit(8)  # 24 ahead: 2.4 s > 2 s
        assert refused.value.retry_after == 1 and "budget" in str(refused.value)
        third.release()  # that request failed validation: its inputs no longer count
        b.admit(8).release()
        assert b.reserved == 16
        with first, second:

            async def run():
                queued = asyncio.gather(
                    b.embed([str(i) for i in range(8)], "text", [1] * 8, first),
                    b.embed([str(i) for i in range(8)], "text", [1] * 8, second),
                )
                await asyncio.sleep(0.05)
                assert b.reserved == 0 and b.pending == 16  # moved from reservation to queue, no double count
                unadmitted = asyncio.ensure_future(b.embed(["1"] * 8, "text", [1] * 8))  # 1.6 s ahead: queued
                await asyncio.sleep(0.05)
                with pytest.raises(QueueFullError):
                    await b.embed(["1"] * 8, "text", [1] * 8)  # 2.4 s ahead: judged at the queue, refused
                gate.set()
                return [*(await queued), await unadmitted]

            results = asyncio.run(run())
        assert [len(r) for r in results] == [8, 8, 8]
        assert b.pending == 0 and b.reserved == 0
    finally:
        gate.set()
        b.stop()


def test_a_large_request_is_admitted_when_nothing_is_ahead():
    b, gate = _gated_batcher(rate=1.0, budget_s=0.5, max_queue_items=64)
    try:
        with b.admit(64):  # 64 s of work for itself, but it waits for nothing
            assert b.reserved == 64
            with pytest.raises(QueueFullError):
                b.admit(1)  # and the queue's bound in inputs still holds
        assert b.reserved == 0
    finally:
        gate.set()
        b.stop()


def test_throughput_is_measured_over_busy_time_only():
    """Inputs per second while a batch is in flight: idle gaps between requests are not capacity
    (a fake clock that only the 'model' and the test move: nothing here depends on timing)."""
    now = [0.0]

    def encode(payloads, modality):
        now[0] += 0.01 * len(payloads)  # 100 inputs per busy second
        return fake_encode(payloads, modality)

    b = Batcher(name="clocked", encode=encode, limits=BatchLimits(), metrics=Metrics(), clock=lambda: now[0])
    b.start()
    try:

        async def run():
            for _ in range(3):
                await b.embed([str(i) for i in range(50)], "text", [1] * 50)
                now[0] += 100.0  # idle

        asyncio.run(run())
    finally:
        b.stop()
    assert b.rate == pytest.approx(100.0)
