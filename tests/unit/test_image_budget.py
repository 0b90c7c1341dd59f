"""The memory budget for decoded images (issue 11: one legal request of 512 large images took the
RSS +2.3 GB). Counted from headers before decoding: 413 when a request can never fit, 429 when
the budget is momentarily full; released when the request is done. No timing is involved."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from service.errors import ApiError, domain_error
from service.inputs import prepare
from service.limits import ImageMemoryFullError, ImagesTooLargeError, MemoryBudget, memory_budget
from service.settings import Settings

MODEL = SimpleNamespace(contract=SimpleNamespace(image_size=64))
BIG = 1024 * 1024 * 3  # a 1024 x 1024 RGB image, decoded


def _uri(size=(1024, 1024), fmt="PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def _settings(tmp_path, budget: int) -> Settings:
    return Settings(data_dir=tmp_path, max_image_memory_bytes=budget)


def _prepare(settings, count: int, **kwargs):
    items = [("image", _uri(**kwargs))] * count
    return asyncio.run(prepare(items, MODEL, settings))


def test_budget_reserves_all_or_nothing():
    budget = MemoryBudget(100)
    assert budget.reserve(60) and not budget.reserve(41) and budget.used == 60
    assert budget.reserve(40) and budget.used == 100
    budget.release(100)
    assert budget.used == 0


def test_many_large_images_are_queued_reduced_and_their_memory_given_back(tmp_path):
    """What waits for the model is 64 px pictures, not 1024 px ones; only one full-size image is
    counted (they are decoded one at a time), and all of it is returned once the request is done."""
    settings = _settings(tmp_path, 4 * BIG + 1)
    budget = memory_budget(settings.max_image_memory_bytes)
    prepared = _prepare(settings, 64)
    payloads = prepared.groups["image"].payloads
    assert {p.size for p in payloads} == {(64, 64)}
    assert budget.used == 64 * 64 * 64 * 3  # only the reduced images are still held
    prepared.release()
    assert budget.used == 0
    prepared.release()  # idempotent
    assert budget.used == 0


def test_a_request_that_could_never_fit_is_413_before_decoding(tmp_path):
    settings = _settings(tmp_path, BIG)  # one full-size 1024 x 1024 decode does not fit
    with pytest.raises(ImagesTooLargeError) as refused:
        _prepare(settings, 2)
    answer = domain_error(refused.value)
    assert answer.status == 413 and answer.code == "images_too_large"
    assert memory_budget(settings.max_image_memory_bytes).used == 0


def test_a_momentarily_full_budget_is_429_with_retry_after(tmp_path):
    settings = _settings(tmp_path, 2 * BIG + 7)
    budget = memory_budget(settings.max_image_memory_bytes)
    assert budget.reserve(BIG)  # another request is decoding
    try:
        with pytest.raises(ImageMemoryFullError) as refused:
            _prepare(settings, 1, size=(1024, 1024 + 512))  # 1.5 x BIG + its reduced copy
        answer = domain_error(refused.value)
        assert answer.status == 429 and answer.headers == {"Retry-After": "1"}
        assert budget.used == BIG
    finally:
        budget.release(BIG)
    assert _prepare(settings, 1, size=(1024, 1024 + 512)).groups["image"].payloads[0].size == (64, 96)


def test_memory_is_released_when_a_later_image_is_corrupt(tmp_path):
    settings = _settings(tmp_path, 3 * BIG + 11)
    good = _uri()
    truncated = good[: len(good) // 2 // 4 * 4]  # valid base64 of half a PNG: the header reads, decoding fails
    with pytest.raises(ApiError) as refused:
        asyncio.run(prepare([("image", good), ("image", truncated)], MODEL, settings))
    assert refused.value.status == 400 and refused.value.param == "input[1]"
    assert memory_budget(settings.max_image_memory_bytes).used == 0


def test_a_dropped_request_gives_its_memory_back(tmp_path):
    """A route that never calls release (an error between prepare and embed) still frees the budget."""
    settings = _settings(tmp_path, 5 * BIG + 13)
    prepared = _prepare(settings, 3)
    assert memory_budget(settings.max_image_memory_bytes).used > 0
    del prepared
    gc.collect()  # the finished coroutine may keep it in a reference cycle for a while
    assert memory_budget(settings.max_image_memory_bytes).used == 0
