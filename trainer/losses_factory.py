"""Turn the config's `LossSpec` into a loss module (ours, or sentence-transformers' CoSENT for
graded pairs), wrapped in Matryoshka when prefix dimensions are asked for."""

from __future__ import annotations

from typing import Any, TypedDict

from torch import nn

from trainer.config import LossSpec
from trainer.losses import (
    CachedSymmetricInfoNCELoss,
    DebiasedContrastiveLoss,
    SigmoidLoss,
    SymmetricInfoNCELoss,
    _ContrastiveLoss,
    matryoshka,
)


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
    loss: _ContrastiveLoss
    if spec.name == "infonce":
        common = _InfoNCEOptions(
            init_temperature=spec.temperature,
            learnable_temperature=spec.learnable_temperature,
            max_logit_scale=spec.max_logit_scale,
            symmetric=spec.symmetric,
            gather_across_devices=spec.gather_across_devices,
        )
        loss = (
            CachedSymmetricInfoNCELoss(model, mini_batch_size=spec.mini_batch_size, **common)
            if spec.cached
            else SymmetricInfoNCELoss(model, **common)
        )
    elif spec.name == "sigmoid":
        loss = SigmoidLoss(
            model,
            init_temperature=spec.temperature,
            init_bias=spec.sigmoid_bias,
            learnable=spec.learnable_temperature,
            max_logit_scale=spec.max_logit_scale,
            gather_across_devices=spec.gather_across_devices,
        )
    else:
        loss = DebiasedContrastiveLoss(
            model,
            tau_plus=spec.tau_plus,
            temperature=spec.temperature,
            gather_across_devices=spec.gather_across_devices,
        )
    return matryoshka(loss, spec.matryoshka_dims) if spec.matryoshka_dims else loss
