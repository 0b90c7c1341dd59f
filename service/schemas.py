"""Request and response bodies. The embeddings shapes follow OpenAI's exactly, plus
optional extras (`modality`, per-item `truncated`) that OpenAI clients ignore."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from encoders.contract import VectorContract


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[Any] = Field(
        description="A string or a list of strings. Images are 'data:image/<type>;base64,...' URIs.",
        examples=[["A photo of a red circle", "A blue square"]],
    )
    model: str | None = Field(
        default=None,
        description="'name' (its production alias), 'name@alias' or 'name/version'. Default: the server's default.",
        examples=["minilm"],
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'base64' is little-endian float32, as OpenAI sends it."
    )
    dimensions: int | None = Field(
        default=None, description="Keep the first N dimensions and re-normalise (Matryoshka truncation)."
    )
    user: str | None = Field(default=None, max_length=256, description="End-user id; accepted for compatibility.")
    modality: Literal["auto", "text", "image"] = Field(
        default="auto",
        description="'auto': data:image URIs are images, everything else text. "
        "'text' forces text, 'image' forces images.",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str
    truncated: bool = Field(default=False, description="True when the text was cut to the model's token limit.")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    images: int = 0


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str = Field(description="The exact version that produced the vectors: 'name/version'.")
    usage: Usage


class ModelCard(BaseModel):
    """One registered model, in OpenAI's /v1/models shape plus registry fields."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "duet"
    description: str = ""
    latest_version: int | None = None
    aliases: dict[str, int] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionCard(BaseModel):
    name: str
    version: int
    ref: str
    aliases: list[str]
    created: int
    trained: bool
    description: str
    contract: VectorContract
    lineage: dict[str, Any]
    metrics: dict[str, float]
    loaded: bool


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionCard]


class AliasUpdate(BaseModel):
    version: int = Field(gt=0)
