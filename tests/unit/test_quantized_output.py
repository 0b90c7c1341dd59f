"""service.quantized_output: the dtype a request names, and each version's calibration computed at
most once (concurrent first requests share one computation; a restart reads the stored file)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from encoders.contract import VectorContract
from encoders.quantize import calibration_ranges
from registry.calibration import calibration_path
from registry.manifest import Lineage, Manifest
from registry.store import ModelVersionInfo
from service.errors import ApiError
from service.quantized_output import CalibrationCache, calibration_model, requested_dtype, truncate_and_normalize


def _model(tmp_path, dimension: int = 8) -> SimpleNamespace:
    contract = VectorContract(dimension=dimension, normalized=True, similarity="cosine", modalities=("text",))
    manifest = Manifest(contract=contract, trained=True, lineage=Lineage(weights_sha256="ab" * 32))
    folder = tmp_path / "run" / "artifacts" / "model"
    folder.mkdir(parents=True)
    info = ModelVersionInfo(name="m", version=1, path=folder, manifest=manifest, aliases=(), created_at_ms=0)
    return SimpleNamespace(info=info, ref=info.ref)


class CountingEmbedder:
    """Stands in for the batcher: returns a fixed sample, counts calls, and yields to the loop in
    between so concurrent callers really interleave."""

    def __init__(self, sample: np.ndarray, fail: bool = False) -> None:
        self.sample, self.fail, self.calls = sample, fail, 0

    async def __call__(self, model) -> np.ndarray:
        self.calls += 1
        for _ in range(5):
            await asyncio.sleep(0)
        if self.fail:
            raise RuntimeError("batcher stopped")
        return self.sample


def _sample(dimension: int = 8) -> np.ndarray:
    rows = np.random.default_rng(0).standard_normal((20, dimension)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_concurrent_first_requests_compute_once_and_a_restart_reads_the_file(tmp_path):
    model, sample = _model(tmp_path), _sample()
    embed = CountingEmbedder(sample)

    async def many():
        cache = CalibrationCache(embed)
        return await asyncio.gather(*(cache.ranges(model, 8) for _ in range(6)))

    results = asyncio.run(many())
    assert embed.calls == 1
    for ranges in results:
        np.testing.assert_array_equal(ranges, calibration_ranges(sample))
    assert calibration_path(model.info).is_file()

    restarted = CountingEmbedder(sample * 0)  # would give other ranges if it were called
    again = asyncio.run(CalibrationCache(restarted).ranges(model, 8))
    assert restarted.calls == 0
    np.testing.assert_array_equal(again, calibration_ranges(sample))


def test_truncated_requests_use_the_sample_truncated_the_same_way(tmp_path):
    model, sample = _model(tmp_path), _sample()
    ranges = asyncio.run(CalibrationCache(CountingEmbedder(sample)).ranges(model, 3))
    np.testing.assert_array_equal(ranges, calibration_ranges(truncate_and_normalize(sample, 3)))
    assert ranges.shape == (2, 3)


def test_a_failed_calibration_is_retried_by_the_next_request(tmp_path):
    model, sample = _model(tmp_path), _sample()
    failing = CountingEmbedder(sample, fail=True)
    cache = CalibrationCache(failing)
    with pytest.raises(RuntimeError):
        asyncio.run(cache.ranges(model, 8))
    assert not calibration_path(model.info).exists()
    failing.fail = False
    np.testing.assert_array_equal(asyncio.run(cache.ranges(model, 8)), calibration_ranges(sample))
    assert failing.calls == 2


def test_an_unwritable_registry_still_answers(tmp_path, monkeypatch, caplog):
    def read_only(info, calibration):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("service.quantized_output.publish_calibration", read_only)
    model, sample = _model(tmp_path), _sample()
    ranges = asyncio.run(CalibrationCache(CountingEmbedder(sample)).ranges(model, 8))
    np.testing.assert_array_equal(ranges, calibration_ranges(sample))
    assert "cannot store the calibration of m/1" in caplog.text


def test_a_variant_is_calibrated_by_its_version_itself():
    version = SimpleNamespace(info="minilm/1 info", variant=None)

    class Pool:
        async def ensure_loaded(self, info):
            assert info == "minilm/1 info"
            return version

    variant = SimpleNamespace(info="minilm/1 info", variant="onnx-int8 record")
    assert asyncio.run(calibration_model(variant, Pool())) is version
    assert asyncio.run(calibration_model(version, Pool())) is version


@pytest.mark.parametrize(
    ("output_dtype", "embedding_types", "expected"),
    [
        (None, None, None),
        ("float", None, "float"),
        ("int8", None, "int8"),
        (None, "ubinary", "ubinary"),
        (None, ["binary"], "binary"),
    ],
)
def test_requested_dtype(output_dtype, embedding_types, expected):
    assert requested_dtype(output_dtype, embedding_types) == expected


@pytest.mark.parametrize(
    ("output_dtype", "embedding_types", "says"),
    [
        ("int8", "int8", "send only one"),
        (None, ["int8", "binary"], "one per request"),
        (None, [], "names 0 types"),
        (None, "float16", "'float16' is not supported"),
        (None, [1], "1 is not supported"),
    ],
)
def test_bad_dtype_requests_are_400s_that_say_what_to_send(output_dtype, embedding_types, says):
    with pytest.raises(ApiError) as caught:
        requested_dtype(output_dtype, embedding_types)
    assert caught.value.status == 400 and caught.value.param == "embedding_types"
    assert says in caught.value.message
