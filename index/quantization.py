"""Quantised collections: int8 (FAISS scalar quantiser) and binary (sign bits, Hamming) indexes, and the
exact float rescoring that makes their answers good.

Why: a float index holds 4 bytes per dimension in memory; int8 holds 1 (about 4x less, ~0.25x) and
binary 1 bit (32x less). Both rank approximately, so by default (`rescore: true`) a search asks the
index for `k * oversample` candidates and ranks those again with the float vectors the store keeps on
disk: the reported score is then the exact float score. Without rescoring the score is the index's
own estimate (int8: the quantised inner product; binary: `1 - 2 * hamming / dim`, the inner product
of the +-1 sign vectors scaled to [-1, 1]), and the collection's stats say so (`index.scores`).

When each index trains:
- int8 needs each dimension's range (`SQ8`, trained on a sample). A collection holds its vectors in
  an exact float index until it has `SQ_TRAIN_MIN` vectors, then rebuilds as SQ8 trained on a random
  sample of up to `SQ_TRAIN_SAMPLE` stored vectors (the same path as `auto` growing into IVF). A flat
  or IVF int8 index trained on fewer than `SQ_TRAIN_SAMPLE` vectors is rebuilt, retrained, once the
  collection holds `SQ_RETRAIN_GROWTH` times as many (at 10k and 100k for one that grows from empty:
  ranges from the first thousand vectors clip the later ones more often); an HNSW int8 index is not
  (rebuilding its graph costs minutes at that size): `POST .../rebuild` retrains it. The ranges are
  also retrained whenever the index is rebuilt from the store for any other reason (a re-embed, an
  `auto` collection growing into IVF, HNSW compaction, an unusable snapshot). Snapshots keep the
  trained quantiser (and `trained_on`), so a restart replays onto the same ranges. Values outside the
  ranges are clipped (their ranking is then rougher; rescoring repairs it).
- binary needs no training: bit i is `vector[i] > 0`.

Only this module knows how vectors become bits; the engine calls it at the FAISS boundary.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import faiss
import numpy as np

Quantization = Literal["none", "int8", "binary"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "binary")
SQ_TRAIN_MIN = 1000  # int8 collections index exactly (float) below this many vectors
SQ_TRAIN_SAMPLE = 65_536  # vectors the scalar quantiser's ranges are trained on
SQ_RETRAIN_GROWTH = 10  # a flat or IVF int8 index trained on fewer than SQ_TRAIN_SAMPLE retrains at 10x its sample
MAX_OVERSAMPLE = 100
# Candidate vectors one search call may rescore, over all its queries (~400 MB of float32 at 384-d): big
# k x oversample x queries products are cut to this, never less than the k (+ margin) each query needs.
MAX_RESCORE_ROWS = 262_144
_GATHER_FLOATS = 1 << 22  # candidate vector components gathered at once while rescoring (16 MB)
_BINARY_IDMAP = "BIDMap2,"


def is_binary(factory: str) -> bool:
    """Binary factories are ours ("BIDMap2,BFlat", "BIDMap2,BHNSW32"): FAISS's binary factory has no IDMap2."""
    return factory.startswith("B")


def make_binary_index(dim: int, factory: str) -> Any:
    """A binary FAISS index over `dim` sign bits, with an id map (so rows keep the store's ids)."""
    if not factory.startswith(_BINARY_IDMAP) or dim % 8:
        raise ValueError(f"cannot build binary index {factory!r} for dimension {dim} (needs a multiple of 8)")
    return faiss.IndexBinaryIDMap2(faiss.index_binary_factory(dim, factory.removeprefix(_BINARY_IDMAP)))


def to_bits(vectors: np.ndarray) -> np.ndarray:
    """One bit per dimension, set where the component is positive; (n, dim / 8) uint8, C-contiguous."""
    return np.ascontiguousarray(np.packbits(np.asarray(vectors) > 0, axis=1))


def hamming_scores(distances: np.ndarray, dim: int) -> np.ndarray:
    """Hamming distances as similarity estimates in [-1, 1] (higher is closer), like inner products
    of unit vectors: the inner product of the two +-1 sign vectors, divided by `dim`."""
    scores: np.ndarray = (1.0 - 2.0 * distances.astype(np.float64) / dim).astype(np.float32)
    return scores


def rescore_candidates(fetch: int, oversample: int, queries: int) -> int:
    """How many candidates per query a rescoring search asks the index for: `fetch * oversample`, within
    MAX_RESCORE_ROWS for the whole call."""
    return min(fetch * oversample, max(fetch, MAX_RESCORE_ROWS // max(queries, 1)))


# (vids) -> {vid: float vector as the index sees it}; rows deleted since the search are simply absent.
FetchVectors = Callable[[np.ndarray], dict[int, np.ndarray]]


def rescore(queries: np.ndarray, vids: np.ndarray, fetch: FetchVectors, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Rank each query's candidates (`vids`, -1 for none) again by the exact inner product with their
    float vectors; returns the best `keep` per query as (scores, vids), padded with (-inf, -1).
    Candidates whose rows vanished meanwhile are dropped, not ranked with a stale score."""
    unique = np.unique(vids[vids >= 0])
    found = fetch(unique)
    rows = np.zeros((len(unique) + 1, queries.shape[1]), dtype=np.float32)  # the last row stands for "none"
    present = np.zeros(len(unique) + 1, dtype=bool)
    for i, vid in enumerate(unique):
        vector = found.get(int(vid))
        if vector is not None:
            rows[i] = vector
            present[i] = True
    position = np.where(vids >= 0, np.searchsorted(unique, np.maximum(vids, 0)), len(unique))
    position = np.where(present[position], position, len(unique))
    scores = np.empty(vids.shape, dtype=np.float32)
    step = max(1, _GATHER_FLOATS // max(vids.shape[1] * queries.shape[1], 1))  # bounded memory for the gather
    for start in range(0, len(queries), step):
        block = slice(start, start + step)
        scores[block] = np.einsum("nd,nmd->nm", queries[block], rows[position[block]], dtype=np.float32)
    scores[position == len(unique)] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
    missing = np.take_along_axis(position, order, 1) == len(unique)
    ranked_vids = np.where(missing, -1, np.take_along_axis(vids, order, 1))
    return np.take_along_axis(scores, order, axis=1), ranked_vids
