"""Continuously weighted contrastive loss (CWCL): soft targets instead of one-hot.

Plain InfoNCE says "pair i belongs together, every other pairing is equally wrong". Real data
is graded: two captions of similar images are partly right for each other, and STS-style data
says *how* similar a pair is. CWCL replaces the one-hot target of each row by a distribution:
from the intra-modal similarity of a reference view (CWCL's frozen tower), or from graded labels.
The maths is one cross-entropy against any target matrix (:func:`soft_target_info_nce`); the two
target builders (:func:`similarity_targets`, :func:`graded_targets`) are separate and tested apart.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.losses.core import (
    Gathered,
    _candidates,
    _ContrastiveLoss,
    _LearnableScale,
    _normalise,
    _resolve_columns,
    _split_columns,
    gather_with_grad,
)


def similarity_targets(reference_rows: Tensor, reference_columns: Tensor, temperature: float | None = None) -> Tensor:
    """CWCL's targets from a reference view: ``w_ij = (1 + cos(r_i, r_j)) / 2``, rows normalised to 1.

    Reference: Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted
    Contrastive Loss", eq. (3) and section 3: the weights come from the frozen (pretrained) modality,
    so pairs that modality finds alike are partly positive. ``w_ii = 1`` (a row is its own
    reference's best match); the result is detached (targets, not a path for gradients).

    ``temperature`` (Duet's option, not the paper's): ``softmax_j(cos(r_i, r_j) / temperature)``
    instead, which keeps the own pair dominant and gives only near neighbours real weight
    (the paper's linear weights give an unrelated pair half the own pair's; see
    :class:`ContinuouslyWeightedLoss`). Small values approach InfoNCE's one-hot target.
    """
    rows, columns = _normalise([reference_rows.detach(), reference_columns.detach()])
    cosines = rows @ columns.T
    if temperature is not None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        return F.softmax(cosines / temperature, dim=1)
    weights = (1.0 + cosines) / 2.0
    return weights / weights.sum(dim=1, keepdim=True)


def graded_targets(scores: Tensor, num_columns: int, offset: int = 0) -> Tensor:
    """Soft targets from graded relevance in ``[0, 1]``: ``g_i`` on the row's own column, the rest
    ``(1 - g_i)`` spread evenly over the other ``num_columns - 1`` columns.

    Reference: CWCL (Srinivasa et al. 2023) with the weights taken from labels instead of a
    frozen tower, as "Generalized Contrastive Learning for Multi-Modal Retrieval and Ranking"
    (Zhu et al. 2024) uses graded relevance. The softmax that minimises the loss is the target
    itself, so a pair's similarity is placed against the batch's unrelated pairs by its score:
    ``g = 1`` is InfoNCE's one-hot target, ``g = 1 / num_columns`` level with them, ``g = 0``
    below all of them. ``offset`` is the column of row 0's own positive (``rank * B`` when columns
    are gathered from every rank).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be one number per row, got shape {tuple(scores.shape)}")
    if num_columns < 2:
        raise ValueError("graded targets need at least two columns (batch size 1)")
    scores = scores.detach()
    if not bool(((scores >= 0) & (scores <= 1)).all()):
        raise ValueError(
            "cwcl needs graded scores in [0, 1]; set the dataset's score_max (STS files: 5) so scores are divided by it"
        )
    rest = ((1.0 - scores) / (num_columns - 1)).unsqueeze(1)
    targets = rest.expand(scores.size(0), num_columns).clone()
    rows = torch.arange(scores.size(0), device=scores.device)
    targets[rows, offset + rows] = scores.to(targets.dtype)
    return targets


def soft_target_info_nce(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    logit_scale: Tensor,
    targets: Tensor,
    *,
    symmetric: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """Cross-entropy of the contrastive softmax against soft targets (CWCL).

    Reference: Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted
    Contrastive Loss", eq. (3); one-hot ``targets`` give CLIP's InfoNCE exactly
    (:func:`~trainer.losses.symmetric_info_nce`)::

        L_a2c(i) = -sum_j T_ij log softmax_j(scale * s(a_i, c_j))   c = [all positives, all hard negatives]
        L_p2a(i) = -sum_j T_ij log softmax_j(scale * s(p_i, a_j))   over all anchors
        loss = mean_i (L_a2c(i) + L_p2a(i)) / 2

    ``targets`` is ``[B, world_size * B]`` over the positive columns (rows sum to 1): how much this
    rank's anchor ``i`` and positive ``j`` belong together. Both builders here describe a relation
    that reads the same from either side, so the positive->anchor direction uses the same matrix.
    Explicit hard negatives are labelled negatives: target 0. Distributed semantics as in
    :func:`~trainer.losses.symmetric_info_nce`.
    """
    anchors, positives, *negatives = _normalise([anchors, positives, *negatives])
    columns = _resolve_columns(anchors, positives, negatives, rank, world_size, gathered, need_anchors=symmetric)
    if targets.shape != (anchors.size(0), columns.positives.size(0)):
        raise ValueError(
            f"targets must be [B, world_size * B] = {[anchors.size(0), columns.positives.size(0)]}, "
            f"got {list(targets.shape)}"
        )
    targets = targets.to(anchors.dtype)
    a2c_logits = logit_scale * anchors @ _candidates(columns).T
    padded = F.pad(targets, (0, a2c_logits.size(1) - targets.size(1)))  # hard negatives: target 0
    loss = -(padded * F.log_softmax(a2c_logits, dim=1)).sum(dim=1)
    if symmetric:
        assert columns.anchors is not None  # resolved with need_anchors=symmetric
        p2a_logits = logit_scale * positives @ columns.anchors.T
        loss = (loss - (targets * F.log_softmax(p2a_logits, dim=1)).sum(dim=1)) / 2
    return loss.mean()


class ContinuouslyWeightedLoss(_LearnableScale, _ContrastiveLoss):
    """CWCL with a learnable temperature: soft targets from graded labels or from a reference view.

    Reference: Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted
    Contrastive Loss". See :func:`soft_target_info_nce`.

    * Graded data (``labels`` = the scores, in ``[0, 1]``): :func:`graded_targets`.
    * Pairs (no labels): :func:`similarity_targets` of the ``reference`` column's embeddings,
      detached. CWCL's setting is a frozen tower (``freeze: [text]``, LiT): then that column's
      embeddings are the pretrained view the paper uses. Without a frozen tower they are the
      current model's own view of the reference column, which moves as it trains.

    The paper's similarity targets are soft: ``(1 + cos) / 2`` gives an unrelated pair (cosine
    ~0) half the weight of the row's own pair, so with a batch of 32 the own column's target is
    only ~6%, and the loss pulls an already good model's positives *down* towards its negatives
    (measured on STS-B with MiniLM as its own reference: Spearman 86.7 -> 82.0 in 30 steps). That
    suits CWCL's setting, a tower trained into a frozen one's space; for fine-tuning a good model
    set ``target_temperature`` (0.05 there: 86.9, level with InfoNCE): targets ``softmax(cos / t)``.
    """

    _no_weight_decay = ("log_logit_scale",)

    def __init__(
        self,
        model: nn.Module,
        reference: Literal["anchor", "positive"] = "positive",
        target_temperature: float | None = None,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        if reference not in ("anchor", "positive"):
            raise ValueError(f"reference must be 'anchor' or 'positive', got {reference!r}")
        if target_temperature is not None and target_temperature <= 0:
            raise ValueError(f"target_temperature must be > 0, got {target_temperature}")
        self.reference = reference
        self.target_temperature = target_temperature
        self._init_scale(init_temperature, learnable_temperature, max_logit_scale, symmetric)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        anchors, positives, negatives = _split_columns(embeddings)
        self._clamp_log_scale_()
        rank, world_size = self._rank_world()
        batch_size = anchors.size(0)
        if labels is not None:
            targets = graded_targets(labels.view(-1).to(anchors.dtype), world_size * batch_size, rank * batch_size)
        else:
            reference = (anchors if self.reference == "anchor" else positives).detach()
            targets = similarity_targets(reference, gather_with_grad(reference, world_size), self.target_temperature)
        return soft_target_info_nce(
            anchors,
            positives,
            negatives,
            self.logit_scale,
            targets,
            symmetric=self.symmetric,
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "target_temperature": self.target_temperature,
            **self._scale_config(),
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{srinivasa2023cwcl,
    title={CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss},
    author={Rakshith Sharma Srinivasa and Jaejin Cho and Chouchang Yang and Yashas Malur Saidutta and others},
    booktitle={NeurIPS},
    year={2023},
    eprint={2309.14580},
    archivePrefix={arXiv},
}
"""
