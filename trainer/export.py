"""Export a trained model: save it (loads with plain `SentenceTransformer(path)`), write the
model card section with before/after metrics, register it as a new version with its
manifest, and move aliases (promotion only when the named metric improved)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encoders.encoder import describe
from encoders.provenance import code_version, library_versions
from registry.manifest import Lineage, Manifest
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


def decide_promotion(config: TrainConfig, before: dict[str, float], after: dict[str, float]) -> Promotion | None:
    """Promote only when the named metric improved by more than `min_improvement` over the
    base model's value measured on the same evaluation set in this run."""
    spec = config.output.promote
    if spec is None:
        return None
    old, new = before.get(spec.metric), after.get(spec.metric)
    if old is None or new is None:
        known = ", ".join(sorted(after)) or "none"
        return Promotion(spec.alias, spec.metric, old, new, False, f"metric not measured (measured: {known})")
    improved = new - old > spec.min_improvement
    verdict = "improved" if improved else "did not improve"
    return Promotion(
        spec.alias,
        spec.metric,
        old,
        new,
        improved,
        f"{spec.metric} {verdict}: {old:.4f} -> {new:.4f} (needs > +{spec.min_improvement})",
    )


def write_card(model_dir: Path, config: TrainConfig, table: str, base_model: str) -> None:
    """Append Duet's training summary to the model card sentence-transformers wrote."""
    card = model_dir / "README.md"
    existing = card.read_text() if card.exists() else f"# {config.output.name}\n"
    card.write_text(
        existing.rstrip()
        + f"\n\n## Duet fine-tuning\n\nBase model: `{base_model}`. Loss: `{config.loss.name}`, batch size "
        f"{config.batch_size}, learning rate {config.learning_rate}, seed {config.seed}.\n\n"
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
) -> tuple[ModelVersionInfo, Promotion | None]:
    architecture = base_manifest.lineage.architecture if base_manifest else {}
    manifest = Manifest(
        contract=describe(model, config.loss.matryoshka_dims),
        trained=True,
        description=config.output.description or f"{config.output.name}: fine-tuned from {base_model}",
        lineage=Lineage(
            base_model=base_model,
            dataset_hashes=dataset_hashes,
            hyperparameters=config.model_dump(mode="json"),
            code_version=code_version(),
            library_versions=library_versions(),
            architecture=architecture,
        ),
        metrics={**after, **{f"baseline/{k}": v for k, v in before.items()}},
    )
    info = registry.register(
        config.output.name, model_dir, manifest, aliases=tuple(config.output.aliases), run_id=run_id
    )
    promotion = decide_promotion(config, before, after)
    if promotion is not None:
        logger.info("promotion of %s@%s: %s", info.name, promotion.alias, promotion.reason)
        if promotion.promoted:
            registry.set_alias(info.name, promotion.alias, info.version)
            info = registry.get_version(info.name, info.version)
    return info, promotion
