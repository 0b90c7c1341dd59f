"""Several positives per anchor in one objective (several captions per image).

Why this form (SupCon's ``L_out`` / UniCL, not the "sum the positives inside the log" ``L_in``):
every positive of an anchor gets its own log-likelihood term, averaged, against one softmax over
all candidates. Khosla et al. found ``L_out`` clearly better (``L_in``'s gradient lets one easy
positive carry the others), UniCL uses exactly this form for image-text-label data, and it is a
cross-entropy against the uniform target over the anchor's positives, so with one positive per
anchor it is InfoNCE itself, which the tests check.

Rows carry up to ``K`` positives in columns ``positive_1..positive_K``; a row with fewer fills the
rest with copies (the data loader does) and says how many are real in its label (the dataset's
``score`` column). Padding copies are dropped from the softmax and the targets, so a row's number
of positives changes nothing but its own average.
"""

from __future__ import annotations

from typing import Any

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
    gather_with_grad,
)


def _check_counts(counts: Tensor, num_positive_columns: int) -> Tensor:
    counts = counts.detach().view(-1).round().long()
    if bool(((counts < 1) | (counts > num_positive_columns)).any()):
        raise ValueError(f"each row needs between 1 and {num_positive_columns} positives (its count label)")
    return counts


def multi_positive_info_nce(
    anchors: Tensor,
    positives: list[Tensor],
    logit_scale: Tensor,
    *,
    counts: Tensor | None = None,
    symmetric: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
    gathered_counts: Tensor | None = None,
) -> Tensor:
    """Multi-positive InfoNCE, SupCon ``L_out`` / UniCL form, both directions.

    References: Khosla et al. 2020, "Supervised Contrastive Learning", eq. (2) (``L_out``); Yang
    et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space" (UniCL), eq. (3)-(4);
    the poly-view setting of Shidani et al. 2024, "Poly-View Contrastive Learning". With ``P(i)``
    the real positives of anchor ``i`` (``counts[i]`` of the ``K`` columns) and ``C`` every real
    positive of the batch::

        L_a2c(i) = -1/|P(i)| sum_{p in P(i)} log softmax_{c in C}(scale * s(a_i, c))[p]
        L_p2a(i) =  1/|P(i)| sum_{p in P(i)} -log softmax_j(scale * s(p, a_j))[i]   over all anchors
        loss = mean_i (L_a2c(i) + L_p2a(i)) / 2          (symmetric=False: mean_i L_a2c(i))

    Each anchor weighs the same whatever its number of positives, which also keeps the
    distributed semantics of :func:`~trainer.losses.symmetric_info_nce` exact (the mean over
    ranks is the union-batch loss). ``gathered``: ``Gathered(all anchors, positive column 1,
    [columns 2..K])`` from every rank; ``gathered_counts`` the matching counts (required with it).
    """
    num_columns = len(positives)
    if num_columns < 1:
        raise ValueError("expected (anchor, positive_1, ..., positive_K) columns, got no positive column")
    batch_size = anchors.size(0)
    local_counts = (
        _check_counts(counts, num_columns)
        if counts is not None
        else torch.full((batch_size,), num_columns, device=anchors.device)
    )
    anchors, *positives = _normalise([anchors, *positives])
    columns = _resolve_columns(anchors, positives[0], positives[1:], rank, world_size, gathered, need_anchors=symmetric)
    if gathered is None:
        all_counts = gather_with_grad(local_counts.to(anchors.dtype), world_size)
    elif gathered_counts is None:
        raise ValueError("gathered_counts is required with gathered")
    else:
        all_counts = gathered_counts
    all_counts = _check_counts(all_counts, num_columns).to(anchors.device)
    total = all_counts.size(0)
    slots = torch.arange(num_columns, device=anchors.device)
    valid = (slots.unsqueeze(1) < all_counts.unsqueeze(0)).reshape(-1)  # [K * total], column-major
    logits = (logit_scale * anchors @ _candidates(columns).T).masked_fill(~valid, float("-inf"))
    own = rank * batch_size + torch.arange(batch_size, device=anchors.device)
    own_columns = slots.unsqueeze(0) * total + own.unsqueeze(1)  # [B, K]
    own_valid = slots.unsqueeze(0) < local_counts.unsqueeze(1)  # [B, K]
    log_probs = F.log_softmax(logits, dim=1).gather(1, own_columns)
    loss = -(log_probs.masked_fill(~own_valid, 0.0)).sum(dim=1) / local_counts
    if symmetric:
        assert columns.anchors is not None  # resolved with need_anchors=symmetric
        per_slot = torch.stack(
            [F.cross_entropy(logit_scale * p @ columns.anchors.T, own, reduction="none") for p in positives], dim=1
        )
        loss = (loss + per_slot.masked_fill(~own_valid, 0.0).sum(dim=1) / local_counts) / 2
    return loss.mean()


class MultiPositiveInfoNCELoss(_LearnableScale, _ContrastiveLoss):
    """Several positives per anchor (SupCon ``L_out`` / UniCL), learnable temperature.

    Inputs: ``(anchor, positive_1, ..., positive_K)`` columns and, as labels, the number of real
    positives per row (the data loader's ``score`` column for ``multi_positive`` datasets; without
    labels every column is real). See :func:`multi_positive_info_nce`.
    """

    _no_weight_decay = ("log_logit_scale",)

    def __init__(
        self,
        model: nn.Module,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        self._init_scale(init_temperature, learnable_temperature, max_logit_scale, symmetric)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"expected (anchor, positive_1, ...) columns, got {len(embeddings)} column(s)")
        self._clamp_log_scale_()
        rank, world_size = self._rank_world()
        return multi_positive_info_nce(
            embeddings[0],
            list(embeddings[1:]),
            self.logit_scale,
            counts=labels,
            symmetric=self.symmetric,
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return self._scale_config()

    @property
    def citation(self) -> str:
        return """
@inproceedings{khosla2020supcon,
    title={Supervised Contrastive Learning},
    author={Prannay Khosla and Piotr Teterwak and Chen Wang and Aaron Sarna and others},
    booktitle={NeurIPS},
    year={2020},
    eprint={2004.11362},
    archivePrefix={arXiv},
}
@inproceedings{yang2022unicl,
    title={Unified Contrastive Learning in Image-Text-Label Space},
    author={Jianwei Yang and Chunyuan Li and Pengchuan Zhang and Bin Xiao and others},
    booktitle={CVPR},
    year={2022},
    eprint={2204.03610},
    archivePrefix={arXiv},
}
"""
