"""encoders.quantize against sentence-transformers' own quantize_embeddings, which it restates."""

from __future__ import annotations

import numpy as np
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from encoders.quantize import OUTPUT_DTYPES, calibration_ranges, output_width, quantize


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("dimension", [384, 100, 7])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_equals_sentence_transformers(dtype, dimension):
    rng = np.random.default_rng(dimension)
    calibration = _unit_rows(rng, 200, dimension)
    # Vectors partly outside the calibration's ranges too, so clipping is exercised.
    vectors = np.concatenate([_unit_rows(rng, 50, dimension), 3 * _unit_rows(rng, 5, dimension)])
    expected = quantize_embeddings(vectors, precision=dtype, calibration_embeddings=calibration)
    got = quantize(vectors, dtype, calibration_ranges(calibration))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert got.shape[1] == output_width(dtype, dimension)


def test_clipping_and_extremes_land_on_the_end_buckets():
    calibration = np.array([[-1.0, 0.0], [1.0, 0.5]], dtype=np.float32)
    vectors = np.array([[-5.0, -1.0], [5.0, 2.0]], dtype=np.float32)  # below and above the ranges
    ranges = calibration_ranges(calibration)
    np.testing.assert_array_equal(quantize(vectors, "uint8", ranges), [[0, 0], [255, 255]])
    np.testing.assert_array_equal(quantize(vectors, "int8", ranges), [[-128, -128], [127, 127]])


def test_a_constant_dimension_does_not_divide_by_zero():
    calibration = np.array([[0.2, 0.1], [0.2, 0.9]], dtype=np.float32)
    vectors = np.array([[0.2, 0.5]], dtype=np.float32)
    expected = quantize_embeddings(vectors, precision="uint8", calibration_embeddings=calibration)
    np.testing.assert_array_equal(quantize(vectors, "uint8", calibration_ranges(calibration)), expected)


def test_binary_packs_sign_bits_most_significant_first():
    vectors = np.array([[1, -1, -1, -1, -1, -1, -1, 1, 0.5]], dtype=np.float32)  # 9 dims -> 2 bytes
    np.testing.assert_array_equal(quantize(vectors, "ubinary"), [[0b10000001, 0b10000000]])
    np.testing.assert_array_equal(quantize(vectors, "binary"), [[0b10000001 - 128, 0b10000000 - 128]])


def test_float_is_unchanged_and_bad_arguments_are_refused():
    vectors = np.ones((1, 4), dtype=np.float32)
    assert quantize(vectors, "float") is vectors
    with pytest.raises(ValueError, match="needs ranges"):
        quantize(vectors, "int8")
    with pytest.raises(ValueError, match="one of"):
        quantize(vectors, "int4")
    with pytest.raises(ValueError, match="n >= 2"):
        calibration_ranges(vectors)
    assert OUTPUT_DTYPES == ("float", "int8", "uint8", "binary", "ubinary")
