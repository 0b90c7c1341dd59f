"""The vector contract: what every vector produced by one model version promises.

A new model is a new vector space. Collections, clients and the registry check this
contract (not the model's name) before mixing vectors, so it is recorded with every
registered version and derived from the loaded model rather than typed by hand.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Modality = Literal["text", "image"]
Similarity = Literal["cosine", "dot", "euclidean"]


class VectorContract(BaseModel):
    """Shape and meaning of a model's output vectors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dimension: int = Field(gt=0, description="Length of the full output vector.")
    normalized: bool = Field(description="Whether vectors leave the model with unit L2 norm.")
    similarity: Similarity = Field(description="The similarity the vectors are meant to be compared with.")
    modalities: tuple[Modality, ...] = Field(min_length=1, description="Input kinds the model embeds.")
    max_seq_length: int | None = Field(default=None, description="Token limit; longer text is truncated.")
    image_size: int | None = Field(default=None, description="Side in pixels images are resized to.")
    preprocessing: dict[str, str] = Field(
        default_factory=dict, description="Human-readable preprocessing per modality."
    )
    matryoshka_dims: tuple[int, ...] = Field(
        default=(),
        description="Prefix lengths the model was trained to serve; other truncations still work "
        "but lose more quality.",
    )

    def accepts(self, modality: Modality) -> bool:
        return modality in self.modalities

    def is_compatible_with(self, other: VectorContract) -> bool:
        """Vectors of the two contracts can share an index (same space shape, same metric)."""
        return (
            self.dimension == other.dimension
            and self.normalized == other.normalized
            and self.similarity == other.similarity
        )
