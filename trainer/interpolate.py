"""WiSE-FT weight interpolation (Wortsman et al. 2022): the blend step only.

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned keeps most of the
fine-tuning gain while giving back general skill. Only floating-point tensors whose
names and shapes match are blended; anything else (a new projection head, integer
buffers) is taken from the fine-tuned model and named, so the caller can report it.
Not yet wired into trainer/run.py (no config, no alpha search): see issue 14 part 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Blend:
    """The blended state dict plus the keys kept from the fine-tuned model as they were."""

    state: dict[str, torch.Tensor]
    kept_from_finetuned: list[str] = field(default_factory=list)


def blend_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], alpha: float) -> Blend:
    """Return (1 - alpha) * base + alpha * tuned over matching float tensors.

    One working copy is made; ``base`` and ``tuned`` are not modified. alpha must be
    in [0, 1] (a ValueError says so): extrapolation is not WiSE-FT.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"interpolation alpha must be in [0, 1], got {alpha}")
    out: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    for name, t in tuned.items():
        b = base.get(name)
        if b is None or b.shape != t.shape or not t.is_floating_point() or not b.is_floating_point():
            out[name] = t.clone()
            kept.append(name)
            continue
        out[name] = (
            torch.lerp(b.to(t.dtype), t, alpha)
            if 0.0 < alpha < 1.0
            else (b.to(t.dtype).clone() if alpha == 0.0 else t.clone())
        )
    return Blend(state=out, kept_from_finetuned=kept)


@dataclass
class AlphaTrial:
    """One alpha's scores: the target metric and each retain set's main metric."""

    alpha: float
    target: float
    retain: dict[str, float]


def choose_alpha(
    trials: list[AlphaTrial], base_retain: dict[str, float], max_retention_drop: float
) -> tuple[float, bool]:
    """Best target among alphas whose every retain metric drops <= max_retention_drop vs base.

    Returns (alpha, qualified). When no alpha qualifies, alpha 0 (the base weights) is
    returned with qualified False, so the caller can say the fine-tune was given up.
    """
    ok = [t for t in trials if all(base_retain[k] - v <= max_retention_drop for k, v in t.retain.items())]
    if not ok:
        return 0.0, False
    return max(ok, key=lambda t: (t.target, -t.alpha)).alpha, True
