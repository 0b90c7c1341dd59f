"""The manifest stored with every model version: contract, lineage, metrics.

It is written into the version's artifact folder (`duet_manifest.json`), so the artifact
alone is enough to rebuild and judge the model, and its key fields are mirrored into MLflow
tags so listings do not need to read files.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field

from encoders.contract import VectorContract

MANIFEST_FILE = "duet_manifest.json"
VARIANT_FILE = "duet_variant.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _FolderRecord(BaseModel):
    """A record kept as one JSON file (`FILE`) inside the folder it describes."""

    FILE: ClassVar[str]

    def write(self, folder: Path) -> Path:
        path = folder / self.FILE
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> Self:
        return cls.model_validate_json((folder / cls.FILE).read_text())


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


class Compatibility(BaseModel):
    """This version was trained so that its queries search vectors another version embedded
    (backward-compatible training, BCT): a collection pinned to `ref` may be queried with it, no
    re-embed needed. Kept in the manifest because the claim is about these weights and only holds
    against exactly that version's weights (`weights_sha256`)."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(description="The exact version whose vectors it can search, e.g. 'shapes/1'.")
    weights_sha256: str | None = Field(default=None, description="That version's weights hash at training time.")
    map_file: str | None = Field(
        default=None,
        description="A learned linear map new -> old (float32 .npy of shape [new dim, old dim], relative to the "
        "artifact folder) applied to this version's query vectors before they meet the old gallery; None: they are "
        "used as they are.",
    )
    metrics: dict[str, float] = Field(
        default_factory=dict,
        description="Cross-model retrieval measured by the run: '<set>/new-old/<metric>' beside '<set>/old-old/...' "
        "and '<set>/new-new/...'.",
    )


class AlphaScore(BaseModel):
    """One alpha's scores in a WiSE-FT sweep: the target metric and each retain set's main metric."""

    model_config = ConfigDict(extra="forbid")

    alpha: float
    target: float | None = Field(default=None, description="The target metric (None: no eval set measured it).")
    retain: dict[str, float] = Field(default_factory=dict, description="Retain metric key -> value.")


class Interpolation(BaseModel):
    """The saved weights are (1 - alpha) * base + alpha * fine-tuned (WiSE-FT), and why that alpha:
    every alpha tried with its scores, beside the base model's (alpha 0)."""

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(description="Weight of the fine-tuned model in the saved weights.")
    mode: Literal["fixed", "auto"]
    metric: str | None = Field(default=None, description="The target metric key.")
    max_retention_drop: float | None = Field(
        default=None, description="alpha auto: the allowed drop per retain metric."
    )
    qualified: bool = Field(
        default=True, description="False: no alpha kept the retain metrics within the margin, so alpha 0 (the base)."
    )
    base: AlphaScore | None = Field(default=None, description="The base model's scores (None: nothing to measure).")
    trials: list[AlphaScore] = Field(default_factory=list)
    kept_from_finetuned: list[str] = Field(
        default_factory=list, description="Tensors not blended (no float match in the base), as fine-tuned."
    )


class Manifest(_FolderRecord):
    """Everything Duet knows about one model version besides its weights."""

    model_config = ConfigDict(extra="forbid")

    contract: VectorContract
    trained: bool = Field(description="False for a model with freshly initialised parts (e.g. a new image tower).")
    description: str = ""
    lineage: Lineage = Field(default_factory=Lineage)
    metrics: dict[str, float] = Field(default_factory=dict)
    compatible_with: list[Compatibility] = Field(
        default_factory=list, description="Versions whose collections this version's queries may search."
    )
    interpolation: Interpolation | None = Field(
        default=None, description="WiSE-FT: the blend of base and fine-tuned weights that was saved (None: none)."
    )
    created_at: str = Field(default_factory=_now)

    FILE: ClassVar[str] = MANIFEST_FILE

    def compatibility(self, ref: str) -> Compatibility | None:
        """The record saying this version can query `ref`'s vectors, if there is one."""
        return next((c for c in self.compatible_with if c.ref == ref), None)


class FidelityReport(BaseModel):
    """The fidelity gate's numbers for one variant, against its version in torch fp32."""

    model_config = ConfigDict(extra="forbid")

    passed: bool
    reasons: list[str] = Field(default_factory=list, description="Why the gate refused it (empty when passed).")
    cosine_min: float = Field(description="Lowest cosine of a probe text's vector to its fp32 vector.")
    cosine_mean: float
    spearman_fp32: float = Field(description="STS Spearman x100 of the version in torch fp32.")
    spearman: float = Field(description="STS Spearman x100 of the variant.")
    spearman_drop: float = Field(description="spearman_fp32 - spearman, in points.")
    min_cosine: float = Field(description="The gate's threshold on cosine_min.")
    max_spearman_drop: float = Field(description="The gate's threshold on spearman_drop.")
    probe_texts: int
    pairs: int
    source: str = Field(description="The evaluation pairs the gate used.")


class VariantRecord(_FolderRecord):
    """An optimised variant of a version (backend + precision), kept beside it, never a version itself.

    Written into the variant's folder (`duet_variant.json`): what it was derived from (the version
    and its weights' hash), how (`export`), the hash of its own files, and the gate's verdict.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="'<backend>-<precision>', e.g. 'openvino-int8'.")
    backend: str
    precision: str
    source_ref: str = Field(description="The version it was derived from, e.g. 'minilm/1'.")
    source_weights_sha256: str | None
    files_sha256: str = Field(default="", description="Hash of the variant's files (set when saved).")
    export: dict[str, Any] = Field(default_factory=dict, description="How it was exported and quantised.")
    fidelity: FidelityReport
    library_versions: dict[str, str] = Field(default_factory=dict)
    created_at: str = Field(default_factory=_now)

    FILE: ClassVar[str] = VARIANT_FILE
