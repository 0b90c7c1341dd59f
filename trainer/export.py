"""Export a trained model: save it (loads with plain `SentenceTransformer(path)`), write the
model card section with before/after metrics, register it as a new version with its
manifest, and move aliases (promotion only when the named metric improved)."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.encoder import describe
from encoders.provenance import code_version, library_versions
from registry.errors import IncompatibleVersionError, ManifestError
from registry.manifest import Compatibility, Interpolation, Lineage, Manifest
from registry.store import ModelRegistry, ModelVersionInfo
from trainer.config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Promotion:
    alias: str
    metric: str
    before: float | None
    after: float | None
    promoted: bool
    reason: str


def decide_promotion(
    config: TrainConfig,
    before: dict[str, float],
    after: dict[str, float],
    current: dict[str, float] | None = None,
) -> Promotion | None:
    """Promote only when the named metric beats the reference (the base model, or the version
    holding the alias now, measured in this run on the same evaluation sets) by more than
    `min_improvement`, and reaches `min_value` when one is set."""
    spec = config.output.promote
    if spec is None:
        return None
    new = after.get(spec.metric)
    reference_name = {"base": "base model", "current": "current holder", "none": "threshold"}[spec.compare_to]
    reference = {"base": before, "current": current or {}, "none": {}}[spec.compare_to].get(spec.metric)
    if new is None:
        known = ", ".join(sorted(after)) or "none"
        return Promotion(spec.alias, spec.metric, reference, new, False, f"metric not measured (measured: {known})")
    if spec.compare_to == "base" and reference is None:
        return Promotion(spec.alias, spec.metric, None, new, False, f"{spec.metric} was not measured on the base model")
    reasons = []
    promoted = True
    if spec.min_value is not None:
        reached = new >= spec.min_value
        promoted &= reached
        reasons.append(f"{spec.metric} {new:.4f} {'reaches' if reached else 'is below'} min_value {spec.min_value}")
    if reference is not None:
        improved = new - reference > spec.min_improvement
        promoted &= improved
        verdict = "improved" if improved else "did not improve"
        reasons.append(
            f"{spec.metric} {verdict} over the {reference_name}: {reference:.4f} -> {new:.4f} "
            f"(needs > +{spec.min_improvement})"
        )
    elif spec.compare_to == "current":
        reasons.append(f"no version holds {config.output.name}@{spec.alias} yet")
    return Promotion(spec.alias, spec.metric, reference, new, promoted, "; ".join(reasons))


def write_card(
    model_dir: Path, config: TrainConfig, table: str, base_model: str, *, learning_rate: float | None = None
) -> None:
    """Append Duet's training summary to the model card sentence-transformers wrote. `learning_rate`:
    the one trained with, when the config says "auto"."""
    card = model_dir / "README.md"
    existing = card.read_text() if card.exists() else f"# {config.output.name}\n"
    rate = learning_rate if learning_rate is not None else config.learning_rate
    card.write_text(
        existing.rstrip()
        + f"\n\n## Duet fine-tuning\n\nBase model: `{base_model}`. Loss: `{config.loss.name}`, batch size "
        f"{config.batch_size}, learning rate {rate:g}"
        f"{' (auto)' if config.learning_rate == 'auto' else ''}, seed {config.seed}.\n\n"
        f"### Evaluation before and after\n\n{table}\n"
    )


def register(
    registry: ModelRegistry,
    model: Any,
    model_dir: Path,
    config: TrainConfig,
    *,
    base_model: str,
    base_manifest: Manifest | None,
    dataset_hashes: dict[str, str],
    before: dict[str, float],
    after: dict[str, float],
    run_id: str | None,
    current: dict[str, float] | None = None,
    compatible_with: list[Compatibility] | None = None,
    resolved: dict[str, Any] | None = None,
    interpolation: Interpolation | None = None,
) -> tuple[ModelVersionInfo, Promotion | None]:
    architecture = base_manifest.lineage.architecture if base_manifest else {}
    manifest = Manifest(
        contract=describe(model, config.loss.matryoshka_dims),
        trained=True,
        description=config.output.description or f"{config.output.name}: fine-tuned from {base_model}",
        lineage=Lineage(
            base_model=base_model,
            dataset_hashes=dataset_hashes,
            hyperparameters={**config.model_dump(mode="json"), **({"resolved": resolved} if resolved else {})},
            code_version=code_version(),
            library_versions=library_versions(),
            architecture=architecture,
        ),
        metrics={**after, **{f"baseline/{k}": v for k, v in before.items()}},
        compatible_with=compatible_with or [],
        interpolation=interpolation,
    )
    info = registry.register(
        config.output.name, model_dir, manifest, aliases=tuple(config.output.aliases), run_id=run_id
    )
    promotion = decide_promotion(config, before, after, current)
    if promotion is not None:
        logger.info("promotion of %s@%s: %s", info.name, promotion.alias, promotion.reason)
        if promotion.promoted:
            spec = config.output.promote
            promotion = move_alias(
                registry, info, promotion, require_compatible=spec is not None and spec.require_compatible
            )
            info = registry.get_version(info.name, info.version)
    return info, promotion


def move_alias(
    registry: ModelRegistry, info: ModelVersionInfo, promotion: Promotion, require_compatible: bool = False
) -> Promotion:
    """Move the alias the rule promoted `info` to. `require_compatible` (`promote.require_compatible`): a version
    not registered compatible with the alias's holder is not promoted, and the promotion says why."""
    try:
        registry.set_alias(info.name, promotion.alias, info.version, require_compatible=require_compatible)
    except (IncompatibleVersionError, ManifestError) as exc:  # ManifestError: the holder's claim cannot be checked
        logger.info("promotion of %s@%s refused: %s", info.name, promotion.alias, exc)
        return dataclasses.replace(promotion, promoted=False, reason=f"{promotion.reason}; refused: {exc}")
    return promotion
