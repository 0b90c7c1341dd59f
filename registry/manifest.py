"""The manifest stored with every model version: contract, lineage, metrics.

It is written into the version's artifact folder (`duet_manifest.json`), so the artifact
alone is enough to rebuild and judge the model, and its key fields are mirrored into MLflow
tags so listings do not need to read files.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from encoders.contract import VectorContract

MANIFEST_FILE = "duet_manifest.json"


class Lineage(BaseModel):
    """Where a version came from: enough to reproduce or audit it."""

    model_config = ConfigDict(extra="forbid")

    base_model: str | None = Field(default=None, description="Model reference or hub id it started from.")
    weights_sha256: str | None = Field(default=None, description="Hash of the artifact folder (set on register).")
    dataset_hashes: dict[str, str] = Field(default_factory=dict, description="Dataset file -> sha256.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    code_version: str | None = None
    library_versions: dict[str, str] = Field(default_factory=dict)
    architecture: dict[str, Any] = Field(default_factory=dict, description="Config to rebuild new parts.")


class Manifest(BaseModel):
    """Everything Duet knows about one model version besides its weights."""

    model_config = ConfigDict(extra="forbid")

    contract: VectorContract
    trained: bool = Field(description="False for a model with freshly initialised parts (e.g. a new image tower).")
    description: str = ""
    lineage: Lineage = Field(default_factory=Lineage)
    metrics: dict[str, float] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls.model_validate_json((folder / MANIFEST_FILE).read_text())
