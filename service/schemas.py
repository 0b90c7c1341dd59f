"""Request and response bodies. The embeddings shapes follow OpenAI's exactly, plus
optional extras (`modality`, per-item `truncated`) that OpenAI clients ignore."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from encoders.contract import VectorContract
from encoders.quantize import OutputDtype


class RequestBody(BaseModel):
    """Base of every request body: an unknown key is refused (a 400 naming it), as OpenAI refuses
    unknown parameters, so a misspelled option (`modle`) is never silently ignored."""

    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request parameter at fault, when there is one.")
    code: str = Field(description="A stable, machine-readable code, e.g. collection_not_found.")


class ErrorResponse(BaseModel):
    """Every error response, in OpenAI's shape (see service/errors.py)."""

    error: ErrorDetail


class EmbeddingRequest(RequestBody):
    """Every key the official `openai` client sends (`input`, `model`, `dimensions`, `encoding_format`,
    `user`) plus Duet's `modality` and the quantised output dtype (Voyage's `output_dtype`, or Cohere's
    `embedding_types`); anything else is refused."""

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
    output_dtype: OutputDtype | None = Field(
        default=None,
        description="'float' (the default), 'int8'/'uint8' (per-dimension ranges calibrated once per model "
        "version), 'binary'/'ubinary' (sign bits packed 8 a byte, as int8 - 128 / uint8: 384 dimensions give "
        "48 values). base64 then packs one byte per value.",
    )
    embedding_types: str | list[Any] | None = Field(
        default=None,
        description="Cohere's name for output_dtype: one of the same values, as a string or a one-item list. "
        "Send output_dtype or embedding_types, not both.",
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str = Field(
        description="Floats; ints for a quantised output_dtype; or base64 (float32, or one byte a value)."
    )
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
    output_dtype: OutputDtype | None = Field(
        default=None, description="The dtype the vectors hold; present only when the request named one."
    )


class ModelCard(BaseModel):
    """One registered model, in OpenAI's /v1/models shape plus registry fields."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="When the model's first version was registered (Unix seconds).")
    owned_by: str = "duet"
    description: str = ""
    latest_version: int | None = None
    aliases: dict[str, int] = Field(default_factory=dict)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class VersionCard(BaseModel):
    """One version, with OpenAI's model fields (`id`, `object`, `created`, `owned_by`) first, so
    `client.models.retrieve(ref)` works, and the registry's beside them."""

    id: str = Field(description="The reference asked for (`GET /v1/models/{name}`) or the version's `name/version`.")
    object: Literal["model"] = "model"
    owned_by: str = "duet"
    name: str
    version: int
    ref: str
    aliases: list[str]
    created: int = Field(description="When the version was registered (Unix seconds).")
    trained: bool
    description: str
    contract: VectorContract
    lineage: dict[str, Any]
    metrics: dict[str, float]
    loaded: bool


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionCard]


class AliasUpdate(RequestBody):
    version: int = Field(gt=0)
    require_compatible: bool = Field(
        default=False,
        description="Move only if the version already holds the alias or its manifest claims compatibility with "
        "the holder (it was trained with compatible_with), so collections pinned to the holder stay searchable; "
        "else 409 saying why.",
    )
