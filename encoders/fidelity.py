"""The fidelity gate: a variant serves only if it answers like its fp32 version.

Two measurements on the same sentence pairs, the variant against the version run in torch fp32:
- cosine of each probe text's vector to its fp32 vector (the gate takes the lowest: a variant
  that bends even one text's vector past the threshold is refused, whatever the mean);
- STS Spearman (x100) of the pairs' cosine similarities against the gold scores, for both; the
  gate takes the drop (fp32 minus variant, in points).

Default pairs: the captions genre of the STS benchmark dev split, shipped in `encoders/fidelity_data`
(see its README); `load_pairs` reads that file, the STS benchmark's own csv, or any
`score<TAB>text<TAB>text` file, so a user can gate on their own domain.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from encoders.encoder import Encoder

MIN_COSINE = 0.99
MAX_SPEARMAN_DROP = 0.5  # points of Spearman x100
BATCH = 32


@dataclass(frozen=True)
class Pair:
    first: str
    second: str
    score: float


def bundled_pairs_path() -> Path:
    return Path(__file__).parent / "fidelity_data" / "sts_dev_captions.tsv"


def load_pairs(path: Path) -> list[Pair]:
    """`score<TAB>s1<TAB>s2` rows, or the STS benchmark's csv (score in column 5, sentences after)."""
    pairs = []
    with Path(path).open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or not "".join(row).strip():
                continue
            fields = row[4:7] if len(row) >= 7 else row[:3]
            try:
                score, first, second = float(fields[0]), fields[1], fields[2]
            except (ValueError, IndexError):
                raise ValueError(
                    f"{path}:{number}: expected 'score<TAB>sentence1<TAB>sentence2' (or the STS benchmark's csv)"
                ) from None
            pairs.append(Pair(first, second, score))
    if len(pairs) < 10:
        raise ValueError(f"{path}: {len(pairs)} pairs; the gate needs at least 10 for a Spearman correlation")
    return pairs


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rho, ties given their average rank (as scipy does)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return np.asarray(sums[inverse] / counts[inverse])


def _embed(encoder: Encoder, texts: Sequence[str], progress: Callable[[int], None] | None) -> np.ndarray:
    rows = []
    for start in range(0, len(texts), BATCH):
        rows.append(encoder.encode(list(texts[start : start + BATCH]), "text"))
        if progress is not None:
            progress(min(start + BATCH, len(texts)))
    vectors = np.concatenate(rows)
    return np.asarray(vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12))


def _sts(vectors: np.ndarray, index: dict[str, int], pairs: Sequence[Pair]) -> float:
    first = vectors[[index[p.first] for p in pairs]]
    second = vectors[[index[p.second] for p in pairs]]
    return 100 * spearman(np.sum(first * second, axis=1), np.array([p.score for p in pairs]))


def measure(
    reference: Encoder,
    candidate: Encoder,
    pairs: Sequence[Pair],
    source: str,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """The fidelity report of `candidate` against `reference` (the same version in torch fp32)."""
    # by length, so each batch pads little (a third of the time of alphabetical order on STS-B)
    texts = sorted({t for p in pairs for t in (p.first, p.second)}, key=lambda t: (len(t), t))
    index = {t: i for i, t in enumerate(texts)}

    def step(label: str) -> Callable[[int], None] | None:
        return None if progress is None else (lambda done: progress(label, done, len(texts)))

    fp32 = _embed(reference, texts, step("fp32"))
    variant = _embed(candidate, texts, step("variant"))
    cosines = np.sum(fp32 * variant, axis=1)
    return judge(
        cosine_min=float(cosines.min()),
        cosine_mean=float(cosines.mean()),
        spearman_fp32=_sts(fp32, index, pairs),
        spearman_variant=_sts(variant, index, pairs),
        probe_texts=len(texts),
        pairs=len(pairs),
        source=source,
    )


def judge(
    *,
    cosine_min: float,
    cosine_mean: float,
    spearman_fp32: float,
    spearman_variant: float,
    probe_texts: int,
    pairs: int,
    source: str,
) -> dict[str, Any]:
    """The gate's verdict on measured numbers: passed, and every reason it did not."""
    drop = spearman_fp32 - spearman_variant
    reasons = []
    if cosine_min < MIN_COSINE:
        reasons.append(f"lowest cosine to fp32 {cosine_min:.4f} < {MIN_COSINE}")
    if drop > MAX_SPEARMAN_DROP:
        reasons.append(
            f"STS Spearman {spearman_variant:.2f} is {drop:.2f} points below fp32's {spearman_fp32:.2f} "
            f"(at most {MAX_SPEARMAN_DROP} allowed)"
        )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "cosine_min": round(cosine_min, 6),
        "cosine_mean": round(cosine_mean, 6),
        "spearman_fp32": round(spearman_fp32, 3),
        "spearman": round(spearman_variant, 3),
        "spearman_drop": round(drop, 3),
        "min_cosine": MIN_COSINE,
        "max_spearman_drop": MAX_SPEARMAN_DROP,
        "probe_texts": probe_texts,
        "pairs": pairs,
        "source": source,
    }
