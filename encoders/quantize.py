"""Quantised embeddings: int8/uint8 scalar quantisation and binary/ubinary sign packing.

The maths is sentence-transformers' `quantize_embeddings` (sentence_transformers/util/quantization.py),
restated here in numpy so the served bytes do not depend on a private helper of that library and
so the steps are visible; tests/unit/test_quantize.py holds it equal to the library's function.

- int8/uint8: each dimension's range [min, max] over a calibration sample is cut into 255 steps;
  a value's bucket is floor((x - min) / step), clipped to 0..255 (int8 shifts it by -128). Ranges
  come from a calibration sample, never from the request's own vectors: the same text must give
  the same bytes whatever it was sent with.
- binary/ubinary: one bit per dimension (x > 0), packed 8 to a byte, most significant bit first;
  `binary` is the packed byte - 128 as int8, `ubinary` the byte itself. 384 dimensions -> 48 bytes.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

OutputDtype = Literal["float", "int8", "uint8", "binary", "ubinary"]
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)
CALIBRATED_DTYPES = frozenset({"int8", "uint8"})


def needs_calibration(dtype: str) -> bool:
    """Only the scalar dtypes need per-dimension ranges; sign bits need nothing."""
    return dtype in CALIBRATED_DTYPES


def calibration_ranges(embeddings: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Per-dimension (min, max) of a calibration sample, shape (2, dimension)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"calibration needs a (n >= 2, dimension) matrix, got shape {embeddings.shape}")
    return np.vstack((embeddings.min(axis=0), embeddings.max(axis=0))).astype(np.float32)


def quantize(
    vectors: npt.NDArray[np.float32], dtype: str, ranges: npt.NDArray[np.float32] | None = None
) -> npt.NDArray[np.generic]:
    """`vectors` (n, d) float32 as `dtype`: float32 unchanged, (n, d) int8/uint8 with `ranges`,
    or (n, ceil(d / 8)) int8/uint8 sign bits."""
    if dtype == "float":
        return vectors
    if dtype in CALIBRATED_DTYPES:
        if ranges is None or ranges.shape != (2, vectors.shape[1]):
            raise ValueError(f"{dtype} needs ranges of shape (2, {vectors.shape[1]})")
        starts = ranges[0].astype(np.float32, copy=False)
        steps = (ranges[1].astype(np.float32, copy=False) - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        buckets: npt.NDArray[np.float32] = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return buckets.astype(np.uint8) if dtype == "uint8" else (buckets - 128).astype(np.int8)
    if dtype == "binary":
        return (np.packbits(vectors > 0, axis=-1) - 128).astype(np.int8)
    if dtype == "ubinary":
        packed: npt.NDArray[np.uint8] = np.packbits(vectors > 0, axis=-1)
        return packed
    raise ValueError(f"unknown output dtype {dtype!r}; one of {', '.join(OUTPUT_DTYPES)}")


def output_width(dtype: str, dimension: int) -> int:
    """How many values a `dimension`-d vector becomes: packed dtypes hold 8 dimensions a byte."""
    return (dimension + 7) // 8 if dtype in ("binary", "ubinary") else dimension
