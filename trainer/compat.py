"""Backward-compatible training (issue 14): train a new model whose queries search the vectors an
old model embedded, so a collection pinned to the old version needs no re-embed.

Reference: Shen, Xiong, Xia, Soatto 2020, "Towards Backward-Compatible Representation Learning"
(BCT), and its cross-modal follow-up "Towards Cross-modal Backward-compatible Representation
Learning for Vision-Language Models". Here the "influence loss" is contrastive: each new embedding
must pick its old counterpart out of the batch's old embeddings.

* The old model is loaded once, frozen, in eval mode; its embeddings of every training row are
  computed once before training (:func:`build_old_cache`), kept in memory and on disk in the run
  folder (a resumed run reads them back), keyed by the row: the compat datasets carry each row's
  id as their label column, and :class:`CompatLoss` looks the row's old embeddings up by it.
* The term pairs each side of a row, embedded by the new model, with the other side embedded by
  the old one, both directions averaged: for pairs (matches) InfoNCE of new anchors against the
  old positives of the batch and of new positives against old anchors
  (:func:`cross_model_info_nce`); graded pairs (STS) are not matches, so there the term is the
  configured graded loss itself on (new s1, old s2) and (new s2, old s1): cos(new(s1), old(s2))
  regressed onto the score, which is what ranks a new query against an old gallery. It is added,
  times ``weight``, to the configured main loss.
* With ``map: true`` a linear map new -> old (identity when the dimensions agree, else a least
  squares fit) projects the new embeddings first; it is trained on the same term and saved as
  ``compat_map.npy`` beside the weights. ``weight: 0`` trains the map alone (on detached
  embeddings: the model does not move for compatibility).
* :func:`cross_model_metrics` scores new queries against the old gallery beside old/old and
  new/new, with the evaluation's own metrics, under ``<set>/new-old/<metric>`` etc.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.merged_forward import embed_columns
from torch import Tensor, nn

from registry.manifest import Compatibility, Manifest
from trainer.config import CompatSpec, ConfigError
from trainer.data import LoadedData
from trainer.evaluation import EvalSet, embed_sides, score_embeddings
from trainer.losses import _ContrastiveLoss

logger = logging.getLogger(__name__)

MAP_FILE = "compat_map.npy"
RECORD_FILE = "compat.json"
# The cross-model metrics: ranking and correlation only (alignment/uniformity of a mixed pair of
# spaces describe nothing a user queries).
_METRIC_WORDS = ("recall@", "mrr@", "ndcg@", "spearman", "pearson")
_LSTSQ_ROWS = 4096

Encode = Callable[[list[Any], str], np.ndarray]


@dataclass(frozen=True)
class OldModel:
    """The model to stay compatible with, pinned when the run first started."""

    requested: str  # as the config names it (may be an alias)
    ref: str  # exact "name/version" for a registry version; the hub id or path otherwise
    source: str  # what SentenceTransformer loads
    weights_sha256: str | None  # as the registry records it (None outside the registry)
    in_registry: bool  # only a registry version can be claimed in a manifest (a collection pins one)

    @property
    def cache_id(self) -> str:
        return self.weights_sha256 or self.ref

    def write(self, run_dir: Path) -> None:
        (run_dir / RECORD_FILE).write_text(json.dumps(self.__dict__, indent=2, sort_keys=True) + "\n")

    @classmethod
    def recorded(cls, run_dir: Path, requested: str) -> OldModel | None:
        """The pin an earlier start of this run recorded for `requested` (an alias that moved since
        must not change which version a resumed run is compatible with)."""
        path = run_dir / RECORD_FILE
        if not path.is_file():
            return None
        record = cls(**json.loads(path.read_text()))
        return record if record.requested == requested else None


@dataclass
class OldCache:
    """The old model's embeddings of every training row's anchor and positive, rows of all datasets
    stacked (dataset `name` starts at `offsets[name]`). `labels[r]` is row r's own label (graded
    score; NaN when its dataset has none), handed to the main loss in place of the row id."""

    anchors: np.ndarray
    positives: np.ndarray
    graded: np.ndarray  # bool per row: a graded pair, not a match
    labels: np.ndarray
    offsets: dict[str, int]

    @property
    def dimension(self) -> int:
        return int(self.anchors.shape[1])


def _cache_key(data: LoadedData, old: OldModel) -> str:
    digest = hashlib.sha256(f"{old.cache_id}\0{data.sha256}\0{len(data)}".encode())
    for row in data.rows:
        digest.update(json.dumps([row["anchor"], row["positive"]]).encode())
    return digest.hexdigest()[:16]


def _embed_column(encode: Encode, data: LoadedData, column: str) -> np.ndarray:
    vectors = np.asarray(encode(data.load(column), data.modalities.get(column, "text")), dtype=np.float32)
    return vectors.reshape(len(data), -1)


def _dataset_cache(data: LoadedData, old: OldModel, encode: Encode, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(old anchors, old positives) of one dataset: read from `folder` when an earlier start of the
    run computed them for these rows and this old model, else computed and saved (atomically)."""
    path = folder / f"{data.name}-{_cache_key(data, old)}.npz"
    if path.is_file():
        with np.load(path) as saved:
            return saved["anchor"], saved["positive"]
    anchors = _embed_column(encode, data, "anchor")
    positives = anchors if data.kind == "texts" else _embed_column(encode, data, "positive")
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial.npz")  # each rank of a DDP run writes its own
    np.savez(partial, anchor=anchors, positive=positives)
    os.replace(partial, path)
    return anchors, positives


def build_old_cache(train_sets: Sequence[LoadedData], old: OldModel, encode: Encode, folder: Path) -> OldCache:
    """The old model's embeddings of every row's anchor and positive, computed once per run."""
    anchors, positives, graded, labels, offsets, start = [], [], [], [], {}, 0
    for data in train_sets:
        old_anchors, old_positives = _dataset_cache(data, old, encode, folder)
        anchors.append(old_anchors)
        positives.append(old_positives)
        graded.append(np.full(len(data), data.kind == "graded"))
        scores = data.column("score") if "score" in data.columns else [float("nan")] * len(data)
        labels.append(np.asarray(scores, dtype=np.float32))
        offsets[data.name] = start
        start += len(data)
    return OldCache(
        np.concatenate(anchors), np.concatenate(positives), np.concatenate(graded), np.concatenate(labels), offsets
    )


def with_row_ids(data: LoadedData, offset: int) -> Any:
    """The dataset for the trainer, its label column the row's id (its own score, if any, stays
    in the cache: the collator hands one label column to the loss)."""
    rows = [{**{k: v for k, v in row.items() if k != "score"}, "label": offset + i} for i, row in enumerate(data.rows)]
    return replace(data, rows=rows).to_hf()


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


def cross_model_info_nce(new: Tensor, old: Tensor, logit_scale: float) -> Tensor:
    """InfoNCE of new-model rows against old-model columns: row i's target is old row i, the
    other old rows of the batch are its negatives. Both sides are L2-normalised here::

        loss = mean_i -log softmax_j(scale * cos(new_i, old_j))[i]
    """
    if new.shape[0] != old.shape[0]:
        raise ValueError(f"{new.shape[0]} new rows but {old.shape[0]} old ones")
    logits = logit_scale * F.normalize(new, dim=-1) @ F.normalize(old, dim=-1).T
    return F.cross_entropy(logits, torch.arange(new.shape[0], device=new.device))


class CompatLoss(_ContrastiveLoss):
    """The configured loss plus ``weight`` x the cross-model term (see the module docstring).

    Batches must come from :func:`with_row_ids` datasets: the labels are row ids. The main loss
    receives the rows' own labels (graded scores) in their place, and the embeddings this loss
    computed, so the model runs forward once per column.
    """

    _no_weight_decay = ("map_weight",)  # decay would pull the map towards zero, not towards the old space
    old_anchors: Tensor
    old_positives: Tensor
    row_graded: Tensor
    row_labels: Tensor
    map_weight: nn.Parameter | None
    main: Any  # a loss module with compute_loss_from_embeddings (ours or sentence-transformers')

    def __init__(
        self,
        main: nn.Module,
        cache: OldCache,
        *,
        weight: float,
        temperature: float,
        map_init: np.ndarray | None = None,
    ) -> None:
        if not hasattr(main, "compute_loss_from_embeddings"):
            raise ValueError(f"{type(main).__name__} does not score given embeddings; compatible_with cannot wrap it")
        model: nn.Module = getattr(main, "model")  # noqa: B009 (nn.Module types attributes as Tensor | Module)
        _ContrastiveLoss.__init__(self, model, gather_across_devices=False)
        self.main = main
        self.weight = float(weight)
        self.logit_scale = 1.0 / temperature
        self.register_buffer("old_anchors", torch.from_numpy(cache.anchors), persistent=False)
        self.register_buffer("old_positives", torch.from_numpy(cache.positives), persistent=False)
        self.register_buffer("row_graded", torch.from_numpy(cache.graded), persistent=False)
        self.register_buffer("row_labels", torch.from_numpy(cache.labels), persistent=False)
        self.map_weight = None if map_init is None else nn.Parameter(torch.from_numpy(map_init.astype(np.float32)))

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("CompatLoss needs the row ids that with_row_ids datasets carry as their label column")
        rows = labels.long().to(self.old_anchors.device)
        embeddings = embed_columns(self.model, sentence_features)
        main: Tensor = self.main.compute_loss_from_embeddings(embeddings, self.own_labels(rows, embeddings[0].device))
        return main + self.compat_term(embeddings[0], embeddings[1], rows)

    def own_labels(self, rows: Tensor, device: torch.device) -> Tensor | None:
        """The rows' own labels (graded scores) for the main loss; None for rows that have none."""
        own = self.row_labels[rows]
        return None if torch.isnan(own).all() else own.to(device)

    def project(self, new: Tensor) -> Tensor:
        """New embeddings in the old space: through the map when there is one."""
        return new if self.map_weight is None else new @ self.map_weight.to(new.dtype)

    def compat_term(self, anchors: Tensor, positives: Tensor, rows: Tensor) -> Tensor:
        if self.weight == 0:  # map only: the model gets no gradient from compatibility
            anchors, positives = anchors.detach(), positives.detach()
        old_a = self.old_anchors[rows].to(anchors.dtype)
        old_p = self.old_positives[rows].to(anchors.dtype)
        new_a, new_p = self.project(anchors), self.project(positives)
        graded = self.row_graded[rows]
        term: Tensor
        if bool(graded.all()):  # (new s1, old s2) and (new s2, old s1) scored like the data's own pairs
            scores = self.own_labels(rows, anchors.device)
            term = (
                self.main.compute_loss_from_embeddings([new_a, old_p], scores)
                + self.main.compute_loss_from_embeddings([new_p, old_a], scores)
            ) / 2
        elif not bool(graded.any()):
            term = (
                cross_model_info_nce(new_a, old_p, self.logit_scale)
                + cross_model_info_nce(new_p, old_a, self.logit_scale)
            ) / 2
        else:
            raise ValueError("a batch mixes graded and paired rows; each batch must come from one dataset")
        return (self.weight or 1.0) * term

    def mapping(self) -> np.ndarray | None:
        """The learned map as saved (float32 [new dim, old dim]), or None without one."""
        if self.map_weight is None:
            return None
        return np.ascontiguousarray(self.map_weight.detach().float().cpu().numpy())

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = getattr(self.main, "get_config_dict", dict)()
        return {**config, "compat_weight": self.weight, "compat_map": self.map_weight is not None}


def initial_map(new_dim: int, cache: OldCache, new_anchors: np.ndarray | None = None) -> np.ndarray:
    """Where the map starts: identity when the dimensions agree; otherwise the least-squares map
    from `new_anchors` (the base model's embeddings of the first training anchors) to the old
    model's embeddings of the same anchors."""
    if new_dim == cache.dimension:
        return np.eye(new_dim, dtype=np.float32)
    if new_anchors is None:
        raise ValueError("the dimensions differ: the least-squares start needs the new model's anchor embeddings")
    x = np.asarray(new_anchors, dtype=np.float64)
    solution, *_ = np.linalg.lstsq(x, cache.anchors[: len(x)].astype(np.float64), rcond=None)
    return solution.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _apply_map(vectors: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    out = vectors if mapping is None else vectors @ mapping
    normalised: np.ndarray = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return normalised.astype(np.float32)


def _tagged(metrics: dict[str, float], set_name: str, tag: str) -> dict[str, float]:
    prefix = f"{set_name}/"
    return {
        f"{set_name}/{tag}/{key.removeprefix(prefix)}": value
        for key, value in metrics.items()
        if any(word in key for word in _METRIC_WORDS)
    }


def cross_model_metrics(
    new_encode: Encode,
    old_sides: dict[str, tuple[np.ndarray, np.ndarray]],
    sets: Sequence[EvalSet],
    mapping: np.ndarray | None,
) -> dict[str, float]:
    """For each set: the new model's "a" side (queries; through the map) against the old model's
    "b" side (the gallery a pinned collection holds), beside old/old and new/new, as
    `<set>/new-old/<metric>`, `<set>/old-old/<metric>`, `<set>/new-new/<metric>`. For a graded
    set that is the Spearman of cos(new(s1), old(s2)). `old_sides`: :func:`old_eval_sides`."""
    out: dict[str, float] = {}
    for eval_set in sets:
        new_a, new_b = embed_sides(new_encode, eval_set)
        old_a, old_b = old_sides[eval_set.name]
        out.update(_tagged(score_embeddings(eval_set, _apply_map(new_a, mapping), old_b), eval_set.name, "new-old"))
        out.update(_tagged(score_embeddings(eval_set, old_a, old_b), eval_set.name, "old-old"))
        out.update(_tagged(score_embeddings(eval_set, new_a, new_b), eval_set.name, "new-new"))
    return out


def old_eval_sides(old_encode: Encode, sets: Sequence[EvalSet]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The old model's embeddings of each evaluation set, computed once for both evaluations."""
    return {eval_set.name: embed_sides(old_encode, eval_set) for eval_set in sets}


def check_dimensions(spec: CompatSpec, old: OldModel, old_dim: int | None, new_dim: int | None) -> None:
    """ConfigError when the old model's dimension is unknown, or differs without a map."""
    if old_dim is None or new_dim is None:
        which = "old model " + old.ref if old_dim is None else "new model"
        raise ConfigError([f"compatible_with: the {which}'s embedding dimension is unknown"])
    if old_dim != new_dim and not spec.map:
        raise ConfigError(
            [
                f"compatible_with: {old.ref} embeds in {old_dim} dimensions, the new model in {new_dim}; "
                "set compatible_with.map: true to learn a map between them"
            ]
        )


# --------------------------------------------------------------------------------------------
# One run's compatibility stage
# --------------------------------------------------------------------------------------------

Resolve = Callable[[str], tuple[str, str, Manifest | None]]


def pin_old_model(spec: CompatSpec, run_dir: Path, resolve: Resolve) -> OldModel:
    """The old model as an exact version, recorded in the run folder at the first start (a resume
    keeps that pin even if an alias moved meanwhile). `resolve` is the run's base-model resolution:
    (loadable source, label, manifest when it is a registry version)."""
    recorded = OldModel.recorded(run_dir, spec.model)
    source, label, manifest = resolve(recorded.ref if recorded and recorded.in_registry else spec.model)
    old = OldModel(
        requested=spec.model,
        ref=label,
        source=source,
        weights_sha256=manifest.lineage.weights_sha256 if manifest else None,
        in_registry=manifest is not None,
    )
    if recorded is not None and recorded.weights_sha256 != old.weights_sha256:
        raise ConfigError([f"compatible_with: {old.ref}'s weights changed since this run started; start a new run"])
    run_dir.mkdir(parents=True, exist_ok=True)
    old.write(run_dir)
    return old


@dataclass
class CompatRun:
    """What the compatibility stage hands the rest of the run: the pinned old model, its cached
    embeddings of the training rows and of the evaluation sets, and (once training is set up)
    the wrapping loss."""

    spec: CompatSpec
    old: OldModel
    cache: OldCache
    old_sides: dict[str, tuple[np.ndarray, np.ndarray]]
    map_init: np.ndarray | None
    temperature: float
    loss: CompatLoss | None = None

    def wrap(self, main: nn.Module, train_sets: Sequence[LoadedData]) -> tuple[CompatLoss, dict[str, Any]]:
        """The main loss wrapped with the cross-model term, and the datasets carrying row ids."""
        self.loss = CompatLoss(
            main, self.cache, weight=self.spec.weight, temperature=self.temperature, map_init=self.map_init
        )
        datasets = {d.name: with_row_ids(d, self.cache.offsets[d.name]) for d in train_sets}
        return self.loss, datasets

    def mapping(self) -> np.ndarray | None:
        """The map as trained (or as it starts, before training); None without `map: true`."""
        return self.loss.mapping() if self.loss is not None else self.map_init

    def metrics(self, new_encode: Encode, sets: Sequence[EvalSet]) -> dict[str, float]:
        return cross_model_metrics(new_encode, self.old_sides, sets, self.mapping())

    def save_map(self, model_dir: Path) -> str | None:
        """Writes compat_map.npy into the exported model folder; its name (None without a map)."""
        mapping = self.mapping()
        if mapping is None:
            return None
        np.save(model_dir / MAP_FILE, mapping.astype(np.float32))
        return MAP_FILE

    def record(self, metrics: dict[str, float], map_file: str | None) -> Compatibility | None:
        """The manifest's claim, only for a registry version: a hub id or path cannot be pinned by a
        collection, so there the numbers stay in the run's report and metrics alone."""
        if not self.old.in_registry:
            logger.warning("compatible_with %s is not a registry version: measured, not claimed", self.old.ref)
            return None
        cross = {k: v for k, v in metrics.items() if any(f"/{tag}/" in k for tag in ("new-old", "old-old", "new-new"))}
        return Compatibility(ref=self.old.ref, weights_sha256=self.old.weights_sha256, map_file=map_file, metrics=cross)


def prepare(
    spec: CompatSpec,
    old: OldModel,
    *,
    old_encode: Encode,
    old_dim: int | None,
    new_encode: Encode,
    new_dim: int | None,
    train_sets: Sequence[LoadedData],
    eval_sets: Sequence[EvalSet],
    cache_dir: Path,
    temperature: float,
) -> CompatRun:
    """Checks the dimensions, embeds the training rows (or reads them back) and the evaluation sets
    with the old model, and starts the map; the caller may drop the old model afterwards."""
    check_dimensions(spec, old, old_dim, new_dim)
    assert new_dim is not None  # check_dimensions refused None
    cache = build_old_cache(train_sets, old, old_encode, cache_dir)
    map_init = None
    if spec.map:
        first = train_sets[0]
        rows = min(len(first), _LSTSQ_ROWS)
        sample = replace(first, rows=first.rows[:rows])
        new_anchors = None if new_dim == cache.dimension else _embed_column(new_encode, sample, "anchor")
        map_init = initial_map(new_dim, cache, new_anchors)
    sides = old_eval_sides(old_encode, eval_sets)
    return CompatRun(spec, old, cache, sides, map_init, spec.temperature or temperature)
