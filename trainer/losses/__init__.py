"""Duet's contrastive losses, one module per family, maths in functions of embeddings alone.

``core`` holds the shared conventions (columns, distributed negatives, learnable temperature) and
the first losses (symmetric InfoNCE, its GradCache variant, SigLIP, debiased); the others build on
it: ``hard_negatives`` (HN-NCE importance weights), ``soft_targets`` (CWCL), ``multi_positive``
(several positives per anchor) and ``momentum`` (MoCo queue with a momentum encoder). Everything
public is re-exported here, so ``from trainer.losses import X`` is the one import path callers use.
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
from trainer.losses.hard_negatives import HardNegativeNCELoss, hard_negative_nce
from trainer.losses.momentum import (
    CachedMomentumQueueLoss,
    KeyQueue,
    MomentumEncoder,
    MomentumQueueLoss,
    momentum_queue_info_nce,
)
from trainer.losses.multi_positive import MultiPositiveInfoNCELoss, multi_positive_info_nce
from trainer.losses.soft_targets import (
    ContinuouslyWeightedLoss,
    graded_targets,
    similarity_targets,
    soft_target_info_nce,
)

__all__ = [
    "CachedMomentumQueueLoss",
    "CachedSymmetricInfoNCELoss",
    "ContinuouslyWeightedLoss",
    "DebiasedContrastiveLoss",
    "Gathered",
    "HardNegativeNCELoss",
    "KeyQueue",
    "MomentumEncoder",
    "MomentumQueueLoss",
    "MultiPositiveInfoNCELoss",
    "SigmoidLoss",
    "SymmetricInfoNCELoss",
    "_ContrastiveLoss",
    "debiased_contrastive",
    "gather_with_grad",
    "graded_targets",
    "hard_negative_nce",
    "matryoshka",
    "momentum_queue_info_nce",
    "multi_positive_info_nce",
    "no_weight_decay_parameter_names",
    "sigmoid_pairwise_loss",
    "similarity_targets",
    "soft_target_info_nce",
    "symmetric_info_nce",
]
