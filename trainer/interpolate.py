"""WiSE-FT weight interpolation (Wortsman et al. 2022): the blend step only.

theta(alpha) = (1 - alpha) * theta_base + alpha * theta_finetuned keeps most of the
fine-tuning gain while giving back general skill. Only floating-point tensors whose
names and shapes match are blended; anything else (a new projection head, integer
buffers) is taken from the fine-tuned model and named, so the caller can report it.
The run's `interpolate` stage (trainer/run.py) uses the rest: which metric is the target and
which are retained (:func:`target_metric`, :func:`main_metric`), the sweep over alphas with its
choice (:func:`sweep`), and the table of the model card (:func:`format_sweep`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from registry.manifest import AlphaScore, Interpolation
from trainer.config import InterpolateSpec
from trainer.evaluation import EvalSet

logger = logging.getLogger(__name__)


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


def metric_keys(eval_set: EvalSet) -> list[str]:
    """The keys of `eval_set`'s metrics where higher is better (what a target may be), main one first."""
    name = eval_set.name
    if eval_set.kind == "graded":
        return [f"{name}/spearman", f"{name}/pearson"]
    a, b = eval_set.a_modality, eval_set.b_modality
    pa, pb = (a, b) if a != b else ("a", "b")
    metrics = ["mrr@10", "ndcg@10", "recall@1", "recall@5", "recall@10"]
    return [f"{name}/{x}_to_{y}/{m}" for x, y in ((pa, pb), (pb, pa)) for m in metrics]


def main_metric(eval_set: EvalSet) -> str:
    """A set's main metric: Spearman (x100) for graded pairs, a -> b MRR@10 (0..1) for pairs."""
    return metric_keys(eval_set)[0]


def default_metric(promote_metric: str | None, measured: Iterable[str], eval_sets: list[EvalSet]) -> str:
    """The metric a run optimises when none is named: the promotion metric when the evaluation sets measure
    it, else the first set's main metric. Picking the best checkpoint and the WiSE-FT target both use it."""
    return promote_metric if promote_metric in set(measured) else main_metric(eval_sets[0])


def target_metric(spec: InterpolateSpec, promote_metric: str | None, eval_sets: list[EvalSet]) -> str | None:
    """The configured target, else the promotion metric when an eval set has it, else the first
    eval set's main metric (None without eval sets). A ValueError names the keys there are."""
    keys = [k for s in eval_sets for k in metric_keys(s)]
    if spec.metric is not None:
        if spec.metric not in keys:
            raise ValueError(f"interpolate.metric {spec.metric!r} is not measured; use one of: {', '.join(keys)}")
        return spec.metric
    return default_metric(promote_metric, keys, eval_sets) if eval_sets else None


Measure = Callable[[float], AlphaScore]


def sweep(spec: InterpolateSpec, measure: Measure, *, metric: str | None, can_measure: bool) -> Interpolation:
    """Score the base (alpha 0) and every alpha to try with `measure(alpha)`, then pick one: the
    fixed alpha, or :func:`choose_alpha` over the trials. Nothing is measured when `can_measure`
    is false (a fixed alpha and no sets to score)."""
    auto = spec.alpha == "auto"
    alphas = sorted(spec.alphas) if auto else [float(spec.alpha)]
    if not can_measure:
        return Interpolation(alpha=alphas[0], mode="fixed", metric=metric)
    scores: dict[float, AlphaScore] = {0.0: measure(0.0)}
    for alpha in alphas:
        if alpha not in scores:
            scores[alpha] = measure(alpha)
    base = scores[0.0]
    trials = [scores[a] for a in alphas]
    if not auto:
        return Interpolation(alpha=alphas[0], mode="fixed", metric=metric, base=base, trials=trials)
    chosen, qualified = choose_alpha(
        [AlphaTrial(t.alpha, t.target if t.target is not None else float("-inf"), t.retain) for t in trials],
        base.retain,
        spec.max_retention_drop,
    )
    return Interpolation(
        alpha=chosen,
        mode="auto",
        metric=metric,
        max_retention_drop=spec.max_retention_drop,
        qualified=qualified,
        base=base,
        trials=trials,
    )


def verdict(record: Interpolation) -> str:
    """One sentence on the alpha that was saved, with a warning when that is the base model."""
    if not record.qualified:
        return (
            f"**Warning:** no alpha kept every retain metric within {record.max_retention_drop:g} of the base model, "
            "so the saved weights are the base model's (alpha 0): the fine-tuning was given up."
        )
    if record.mode == "auto" and record.alpha == 0.0:
        return (
            "**Warning:** alpha 0 won (no fine-tuned blend raised the target within the retention margin), so the "
            "saved weights are the base model's."
        )
    how = "chosen" if record.mode == "auto" else "fixed"
    blend = f"{1 - record.alpha:g} x base + {record.alpha:g} x fine-tuned"
    return f"Saved weights: alpha {record.alpha:g} ({how}): {blend}."


def format_sweep(record: Interpolation, digits: int = 4) -> str:
    """The model card's WiSE-FT section: one row per alpha (target and retain metrics with their
    change against the base model), the saved one marked."""

    def cell(value: float | None, base: float | None) -> str:
        if value is None:
            return "n/a"
        delta = f" ({value - base:+.{digits}f})" if base is not None else ""
        return f"{value:.{digits}f}{delta}"

    retain = list(record.base.retain) if record.base else []
    rule = f", max retention drop {record.max_retention_drop:g}" if record.mode == "auto" else ""
    lines = [f"#### Weight interpolation (WiSE-FT, alpha {record.mode}{rule})", ""]
    if record.base is None:
        return "\n".join([*lines, verdict(record), "(no evaluation or retain sets: nothing measured)"])
    header = ["alpha", f"target {record.metric or 'n/a'}", *(f"retain {k}" for k in retain), "saved"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---:|" * (len(header) - 1) + "---|"]
    base_row = record.base if record.base.alpha not in {t.alpha for t in record.trials} else None
    for score in ([base_row] if base_row else []) + record.trials:
        row = [
            f"{score.alpha:g}" + (" (base)" if score.alpha == 0.0 else ""),
            cell(score.target, record.base.target),
            *(cell(score.retain.get(k), record.base.retain[k]) for k in retain),
            "**yes**" if score.alpha == record.alpha else "",
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Deltas in parentheses are against the base model (alpha 0).", verdict(record)]
    if record.kept_from_finetuned:
        kept = ", ".join(record.kept_from_finetuned[:10]) + (" ..." if len(record.kept_from_finetuned) > 10 else "")
        lines.append(f"Not blended (no matching float tensor in the base; taken as fine-tuned): {kept}.")
    return "\n".join(lines)
