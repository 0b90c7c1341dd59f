"""Quantised embeddings out of POST /v1/embeddings: which dtype a request asks for, the per-version
calibration int8/uint8 need, and the rendering of quantised rows (JSON ints or base64 bytes).

Calibration is computed lazily, at the first int8/uint8 request for a version, not by a CLI
step: every version can answer at once, including versions a training job registered a minute
ago, with nothing for an operator to remember. The sample (encoders/calibration_texts.py) is
embedded through the version's own batcher, in small chunks so it queues like any request and
never needs a queue larger than 32 inputs, and the result is published beside the version
(registry/calibration.py, first writer wins), so restarts and other replicas reuse it and a
version's int8 bytes never change once served. Within a process a lock per version makes
concurrent first requests compute it once. The sample is text: for the dual encoder, image
vectors are quantised with ranges measured on text vectors, which live in the same space but
may spread differently (a calibration from images is future work).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import numpy as np

from encoders.calibration_texts import CALIBRATION_TEXTS, SAMPLE_NAME
from encoders.contract import Modality
from encoders.quantize import OUTPUT_DTYPES, calibration_ranges, needs_calibration, quantize
from registry.calibration import Calibration, calibration_path, publish_calibration, read_calibration
from service.embedding import embed_prepared
from service.errors import ApiError
from service.inputs import prepare
from service.model_pool.pool import LoadedModel, ModelPool
from service.settings import Settings

logger = logging.getLogger(__name__)

# The sample goes through the batcher this many texts at a time, so it never needs more queue
# room than a small request and interleaves with other traffic instead of blocking it.
_CHUNK = 32

EmbedSample = Callable[[LoadedModel], Awaitable[np.ndarray]]


def requested_dtype(output_dtype: str | None, embedding_types: str | list[Any] | None) -> str | None:
    """The dtype a request asks for, by Voyage's `output_dtype` or Cohere's `embedding_types`;
    None when it names none (the OpenAI path, answered exactly as before)."""
    if output_dtype is not None and embedding_types is not None:
        raise ApiError(
            400,
            "output_dtype and embedding_types are two names for the same option; send only one of them",
            code="invalid_output_dtype",
            param="embedding_types",
        )
    if embedding_types is None:
        return output_dtype
    types = [embedding_types] if isinstance(embedding_types, str) else embedding_types
    if len(types) != 1:
        raise ApiError(
            400,
            f"embedding_types names {len(types)} types; Duet returns one per request: send one of "
            f"{', '.join(OUTPUT_DTYPES)} (as a string or a one-item list)",
            code="invalid_output_dtype",
            param="embedding_types",
        )
    if types[0] not in OUTPUT_DTYPES:
        raise ApiError(
            400,
            f"embedding_types {types[0]!r} is not supported; send one of {', '.join(OUTPUT_DTYPES)}",
            code="invalid_output_dtype",
            param="embedding_types",
        )
    return str(types[0])


def render_rows(vectors: np.ndarray, encoding_format: str) -> list[Any]:
    """Quantised rows as JSON ints (orjson writes numpy int rows directly) or base64 of their
    bytes, one byte a value, as a client can read back with `np.frombuffer(raw, dtype)`."""
    if encoding_format == "base64":
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in vectors]
    return list(vectors)


def quantize_rows(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None) -> np.ndarray:
    """`vectors` as `dtype`, C-contiguous so each row's bytes are the values in order; an explicit
    'float' is little-endian float32, as the OpenAI path's base64 is."""
    if dtype == "float":
        return np.ascontiguousarray(vectors, dtype="<f4")
    return np.ascontiguousarray(quantize(vectors, dtype, ranges))


def truncate_and_normalize(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Matryoshka truncation: keep a prefix, then restore unit length."""
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


def decode_sample(calibration: Calibration) -> np.ndarray:
    raw = base64.b64decode(calibration.embeddings_b64)
    return np.frombuffer(raw, dtype="<f4").reshape(calibration.count, calibration.dimension).astype(np.float32)


def sample_sha256() -> str:
    return hashlib.sha256("\n".join(CALIBRATION_TEXTS).encode()).hexdigest()


async def calibration_model(model: LoadedModel, pool: ModelPool) -> LoadedModel:
    """What embeds the sample: the version itself (torch, fp32), also when a runtime variant
    (`minilm/1:onnx-int8`) is asked first. A version's int8 bytes must not depend on which variant
    happened to calibrate it; its variants are gated to stay within cosine 0.99 of it, so the
    version's ranges fit their vectors too."""
    if model.variant is None:
        return model
    return await pool.ensure_loaded(model.info)


def embedder(settings: Settings, pool: ModelPool) -> EmbedSample:
    """Embed the built-in sample with a loaded version, through its batcher like any request."""

    async def embed_sample(asked: LoadedModel) -> np.ndarray:
        model = await calibration_model(asked, pool)
        rows = []
        for start in range(0, len(CALIBRATION_TEXTS), _CHUNK):
            items: list[tuple[Modality, str]] = [("text", text) for text in CALIBRATION_TEXTS[start : start + _CHUNK]]
            prepared = await prepare(items, model.encoder, settings)
            rows.append(await embed_prepared(model, prepared))
        return np.concatenate(rows).astype(np.float32)

    return embed_sample


class CalibrationCache:
    """Each version's calibration sample embeddings (from disk, or computed once), and the ranges
    per requested `dimensions`, for the life of the app."""

    def __init__(self, embed_sample: EmbedSample) -> None:
        self._embed_sample = embed_sample
        self._samples: dict[str, np.ndarray] = {}
        self._ranges: dict[tuple[str, int], np.ndarray] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def ranges(self, model: LoadedModel, dimensions: int) -> np.ndarray:
        """(2, dimensions) float32 ranges for `model`'s vectors truncated to `dimensions`."""
        key = str(calibration_path(model.info))
        found = self._ranges.get((key, dimensions))
        if found is not None:
            return found
        sample = await self.sample(model)
        if dimensions < sample.shape[1]:
            sample = truncate_and_normalize(sample, dimensions)
        ranges = calibration_ranges(sample)
        self._ranges[(key, dimensions)] = ranges
        return ranges

    async def sample(self, model: LoadedModel) -> np.ndarray:
        key = str(calibration_path(model.info))
        if key in self._samples:
            return self._samples[key]
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if key not in self._samples:  # another request may have finished it while this one waited
                self._samples[key] = await self._load_or_compute(model)
        return self._samples[key]

    async def _load_or_compute(self, model: LoadedModel) -> np.ndarray:
        info = model.info
        stored = await anyio.to_thread.run_sync(read_calibration, info)
        if stored is None:
            embeddings = await self._embed_sample(model)
            computed = Calibration(
                ref=info.ref,
                weights_sha256=info.manifest.lineage.weights_sha256,
                sample=SAMPLE_NAME,
                sample_sha256=sample_sha256(),
                count=embeddings.shape[0],
                dimension=embeddings.shape[1],
                embeddings_b64=base64.b64encode(embeddings.astype("<f4").tobytes()).decode("ascii"),
            )
            try:
                stored = await anyio.to_thread.run_sync(publish_calibration, info, computed)
            except OSError as exc:  # a read-only or full registry volume must not fail the request
                logger.warning("cannot store the calibration of %s (%s); using it for this process only", info.ref, exc)
                stored = computed
        return decode_sample(stored)


def needs_ranges(dtype: str | None) -> bool:
    return dtype is not None and needs_calibration(dtype)
