"""Turn the config's `LossSpec` into a loss module (ours, or sentence-transformers' CoSENT for
graded pairs), wrapped in Matryoshka when prefix dimensions are asked for."""

from __future__ import annotations

from typing import Any, TypedDict

from torch import nn

from trainer.config import LossSpec
from trainer.losses import (
    CachedMomentumQueueLoss,
    CachedSymmetricInfoNCELoss,
    ContinuouslyWeightedLoss,
    DebiasedContrastiveLoss,
    HardNegativeNCELoss,
    MomentumQueueLoss,
    MultiPositiveInfoNCELoss,
    SigmoidLoss,
    SymmetricInfoNCELoss,
    _ContrastiveLoss,
    matryoshka,
)


class _QueueOptions(TypedDict):
    queue_size: int
    momentum: float
    false_negative_threshold: float | None
    hardest: int | None


class _InfoNCEOptions(TypedDict):
    init_temperature: float
    learnable_temperature: bool
    max_logit_scale: float
    symmetric: bool
    gather_across_devices: bool


def build_loss(spec: LossSpec, model: Any) -> nn.Module:
    if spec.name in ("cosent", "cosine"):
        from sentence_transformers.sentence_transformer.losses import CoSENTLoss, CosineSimilarityLoss, MatryoshkaLoss

        # CoSENT (Su 2022) ranks pair similarities by their gold scores; "cosine" regresses the
        # cosine onto the gold score (Reimers & Gurevych 2019), which keeps the scale calibrated.
        graded = CoSENTLoss(model) if spec.name == "cosent" else CosineSimilarityLoss(model)
        return MatryoshkaLoss(model, graded, spec.matryoshka_dims) if spec.matryoshka_dims else graded
    loss = _contrastive_loss(spec, model)
    return matryoshka(loss, spec.matryoshka_dims) if spec.matryoshka_dims else loss


def _contrastive_loss(spec: LossSpec, model: Any) -> _ContrastiveLoss:
    common = _InfoNCEOptions(
        init_temperature=spec.temperature,
        learnable_temperature=spec.learnable_temperature,
        max_logit_scale=spec.max_logit_scale,
        symmetric=spec.symmetric,
        gather_across_devices=spec.gather_across_devices,
    )
    if spec.name == "infonce":
        if spec.cached:
            return CachedSymmetricInfoNCELoss(model, mini_batch_size=spec.mini_batch_size, **common)
        return SymmetricInfoNCELoss(model, **common)
    if spec.name == "hn_nce":
        return HardNegativeNCELoss(model, beta=spec.beta, **common)
    if spec.name == "cwcl":
        return ContinuouslyWeightedLoss(
            model, reference=spec.cwcl_reference, target_temperature=spec.cwcl_target_temperature, **common
        )
    if spec.name == "multi_positive":
        return MultiPositiveInfoNCELoss(model, **common)
    if spec.name == "moco":
        queue = _QueueOptions(
            queue_size=spec.queue_size,
            momentum=spec.momentum,
            false_negative_threshold=spec.false_negative_threshold,
            hardest=spec.hardest_negatives,
        )
        if spec.cached:
            return CachedMomentumQueueLoss(model, mini_batch_size=spec.mini_batch_size, **queue, **common)
        return MomentumQueueLoss(model, **queue, **common)
    if spec.name == "sigmoid":
        return SigmoidLoss(
            model,
            init_temperature=spec.temperature,
            init_bias=spec.sigmoid_bias,
            learnable=spec.learnable_temperature,
            max_logit_scale=spec.max_logit_scale,
            gather_across_devices=spec.gather_across_devices,
        )
    return DebiasedContrastiveLoss(
        model,
        tau_plus=spec.tau_plus,
        temperature=spec.temperature,
        gather_across_devices=spec.gather_across_devices,
    )
