"""First start: register the offline default models so a fresh data directory serves at once.

Idempotent and guarded by a file lock, so several server processes starting together on
one data directory register each default exactly once.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from filelock import FileLock

from encoders.defaults import (
    DEFAULT_MODELS,
    DUAL_MODEL_NAME,
    TEXT_MODEL_NAME,
    TEXT_MODEL_SOURCE,
    bundled_minilm_path,
)
from encoders.provenance import code_version, library_versions
from registry.manifest import Lineage, Manifest
from registry.names import DEFAULT_ALIAS
from registry.store import ModelRegistry

logger = logging.getLogger(__name__)


def register_default_models(registry: ModelRegistry, lock_dir: Path) -> list[str]:
    """Register `minilm` and `minilm-dual` (alias `production`) if absent; returns what it added."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    added = []
    with FileLock(str(lock_dir / "bootstrap.lock"), timeout=600):
        for default in DEFAULT_MODELS:
            if registry.has_model(default.name):
                continue
            logger.info("registering default model %s", default.name)
            _register(registry, default.name, default.description, default.trained)
            added.append(default.name)
    return added


def _register(registry: ModelRegistry, name: str, description: str, trained: bool) -> None:
    from encoders.dual import ImageTowerConfig, build_dual_encoder
    from encoders.encoder import describe

    text_path = bundled_minilm_path()
    lineage = Lineage(
        base_model=TEXT_MODEL_SOURCE,
        code_version=code_version(),
        library_versions=library_versions(),
    )
    if name == TEXT_MODEL_NAME:
        from encoders.encoder import load_sentence_transformer

        contract = describe(load_sentence_transformer(text_path))
        manifest = Manifest(contract=contract, trained=trained, description=description, lineage=lineage)
        registry.register(name, text_path, manifest, aliases=(DEFAULT_ALIAS,))
        return
    if name == DUAL_MODEL_NAME:
        tower = ImageTowerConfig()
        model = build_dual_encoder(text_path, tower)
        lineage = lineage.model_copy(update={"architecture": {"image_tower": tower.as_dict()}})
        manifest = Manifest(contract=describe(model), trained=trained, description=description, lineage=lineage)
        with tempfile.TemporaryDirectory() as tmp:
            model.save(tmp)
            registry.register(name, Path(tmp), manifest, aliases=(DEFAULT_ALIAS,))
        return
    raise ValueError(f"unknown default model {name}")
