"""Hard-negative mining: turn (anchor, positive) pairs into (anchor, positive, negatives).

The corpus (all distinct positives) is embedded with the current model; for each anchor the
nearest corpus items that are not its positive become its negatives. Near-duplicates of the
positive are likely unlabeled positives ("false negatives"), so a candidate scoring above
`margin x score(anchor, positive)` is skipped (the "TopK-PercPos" filter of NV-Retriever;
Sample4Geo mines from neighbours in the current embedding space the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.config import MiningSpec
from trainer.data import LoadedData

logger = logging.getLogger(__name__)

Encode = Callable[[list[Any], str], np.ndarray]  # (inputs, modality) -> L2-normalised rows


@dataclass(frozen=True)
class MiningReport:
    anchors: int
    mined: int
    skipped_false_negatives: int
    without_negative: int


def mine_negatives(
    anchors: np.ndarray, positives: np.ndarray, corpus: np.ndarray, positive_index: np.ndarray, spec: MiningSpec
) -> tuple[list[list[int]], MiningReport]:
    """Indices into `corpus` of each anchor's hard negatives (pure function of embeddings).

    `positive_index[i]` is the corpus row of anchor i's positive. Rows are L2-normalised.
    """
    k = min(spec.candidates + 1, len(corpus))
    negatives: list[list[int]] = []
    skipped = without = 0
    for start in range(0, len(anchors), 1024):
        block = anchors[start : start + 1024]
        scores = block @ corpus.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        for row, candidates in enumerate(top):
            i = start + row
            ordered = candidates[np.argsort(-scores[row, candidates], kind="stable")]
            ceiling = spec.false_negative_margin * float(block[row] @ positives[i])
            chosen = []
            for c in ordered:
                if c == positive_index[i]:
                    continue
                if scores[row, c] > ceiling:
                    skipped += 1
                    continue
                chosen.append(int(c))
                if len(chosen) == spec.negatives_per_anchor:
                    break
            without += len(chosen) < spec.negatives_per_anchor
            negatives.append(chosen)
    report = MiningReport(len(anchors), sum(len(n) for n in negatives), skipped, without)
    return negatives, report


def add_hard_negatives(data: LoadedData, encode: Encode, spec: MiningSpec) -> tuple[LoadedData, MiningReport]:
    """A copy of `data` with `negative_1..n` columns mined with the current model.

    Anchors that end up with fewer negatives than asked (tiny corpora, strict margins) are
    dropped from the mined set rather than padded with easy ones.
    """
    keys = data.column("positive")
    corpus_keys = list(dict.fromkeys(keys))  # distinct positives, first-seen order
    where = {key: i for i, key in enumerate(corpus_keys)}
    positive_index = np.array([where[k] for k in keys])
    anchor_vectors = encode(data.load("anchor"), data.modalities["anchor"])
    loaded = data.load("positive")
    first_row: dict[Hashable, int] = {}
    for row, key in enumerate(keys):
        first_row.setdefault(key, row)
    corpus_inputs = [loaded[first_row[k]] for k in corpus_keys]
    corpus_vectors = encode(corpus_inputs, data.modalities["positive"])
    negatives, report = mine_negatives(
        anchor_vectors, corpus_vectors[positive_index], corpus_vectors, positive_index, spec
    )
    rows = []
    for record, chosen in zip(data.rows, negatives):
        if len(chosen) < spec.negatives_per_anchor:
            continue
        mined = {f"negative_{j + 1}": corpus_keys[c] for j, c in enumerate(chosen)}
        rows.append({"anchor": record["anchor"], "positive": record["positive"], **mined})
    columns = ["anchor", "positive"] + [f"negative_{j + 1}" for j in range(spec.negatives_per_anchor)]
    modalities = dict(data.modalities)
    modalities.update({c: data.modalities["positive"] for c in columns[2:]})
    logger.info(
        "mined %d negatives for %d anchors (%d candidates skipped as likely false negatives, %d anchors dropped)",
        report.mined,
        report.anchors,
        report.skipped_false_negatives,
        report.without_negative,
    )
    mined_data = LoadedData(
        name=data.name,
        kind="triplets",
        columns=columns,
        rows=rows,
        modalities=modalities,
        sha256=data.sha256,
        skipped=data.skipped,
        bad_rows=data.bad_rows,
    )
    return mined_data, report
