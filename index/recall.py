"""HNSW's efSearch chosen from a recall target, by measuring recall on the collection's own vectors.

Why: efSearch trades speed for recall, and the recall one efSearch buys depends on the data and its
size (at 1M clustered vectors efSearch 128 gave recall@10 0.835). A collection created with
`recall_target: 0.95` gets the smallest efSearch on `EF_LADDER` that reaches it, measured, instead
of a guess; the choice and the recall measured are in its stats (`index.tuning`) and its snapshot.

When: on every build of an HNSW index from the store (a rebuild, an unusable snapshot, compaction,
a re-embed) and at a snapshot once the collection's size has moved by `RECALIBRATE_CHANGE` since the
last measurement. The measurement holds the collection's writer lock (searches go on); it costs one
scan of the stored vectors plus `SAMPLE_QUERIES` searches per efSearch tried.

How: queries like the ones the collection will get, new points among its own: `SAMPLE_QUERIES`
stored vectors chosen at random, each moved off its point in a random direction by as much as it is
from its nearest neighbour (`held_out_like`). Stored vectors themselves would flatter the index: the
graph holds them, and a search that starts near one walks its links straight to its neighbours
(measured: 0.97 for stored-vector queries where new queries got 0.87). Each query's exact top
`RECALL_K` comes from a brute-force scan; recall@k is the share of those found among what the search
hands on: its top k, or with rescoring its `k * oversample` candidates (rescoring with the float
vectors puts the true top k first whenever they are among the candidates, so that is the recall of
the answer).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from index.engine import FaissIndex

RECALL_K = 10
SAMPLE_QUERIES = 200
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
RECALIBRATE_CHANGE = 0.25  # re-measure at a snapshot once the size moved by a quarter


def needs_calibration(index: FaissIndex, count: int) -> bool:
    """An HNSW index of a collection with a recall target, never measured or measured at another size."""
    if index.spec.recall_target is None or not index.is_hnsw or count <= RECALL_K:
        return False
    if index.tuning is None:
        return True
    measured = int(index.tuning.get("count", 0))
    return abs(count - measured) > RECALIBRATE_CHANGE * max(measured, 1)


def exact_top(
    queries: np.ndarray, query_vids: np.ndarray, blocks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> np.ndarray:
    """Each query's exact top-k vids by inner product over every (vids, vectors) block, its own vid
    left out; rows with fewer than k others are padded with -1."""
    best_scores = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_vids = np.full((len(queries), 0), -1, dtype=np.int64)
    for vids, vectors in blocks:
        scores = queries @ vectors.T
        scores[vids[None, :] == query_vids[:, None]] = -np.inf
        scores = np.concatenate([best_scores, scores], axis=1)
        candidates = np.concatenate([best_vids, np.broadcast_to(vids, (len(queries), len(vids)))], axis=1)
        keep = min(k, scores.shape[1])
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_vids = np.take_along_axis(candidates, top, axis=1)
    best_vids = np.where(np.isfinite(best_scores), best_vids, -1)
    if best_vids.shape[1] < k:
        best_vids = np.pad(best_vids, ((0, 0), (0, k - best_vids.shape[1])), constant_values=-1)
    return best_vids


def held_out_like(points: np.ndarray, nearest: np.ndarray, seed: int = 0) -> np.ndarray:
    """Each point moved in a random direction orthogonal to it, so that its cosine to where it was equals
    its cosine to its nearest neighbour `nearest[i]`: a new point at the local spacing of the data."""
    norms = np.linalg.norm(points, axis=1, keepdims=True)
    unit = points / np.maximum(norms, 1e-12)
    nearest_norms = np.maximum(np.linalg.norm(nearest, axis=1, keepdims=True), 1e-12)
    cos = np.clip(np.sum(unit * nearest, axis=1, keepdims=True) / nearest_norms, 0.05, 0.9999)
    noise = np.random.default_rng(seed).standard_normal(points.shape).astype(np.float32)
    noise -= np.sum(noise * unit, axis=1, keepdims=True) * unit
    noise /= np.maximum(np.linalg.norm(noise, axis=1, keepdims=True), 1e-12)
    moved: np.ndarray = (points + np.sqrt(1 / cos**2 - 1) * norms * noise).astype(np.float32)
    return moved


def measured_recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true neighbours (-1 padding left out) that `found` holds, over all queries."""
    hits = total = 0
    for row_found, row_truth in zip(found, truth):
        wanted = {int(v) for v in row_truth if v >= 0}
        hits += len(wanted & {int(v) for v in row_found})
        total += len(wanted)
    return hits / total if total else 1.0


def calibrate(
    index: FaissIndex,
    queries: np.ndarray,
    blocks: Iterable[tuple[np.ndarray, np.ndarray]],
    count: int,
    candidates: int,
) -> dict[str, Any]:
    """The smallest efSearch on EF_LADDER whose recall@RECALL_K over `candidates` results per query
    reaches `index.spec.recall_target` (else the largest, `reached: false`), with what was measured.
    `queries`: see `held_out_like`; `blocks`: every stored (vids, vectors), for the exact answers."""
    target = float(index.spec.recall_target or 0.0)
    truth = exact_top(queries, np.full(len(queries), -1, dtype=np.int64), blocks, RECALL_K)
    chosen: dict[str, Any] = {}
    for ef in EF_LADDER:
        _, found = index.search(queries, candidates, ef_search=max(ef, candidates))
        recall = measured_recall(found, truth)
        chosen = {"ef_search": max(ef, candidates), "recall": round(recall, 4), "reached": recall >= target}
        if recall >= target:
            break
    return {
        **chosen,
        "recall_target": target,
        "k": RECALL_K,
        "candidates": candidates,
        "sample_queries": len(queries),
        "count": count,
    }
