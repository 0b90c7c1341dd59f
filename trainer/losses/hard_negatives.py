"""Importance-weighted hard negatives inside the softmax (HN-NCE, as in DiHT).

Mining (``trainer/mining.py``) adds hard negatives as data; this loss instead up-weights the
hard negatives already in the batch, at no extra cost: each negative's term in the InfoNCE
denominator is multiplied by an importance weight that grows with its similarity to the anchor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from trainer.losses.core import (
    Gathered,
    _candidates,
    _ContrastiveLoss,
    _LearnableScale,
    _normalise,
    _resolve_columns,
    _split_columns,
)


def _weighted_nce_rows(logits: Tensor, own: Tensor, beta: float) -> Tensor:
    """Per-row HN-NCE of ``logits`` ``[R, M]`` whose positive sits at column ``own[r]``, shape ``[R]``.

    In log space: ``log w_rj = log N + beta * l_rj - logsumexp_k(beta * l_rk)`` over the ``N``
    negatives, so the weights average 1 and ``beta = 0`` gives every negative weight 1 (InfoNCE).
    """
    rows = torch.arange(logits.size(0), device=logits.device)
    positive = logits[rows, own]
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative[rows, own] = False
    num_negatives = logits.size(1) - 1
    if num_negatives < 1:
        raise ValueError("importance weighting needs at least one negative (batch size 1 without hard negatives)")
    negative = logits[is_negative].view(logits.size(0), num_negatives)
    log_weights = math.log(num_negatives) + beta * negative - torch.logsumexp(beta * negative, dim=1, keepdim=True)
    weighted = torch.logsumexp(log_weights + negative, dim=1)
    return torch.logaddexp(positive, weighted) - positive


def hard_negative_nce(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    logit_scale: Tensor,
    *,
    beta: float = 0.5,
    symmetric: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """InfoNCE whose negatives are re-weighted by ``exp(beta * logit)`` inside the denominator (HN-NCE).

    Reference: Radenovic et al. 2023, "Filtering, Distillation, and Hard Negatives for
    Vision-Language Pre-Training" (DiHT), section 3.3, after Robinson et al. 2021, "Contrastive
    Learning with Hard Negative Samples". With logits ``l_ij = scale * s(a_i, c_j)`` and the ``N``
    negatives ``j != i`` of row ``i``::

        w_ij   = N * exp(beta * l_ij) / sum_{k != i} exp(beta * l_ik)      (mean weight 1)
        loss_i = -log( e^{l_ii} / (e^{l_ii} + sum_{j != i} w_ij e^{l_ij}) )

    ``beta`` scales the *logits* (``beta * s / t``, as HN-NCE's weights are powers of
    ``exp(s / t)``); ``beta = 0`` is exactly :func:`~trainer.losses.symmetric_info_nce`. The weights
    are not detached (as in the reference), so the gradient also flows through them. Columns,
    directions (anchor -> positives and hard negatives; positive -> anchors) and the distributed
    semantics are those of :func:`~trainer.losses.symmetric_info_nce`.
    """
    if beta < 0 or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    anchors, positives, *negatives = _normalise([anchors, positives, *negatives])
    columns = _resolve_columns(anchors, positives, negatives, rank, world_size, gathered, need_anchors=symmetric)
    own = rank * anchors.size(0) + torch.arange(anchors.size(0), device=anchors.device)
    loss = _weighted_nce_rows(logit_scale * anchors @ _candidates(columns).T, own, beta)
    if symmetric:
        assert columns.anchors is not None  # resolved with need_anchors=symmetric
        loss = (loss + _weighted_nce_rows(logit_scale * positives @ columns.anchors.T, own, beta)) / 2
    return loss.mean()


class HardNegativeNCELoss(_LearnableScale, _ContrastiveLoss):
    """HN-NCE: InfoNCE with importance-weighted hard negatives and a learnable temperature (DiHT).

    Reference: Radenovic et al. 2023, "Filtering, Distillation, and Hard Negatives for
    Vision-Language Pre-Training". See :func:`hard_negative_nce`. Same inputs and temperature
    handling as :class:`~trainer.losses.SymmetricInfoNCELoss`; ``beta = 0`` is that loss.
    """

    _no_weight_decay = ("log_logit_scale",)

    def __init__(
        self,
        model: nn.Module,
        beta: float = 0.5,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        if beta < 0 or not math.isfinite(beta):
            raise ValueError(f"beta must be a finite number >= 0, got {beta}")
        self.beta = float(beta)
        self._init_scale(init_temperature, learnable_temperature, max_logit_scale, symmetric)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        anchors, positives, negatives = _split_columns(embeddings)
        self._clamp_log_scale_()
        rank, world_size = self._rank_world()
        return hard_negative_nce(
            anchors,
            positives,
            negatives,
            self.logit_scale,
            beta=self.beta,
            symmetric=self.symmetric,
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            **self._scale_config(),
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{radenovic2023diht,
    title={Filtering, Distillation, and Hard Negatives for Vision-Language Pre-Training},
    author={Filip Radenovic and Abhimanyu Dubey and Abhishek Kadian and Todor Mihaylov and others},
    booktitle={CVPR},
    year={2023},
    eprint={2301.02280},
    archivePrefix={arXiv},
}
"""
