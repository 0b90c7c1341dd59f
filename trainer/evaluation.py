"""Evaluation runs: embed a named evaluation set with any encoder, score it, report before/after.

The metrics themselves are in :mod:`trainer.metrics`, pure functions of embeddings; this module is
the part that touches the world: it calls the encoder (in batches, longest texts first), reads STS
files, and turns two metric dicts into the markdown table of the model card and the job record.
Kept apart so that the maths can be read and tested without a model, and so that a change to how
sets are embedded or reported cannot move a number.

:class:`EvalSet` describes a "paired" set (row i of ``a_inputs`` matches row i of ``b_inputs``) or a
"graded" one (pairs with gold similarity ``scores``, e.g. STS). :func:`evaluate` embeds both sides with
any ``encode(inputs, modality) -> array`` callable and returns flat ``"<set name>/<metric>"`` keys;
:func:`compare` and :func:`format_table` turn two such dicts into a markdown before/after report.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from trainer.metrics import alignment, modality_gap, paired_retrieval, pearson, spearman, to_numpy, uniformity

__all__ = [
    "Encode",
    "EvalSet",
    "compare",
    "embed_sides",
    "evaluate",
    "format_table",
    "load_sts",
    "score_embeddings",
]

# --------------------------------------------------------------------------------------------------
# runner
# --------------------------------------------------------------------------------------------------

Encode = Callable[[list[Any], str], Any]


@dataclass
class EvalSet:
    """A named evaluation set.

    * ``kind="paired"``: row i of ``a_inputs`` matches row i of ``b_inputs`` (caption/image, query/passage).
      ``a_keys``/``b_keys`` mark duplicate contents (see :func:`trainer.metrics.paired_relevant`); when
      omitted, string inputs are their own keys (identical captions are duplicates) and other inputs
      (images) are all distinct.
    * ``kind="graded"``: ``scores`` holds a gold similarity per pair (e.g. STS 0..5). Pairs scoring at least
      ``positive_threshold`` are the positives of :func:`alignment` (default: 80% of the way from the
      lowest to the highest score, i.e. >= 4.0 on STS).

    ``a_modality``/``b_modality`` ("text" or "image") are inferred from the first input when omitted:
    ``str`` is text, anything else (a PIL image) is image.
    """

    name: str
    kind: Literal["paired", "graded"]
    a_inputs: Sequence[Any]
    b_inputs: Sequence[Any]
    scores: Sequence[float] | np.ndarray | None = None
    a_keys: Sequence[Hashable] | None = None
    b_keys: Sequence[Hashable] | None = None
    a_modality: str | None = None
    b_modality: str | None = None
    positive_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("paired", "graded"):
            raise ValueError(f"kind must be 'paired' or 'graded', got {self.kind!r}")
        if len(self.a_inputs) != len(self.b_inputs):
            raise ValueError(f"{self.name}: {len(self.a_inputs)} a_inputs but {len(self.b_inputs)} b_inputs")
        if len(self.a_inputs) == 0:
            raise ValueError(f"{self.name}: empty evaluation set")
        if self.kind == "graded" and (self.scores is None or len(self.scores) != len(self.a_inputs)):
            raise ValueError(f"{self.name}: a graded set needs one score per pair")
        for side in ("a", "b"):
            keys = getattr(self, f"{side}_keys")
            if keys is not None and len(keys) != len(self.a_inputs):
                raise ValueError(f"{self.name}: {side}_keys must have one key per row")
            modality = getattr(self, f"{side}_modality")
            if modality is None:
                first = getattr(self, f"{side}_inputs")[0]
                setattr(self, f"{side}_modality", "text" if isinstance(first, str) else "image")
            elif modality not in ("text", "image"):
                raise ValueError(f"{self.name}: {side}_modality must be 'text' or 'image', got {modality!r}")


def _embed(encode: Encode, inputs: Sequence[Any], modality: str, batch_size: int | None) -> np.ndarray:
    """Embeds in batches; texts go longest first (as sentence-transformers does within one call) so each
    batch pads to similar lengths, and the rows are put back in input order."""
    items = list(inputs)
    order = np.arange(len(items))
    if all(isinstance(x, str) for x in items):
        order = np.argsort([-len(x) for x in items], kind="stable")
    items = [items[i] for i in order]
    step = batch_size if batch_size else len(items)
    parts = [to_numpy(encode(items[s : s + step], modality)) for s in range(0, len(items), step)]
    emb = np.concatenate([p.reshape(len(p), -1) for p in parts]).astype(np.float32, copy=False)
    if len(emb) != len(items):
        raise ValueError(f"encode returned {len(emb)} embeddings for {len(items)} {modality} inputs")
    out = np.empty_like(emb)
    out[order] = emb
    return out


def _default_keys(inputs: Sequence[Any]) -> list[Hashable]:
    return [x if isinstance(x, str) else i for i, x in enumerate(inputs)]


def evaluate(
    encode: Encode,
    eval_set: EvalSet,
    batch_size: int | None = 64,
    *,
    ks: Iterable[int] = (1, 5, 10),
) -> dict[str, float]:
    """Embed ``eval_set`` with ``encode(inputs, modality)`` and compute its metrics.

    ``encode`` receives lists of at most ``batch_size`` inputs (``None``: everything in one call) and a
    modality ("text"/"image"), and returns an (n, dim) array or tensor; e.g.
    ``lambda xs, m: model.encode(xs, batch_size=64)`` or ``Encoder.encode``. Embeddings need not be
    normalised. Every key is prefixed with the set name:

    * paired: ``<name>/<a>_to_<b>/{recall@k, mrr@10, ndcg@10}`` and ``<name>/<b>_to_<a>/...`` where ``<a>``,
      ``<b>`` are the modalities ("text_to_image"), or "a"/"b" when both sides share one ("a_to_b");
      ``<name>/alignment``; ``<name>/uniformity_<a>`` and ``<name>/uniformity_<b>`` (one ``<name>/uniformity``
      over both sides when they share a modality); ``<name>/modality_gap`` when the modalities differ.
    * graded: ``<name>/spearman`` and ``<name>/pearson`` (x100, cosine), ``<name>/alignment`` over the positive
      pairs (omitted if there are none), ``<name>/uniformity`` over both sides.
    """
    a, b = embed_sides(encode, eval_set, batch_size)
    return score_embeddings(eval_set, a, b, ks=ks)


def embed_sides(encode: Encode, eval_set: EvalSet, batch_size: int | None = 64) -> tuple[np.ndarray, np.ndarray]:
    """Both sides of ``eval_set`` embedded with ``encode``, as :func:`evaluate` embeds them."""
    assert eval_set.a_modality is not None and eval_set.b_modality is not None  # __post_init__ fills them in
    a = _embed(encode, eval_set.a_inputs, eval_set.a_modality, batch_size)
    return a, _embed(encode, eval_set.b_inputs, eval_set.b_modality, batch_size)


def score_embeddings(
    eval_set: EvalSet, a: np.ndarray, b: np.ndarray, *, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """:func:`evaluate`'s metrics of already embedded sides; apart so that the two sides may come
    from different models (backward-compatible training scores new queries against an old gallery)."""
    s = eval_set
    assert s.a_modality is not None and s.b_modality is not None
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{s.name}: a and b embeddings differ in dimension ({a.shape[1]} vs {b.shape[1]})")
    cross_modal = s.a_modality != s.b_modality
    out: dict[str, float] = {}

    if s.kind == "paired":
        pa, pb = (s.a_modality, s.b_modality) if cross_modal else ("a", "b")
        a_keys = list(s.a_keys) if s.a_keys is not None else _default_keys(s.a_inputs)
        b_keys = list(s.b_keys) if s.b_keys is not None else _default_keys(s.b_inputs)
        out.update(paired_retrieval(a, b, a_keys, b_keys, prefix_a=pa, prefix_b=pb, ks=ks))
        out["alignment"] = alignment(a, b)
    else:
        gold = np.asarray(s.scores, dtype=np.float64)
        out["spearman"] = spearman(a, b, gold)
        out["pearson"] = pearson(a, b, gold)
        threshold = s.positive_threshold
        if threshold is None:
            threshold = gold.min() + 0.8 * (gold.max() - gold.min())
        positive = gold >= threshold
        if positive.any():
            out["alignment"] = alignment(a[positive], b[positive])

    if cross_modal:
        out[f"uniformity_{s.a_modality}"] = uniformity(a)
        out[f"uniformity_{s.b_modality}"] = uniformity(b)
        text, image = (a, b) if s.a_modality == "text" else (b, a)
        out["modality_gap"] = modality_gap(text, image)
    else:
        out["uniformity"] = uniformity(np.concatenate([a, b]))
    return {f"{s.name}/{k}": float(v) for k, v in out.items()}


def load_sts(path: str | Path, name: str | None = None) -> EvalSet:
    """An STS-benchmark file (tab-separated: genre, filename, year, id, score, sentence1, sentence2[, ...])
    as a graded :class:`EvalSet`; ``name`` defaults to the file stem ("sts-dev"). Read with
    ``csv.QUOTE_NONE``, since some sentences contain unbalanced quotes."""
    path = Path(path)
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) < 7:
                continue
            scores.append(float(row[4]))
            s1.append(row[5])
            s2.append(row[6])
    return EvalSet(name=name or path.stem, kind="graded", a_inputs=s1, b_inputs=s2, scores=scores)


# --------------------------------------------------------------------------------------------------
# before/after report
# --------------------------------------------------------------------------------------------------


def compare(before: dict[str, float], after: dict[str, float]) -> list[tuple[str, float, float, float]]:
    """Rows ``(metric, before, after, after - before)`` over the union of metrics, in ``before``'s order
    followed by metrics only in ``after``; a metric missing on one side has NaN there (and NaN delta)."""
    nan = float("nan")
    names = list(before) + [k for k in after if k not in before]
    rows = []
    for k in names:
        x, y = float(before.get(k, nan)), float(after.get(k, nan))
        rows.append((k, x, y, y - x))
    return rows


def format_table(rows: Iterable[tuple[str, float, float, float]], digits: int = 4) -> str:
    """A markdown table of :func:`compare` rows; missing values print as "n/a", deltas with a sign.

    Direction: higher is better for recall/MRR/nDCG/spearman/pearson; lower for alignment and
    uniformity; the modality gap is descriptive.
    """

    def fmt(v: float, signed: bool = False) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "n/a"
        return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"

    lines = ["| metric | before | after | delta |", "|---|---:|---:|---:|"]
    for metric, x, y, dlt in rows:
        lines.append(f"| {metric} | {fmt(x)} | {fmt(y)} | {fmt(dlt, signed=True)} |")
    return "\n".join(lines)
