"""Duet's contrastive losses, one module per family, maths in functions of embeddings alone.

``core`` holds the shared conventions (columns, distributed negatives, learnable temperature) and
the priority-A losses (symmetric InfoNCE, its GradCache variant, SigLIP, debiased); the other
modules build on it. Everything public is re-exported here, so ``from trainer.losses import X``
is the one import path callers use.
"""

from __future__ import annotations

from trainer.losses.core import (
    CachedSymmetricInfoNCELoss,
    DebiasedContrastiveLoss,
    Gathered,
    SigmoidLoss,
    SymmetricInfoNCELoss,
    _ContrastiveLoss,
    debiased_contrastive,
    gather_with_grad,
    matryoshka,
    no_weight_decay_parameter_names,
    sigmoid_pairwise_loss,
    symmetric_info_nce,
)

__all__ = [
    "CachedSymmetricInfoNCELoss",
    "DebiasedContrastiveLoss",
    "Gathered",
    "SigmoidLoss",
    "SymmetricInfoNCELoss",
    "_ContrastiveLoss",
    "debiased_contrastive",
    "gather_with_grad",
    "matryoshka",
    "no_weight_decay_parameter_names",
    "sigmoid_pairwise_loss",
    "symmetric_info_nce",
]
