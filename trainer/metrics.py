"""Evaluation metrics for contrastive text and text+image encoders, as pure functions of embeddings.

Apart from the runner (:mod:`trainer.evaluation`, which embeds evaluation sets and writes the
before/after report) because these are the numbers everything else is judged by: they take plain
arrays (``numpy``, lists or torch tensors on any device), read no files, load no model and keep no
state, so each is checked against hand-computed cases and scipy without an encoder in sight, and
anything else holding embeddings (a benchmark, a notebook) can call them. Similarities are always
*cosine*: every function L2-normalises its inputs itself (zero vectors stay zero and score 0 against
everything).

Retrieval (:func:`retrieval_metrics`, :func:`paired_retrieval`), per query, then averaged over queries:

* ``recall@k`` -- *hit rate* / success@k: 1 if at least one relevant item is among the top ``k``,
  else 0. This is the "R@K" of image-text retrieval papers (CLIP, ALIGN, COCO/Flickr30k tables).
* ``recall_frac@k`` -- classic IR recall: (number of relevant items in the top ``k``) / (number of
  relevant items). Equal to ``recall@k`` when every query has exactly one relevant item.
* ``mrr@10`` -- reciprocal rank of the first relevant item, 0 if none is in the top 10.
* ``ndcg@10`` -- binary relevance, DCG = sum_{i=1..10} rel_i / log2(i + 1) (Jarvelin & Kekalainen
  2002, the trec_eval/BEIR form with binary gains), divided by the ideal DCG of a ranking that puts
  all ``min(|relevant|, 10)`` relevant items first.

Ranking is by descending cosine similarity; exact ties are broken by ascending corpus index, so the
result is deterministic (and independent of chunking). Queries with no relevant items are left out of
the averages (as trec_eval does for queries without judgements).

STS (:func:`spearman`, :func:`pearson`): correlation between the row-wise cosine similarity
cos(a_i, b_i) and gold scores, multiplied by 100 by default. Note on the convention:
sentence-transformers' ``EmbeddingSimilarityEvaluator`` (v3+, including 6.2 installed here) returns
the *raw* coefficient, ``scipy.stats.spearmanr(labels, cosine_scores)``, e.g. 0.867 for
all-MiniLM-L6-v2 on STS-B dev; the x100 form (86.7) is the one of the SBERT paper and of the MTEB /
model-card tables. ``spearman(...) == 100 * evaluator(...)["<name>_spearman_cosine"]``; pass
``scale=1.0`` to get the evaluator's number. Ties get average ranks, as in scipy.

Geometry (Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment and
Uniformity on the Hypersphere"; Liang et al. 2022, "Mind the Gap: Understanding the Modality Gap in
Multi-modal Contrastive Representation Learning"), all on L2-normalised embeddings:

* :func:`alignment` -- E_{(x,y) positive} ||f(x) - f(y)||^alpha. Lower is better; 0 when positives coincide.
* :func:`uniformity` -- log E_{x != y} exp(-t ||f(x) - f(y)||^2). Lower (more negative) is more uniform;
  0 when everything collapses to one point, >= -4t always on the unit sphere.
* :func:`modality_gap` -- ||mean_i f(text_i) - mean_j f(image_j)||_2, the distance between the centroids.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "alignment",
    "cosine_pairs",
    "modality_gap",
    "paired_relevant",
    "paired_retrieval",
    "pearson",
    "rankdata",
    "retrieval_metrics",
    "spearman",
    "to_numpy",
    "uniformity",
]


# Elements of one (query chunk x corpus) similarity block: 2**25 float32 = 128 MiB, so a 50k x 50k
# evaluation runs in ~670 blocks of 671 queries instead of materialising a 10 GB matrix.
_DEFAULT_BLOCK_ELEMENTS = 1 << 25
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _as_2d(x: Any, name: str, dtype: type = np.float64) -> np.ndarray:
    arr: np.ndarray = to_numpy(x).astype(dtype, copy=False)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def to_numpy(x: Any) -> np.ndarray:
    """Arrays, lists, and torch tensors (on any device) -> numpy."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    normalized: np.ndarray = x / np.maximum(norms, _EPS).astype(x.dtype)
    return normalized


def cosine_pairs(a: Any, b: Any) -> np.ndarray:
    """Row-wise cosine similarity cos(a_i, b_i), shape (n,)."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape != b2.shape:
        raise ValueError(f"a and b must have the same shape, got {a2.shape} and {b2.shape}")
    cosines: np.ndarray = np.einsum("ij,ij->i", _normalize(a2), _normalize(b2))
    return cosines


def _topk_desc(sims: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores per row, by score descending then index ascending.

    Exact and deterministic with ties, including ties straddling the k-th position (the lowest
    indices win), without sorting whole rows: ``np.partition`` finds the k-th largest value, the
    (usually exactly k) entries >= it are kept, and only those are sorted.
    """
    c, n = sims.shape
    if k >= n:
        return np.argsort(-sims, axis=1, kind="stable")
    kth = np.partition(sims, n - k, axis=1)[:, n - k][:, None]
    keep = sims >= kth
    counts = keep.sum(axis=1)
    for r in np.nonzero(counts > k)[0]:  # ties at the threshold: take the lowest-index tied entries
        row, t = sims[r], kth[r, 0]
        greater = row > t
        tied = row == t
        need = k - int(greater.sum())
        keep[r] = greater | (tied & (np.cumsum(tied) <= need))
    cols = np.nonzero(keep)[1].reshape(c, k)  # row-major: within a row, ascending index
    vals = np.take_along_axis(sims, cols, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")  # stable keeps ascending index among equal scores
    return np.take_along_axis(cols, order, axis=1)


# --------------------------------------------------------------------------------------------------
# retrieval
# --------------------------------------------------------------------------------------------------


def retrieval_metrics(
    queries: Any,
    corpus: Any,
    relevant: Sequence[Iterable[int]],
    ks: Iterable[int] = (1, 5, 10),
    *,
    rank_cutoff: int = 10,
    fraction_recall: bool = True,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Cosine-similarity retrieval metrics of ``queries`` against ``corpus``.

    Args:
        queries: (n_queries, dim) embeddings; normalised here.
        corpus: (n_corpus, dim) embeddings; normalised here.
        relevant: for each query, the corpus row indices that are correct answers.
        ks: cut-offs for ``recall@k`` (and ``recall_frac@k``).
        rank_cutoff: the cut-off of ``mrr@…`` and ``ndcg@…`` (10 -> ``mrr@10``, ``ndcg@10``).
        fraction_recall: also report ``recall_frac@k`` (relevant items found / relevant items).
        chunk_size: query rows per similarity block; by default sized so one block is ~128 MiB of float32.

    Returns:
        ``{"recall@1": …, "recall@5": …, "recall@10": …, ["recall_frac@k": …,] "mrr@10": …, "ndcg@10": …}``,
        each the mean over queries that have at least one relevant item. See the module docstring for the
        definitions; ties are broken by ascending corpus index.
    """
    q = _normalize(_as_2d(queries, "queries", np.float32))
    d = _normalize(_as_2d(corpus, "corpus", np.float32))
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"queries and corpus dimensions differ: {q.shape[1]} vs {d.shape[1]}")
    n_q, n_c = len(q), len(d)
    if len(relevant) != n_q:
        raise ValueError(f"relevant has {len(relevant)} entries for {n_q} queries")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or rank_cutoff < 1:
        raise ValueError("ks and rank_cutoff must be positive")
    if n_c == 0:
        raise ValueError("corpus is empty")

    rel_sets: list[set[int]] = []
    for i, r in enumerate(relevant):
        s = {int(j) for j in r}
        if s and (min(s) < 0 or max(s) >= n_c):
            raise ValueError(f"relevant[{i}] has an index outside the corpus (size {n_c})")
        rel_sets.append(s)
    evaluated = np.array([bool(s) for s in rel_sets])
    if not evaluated.any():
        raise ValueError("no query has a relevant item")

    depth = min(max(ks[-1], rank_cutoff), n_c)
    if chunk_size is None:
        chunk_size = max(1, _DEFAULT_BLOCK_ELEMENTS // n_c)
    hits = np.zeros((n_q, depth), dtype=bool)
    for start in range(0, n_q, chunk_size):
        stop = min(start + chunk_size, n_q)
        top = _topk_desc(q[start:stop] @ d.T, depth)
        for row, (ids, rel) in enumerate(zip(top.tolist(), rel_sets[start:stop]), start=start):
            if rel:
                hits[row] = [j in rel for j in ids]

    hits = hits[evaluated]
    n_rel = np.array([len(s) for s in rel_sets if s], dtype=np.float64)
    out: dict[str, float] = {}
    for k in ks:
        found = hits[:, : min(k, depth)]
        out[f"recall@{k}"] = float(found.any(axis=1).mean())
        if fraction_recall:
            out[f"recall_frac@{k}"] = float((found.sum(axis=1) / n_rel).mean())

    cut = min(rank_cutoff, depth)
    top_hits = hits[:, :cut]
    first = np.where(top_hits.any(axis=1), top_hits.argmax(axis=1) + 1, 0)
    out[f"mrr@{rank_cutoff}"] = float(np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0).mean())

    discounts = 1.0 / np.log2(np.arange(2, rank_cutoff + 2))  # positions 1..rank_cutoff
    dcg = top_hits @ discounts[:cut]
    ideal = np.cumsum(discounts)[np.minimum(n_rel, rank_cutoff).astype(int) - 1]
    out[f"ndcg@{rank_cutoff}"] = float((dcg / ideal).mean())
    return out


def paired_relevant(a_keys: Sequence[Hashable], b_keys: Sequence[Hashable]) -> list[set[int]]:
    """Relevant rows for paired data where row i of side a matches row i of side b.

    A key identifies the *content* of a row (e.g. the caption text, an image hash). The answers to the
    a-side query i are all rows j whose b-item was paired, anywhere in the data, with an a-item equal to
    a_keys[i]:  rel(i) = {j : b_keys[j] in {b_keys[m] : a_keys[m] == a_keys[i]}}. With identical captions
    for images 0 and 1, the caption query of row 0 counts both images as correct; with one image in rows
    1 and 2 (under different captions), both copies of it count. The relation is symmetric, so the same
    sets serve the b -> a direction. With all keys distinct it reduces to rel(i) = {i}.
    """
    if len(a_keys) != len(b_keys):
        raise ValueError(f"a_keys and b_keys lengths differ: {len(a_keys)} vs {len(b_keys)}")
    b_of_a: dict[Hashable, set[Hashable]] = {}
    rows_of_b: dict[Hashable, list[int]] = {}
    for j, (ka, kb) in enumerate(zip(a_keys, b_keys)):
        b_of_a.setdefault(ka, set()).add(kb)
        rows_of_b.setdefault(kb, []).append(j)
    cache: dict[Hashable, set[int]] = {}
    out = []
    for ka in a_keys:
        if ka not in cache:
            cache[ka] = {j for kb in b_of_a[ka] for j in rows_of_b[kb]}
        out.append(cache[ka])
    return out


def paired_retrieval(
    a: Any,
    b: Any,
    a_keys: Sequence[Hashable] | None = None,
    b_keys: Sequence[Hashable] | None = None,
    prefix_a: str = "text",
    prefix_b: str = "image",
    ks: Iterable[int] = (1, 5, 10),
    *,
    rank_cutoff: int = 10,
    fraction_recall: bool = False,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Retrieval in both directions for paired data (row i of ``a`` matches row i of ``b``).

    Each row of one side is a query against all rows of the other. Rows sharing a key are duplicates
    (see :func:`paired_relevant`), so retrieving a duplicate is not punished; ``None`` keys mean every
    row is distinct. Keys look like ``"text_to_image/recall@1"``, ``"image_to_text/mrr@10"``,
    ``"text_to_image/ndcg@10"``. ``recall_frac@k`` is off by default here: with duplicates it would
    penalise a model for not returning *all* copies.
    """
    a2, b2 = _as_2d(a, "a", np.float32), _as_2d(b, "b", np.float32)
    if len(a2) != len(b2):
        raise ValueError(f"paired data needs as many a rows as b rows, got {len(a2)} and {len(b2)}")
    if prefix_a == prefix_b:
        raise ValueError("prefix_a and prefix_b must differ, or the two directions would overwrite each other")
    n = len(a2)
    a_keys = list(range(n)) if a_keys is None else list(a_keys)
    b_keys = list(range(n)) if b_keys is None else list(b_keys)
    if len(a_keys) != n or len(b_keys) != n:
        raise ValueError("a_keys and b_keys must have one key per row")
    rel = paired_relevant(a_keys, b_keys)
    ks = tuple(ks)
    out: dict[str, float] = {}
    for q, c, name in ((a2, b2, f"{prefix_a}_to_{prefix_b}"), (b2, a2, f"{prefix_b}_to_{prefix_a}")):
        metrics = retrieval_metrics(
            q, c, rel, ks, rank_cutoff=rank_cutoff, fraction_recall=fraction_recall, chunk_size=chunk_size
        )
        for metric, value in metrics.items():
            out[f"{name}/{metric}"] = value
    return out


# --------------------------------------------------------------------------------------------------
# STS correlations
# --------------------------------------------------------------------------------------------------


def rankdata(x: Any) -> np.ndarray:
    """1-based ranks with ties given their average rank (``scipy.stats.rankdata(method="average")``)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if np.isnan(x).any():
        raise ValueError("cannot rank NaN values")
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new_group = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new_group)  # 1..G, in sorted order
    bounds = np.r_[np.nonzero(new_group)[0], n]  # start of each group, then n
    avg = 0.5 * (bounds[group - 1] + 1 + bounds[group])  # mean of the 1-based positions start+1..end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg
    return ranks


def _pearson_r(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    denom = math.sqrt(float(x @ x) * float(y @ y))
    if denom == 0.0:
        return float("nan")  # a constant input: the correlation is undefined
    return float(np.clip((x @ y) / denom, -1.0, 1.0))


def _gold(scores: Any, n: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(s) != n:
        raise ValueError(f"got {len(s)} scores for {n} pairs")
    return s


def spearman(a: Any, b: Any, scores: Any, *, scale: float = 100.0) -> float:
    """Spearman rank correlation between cos(a_i, b_i) and the gold ``scores``, times ``scale`` (100).

    Same number as sentence-transformers' ``EmbeddingSimilarityEvaluator`` (``spearman_cosine``) times 100:
    Pearson correlation of the average ranks. NaN when either side is constant or n < 2.
    """
    cos = cosine_pairs(a, b)
    gold = _gold(scores, len(cos))
    if len(cos) < 2:
        return float("nan")
    return scale * _pearson_r(rankdata(cos), rankdata(gold))


def pearson(a: Any, b: Any, scores: Any, *, scale: float = 100.0) -> float:
    """Pearson correlation between cos(a_i, b_i) and the gold ``scores``, times ``scale`` (100)."""
    cos = cosine_pairs(a, b)
    gold = _gold(scores, len(cos))
    if len(cos) < 2:
        return float("nan")
    return scale * _pearson_r(cos, gold)


# --------------------------------------------------------------------------------------------------
# geometry: alignment, uniformity, modality gap
# --------------------------------------------------------------------------------------------------


def alignment(a: Any, b: Any, alpha: float = 2, *, normalize: bool = True) -> float:
    """Wang & Isola (2020) alignment: mean over positive pairs (a_i, b_i) of ||f(a_i) - f(b_i)||^alpha.

    ``f`` is the L2-normalised embedding (``normalize=False`` uses the raw vectors). With alpha=2 on the
    unit sphere this equals 2 - 2 * mean cosine, in [0, 4]. Linear in n, so never sampled.
    """
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape != b2.shape:
        raise ValueError(f"a and b must have the same shape, got {a2.shape} and {b2.shape}")
    if len(a2) == 0:
        raise ValueError("alignment needs at least one pair")
    if normalize:
        a2, b2 = _normalize(a2), _normalize(b2)
    dist = np.linalg.norm(a2 - b2, axis=1)
    return float(np.mean(dist**alpha))


def _logmeanexp(chunks: Iterable[np.ndarray]) -> float:
    """log(mean(exp(v))) over the concatenation of ``chunks``, without under/overflow."""
    m, total, count = -np.inf, 0.0, 0
    for v in chunks:
        if v.size == 0:
            continue
        vm = float(v.max())
        if vm > m:
            total = total * math.exp(m - vm) if np.isfinite(m) else 0.0
            m = vm
        total += float(np.exp(v - m).sum())
        count += v.size
    if count == 0:
        raise ValueError("uniformity needs at least two points")
    return m + math.log(total / count)


def uniformity(
    x: Any,
    t: float = 2,
    *,
    normalize: bool = True,
    max_exact: int = 10_000,
    num_pairs: int = 1_000_000,
    seed: int = 0,
) -> float:
    """Wang & Isola (2020) uniformity: log E_{i != j} exp(-t ||f(x_i) - f(x_j)||^2).

    Exact over all n(n-1)/2 distinct pairs (computed in blocks) when n <= ``max_exact``; otherwise an
    estimate from ``num_pairs`` pairs drawn uniformly among distinct pairs with ``numpy`` generator seed
    ``seed``, so the result is reproducible. Identical points are distinct pairs too (they count as
    distance 0), exactly like ``torch.pdist`` in the paper's reference code.
    """
    x2 = _as_2d(x, "x")
    if normalize:
        x2 = _normalize(x2)
    n = len(x2)
    if n < 2:
        raise ValueError("uniformity needs at least two points")
    sq = np.einsum("ij,ij->i", x2, x2)

    if n <= max_exact:
        block = max(1, _DEFAULT_BLOCK_ELEMENTS // 4 // n)

        def exact_chunks() -> Iterator[np.ndarray]:
            for start in range(0, n - 1, block):
                stop = min(start + block, n - 1)
                # rows start..stop-1 against columns i+1..n-1 (upper triangle only)
                d2 = sq[start:stop, None] + sq[None, start + 1 :] - 2.0 * (x2[start:stop] @ x2[start + 1 :].T)
                rows = np.arange(start, stop)[:, None]
                cols = np.arange(start + 1, n)[None, :]
                yield -t * np.maximum(d2[cols > rows], 0.0)

        return _logmeanexp(exact_chunks())

    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=num_pairs)
    j = (i + rng.integers(1, n, size=num_pairs)) % n  # uniform over j != i

    def sampled_chunks(step: int = 65_536) -> Iterator[np.ndarray]:
        for s in range(0, num_pairs, step):
            diff = x2[i[s : s + step]] - x2[j[s : s + step]]
            yield -t * np.einsum("ij,ij->i", diff, diff)

    return _logmeanexp(sampled_chunks())


def modality_gap(text: Any, image: Any) -> float:
    """Liang et al. (2022) modality gap: ||mean(normalised text) - mean(normalised image)||_2.

    In [0, 2]; 0 when the two clouds share a centroid. The two sides need not be paired or equal in size.
    """
    t2, i2 = _as_2d(text, "text"), _as_2d(image, "image")
    if t2.shape[1] != i2.shape[1]:
        raise ValueError(f"text and image dimensions differ: {t2.shape[1]} vs {i2.shape[1]}")
    if len(t2) == 0 or len(i2) == 0:
        raise ValueError("modality_gap needs at least one embedding per side")
    return float(np.linalg.norm(_normalize(t2).mean(axis=0) - _normalize(i2).mean(axis=0)))
