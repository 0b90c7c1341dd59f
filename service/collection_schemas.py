"""Bodies of the collections API (kept apart from the OpenAI-shaped embeddings schemas)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from index.config import NAME_PATTERN
from service.schemas import RequestBody

IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
HitField = Literal["payload", "content", "vector"]  # index.items.HIT_FIELDS
VECTOR_DESCRIPTION = (
    "Floats, or one base64 string of little-endian float32 (what /v1/embeddings returns with "
    '`encoding_format: "base64"`, passed through as it is): 4 bytes per dimension, no JSON numbers to parse.'
)


class IndexOptions(RequestBody):
    kind: IndexKind = Field(default="auto", description="auto = exact until big enough for IVF, then IVF.")
    nprobe: int = Field(default=16, ge=1, le=2048, description="IVF lists visited per query (overridable per search).")
    auto_ivf_threshold: int = Field(default=100_000, ge=1000, description="Size at which `auto` switches to IVF.")
    nlist: int | None = Field(default=None, ge=1, le=65536, description="IVF lists; default 4*sqrt(n).")
    pq_m: int = Field(default=16, ge=1, description="Sub-quantizers for ivfpq (about pq_m bytes per vector).")
    hnsw_m: int = Field(default=32, ge=2, le=256)
    ef_search: int = Field(default=128, ge=1, le=4096)
    quantization: Literal["none", "int8", "binary"] = Field(
        default="none",
        description="int8: 8-bit scalar quantiser (about 4x less index memory); binary: one sign bit per "
        "dimension (32x less). Milvus: int8 -> IVF_SQ8 / HNSW_SQ, binary -> IVF_RABITQ.",
    )
    rescore: bool = Field(
        default=True,
        description="Quantised indexes: rank k*oversample candidates again with the stored float vectors, so "
        "scores are float scores. Off: scores are the index's estimates (the collection's stats say which).",
    )
    oversample: int = Field(default=4, ge=1, le=100, description="Candidates per result when rescoring.")
    recall_target: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="hnsw only: efSearch is the smallest that reaches this recall@10, measured on the "
        "collection's own vectors when its index is built or snapshotted (stats: index.tuning).",
    )


class CollectionCreate(RequestBody):
    # The rule is enforced by index.collection (a 400 naming it); the schema states it too, so clients and
    # schema-driven tools (schemathesis) can produce valid names. Not validated here: that would turn the
    # documented 400 into a 422.
    name: str = Field(
        description="1-100 letters, digits, '_' or '-', starting with a letter or digit.",
        json_schema_extra={"pattern": f"^{NAME_PATTERN}$", "minLength": 1, "maxLength": 100},
    )
    model: str | None = Field(
        default=None,
        description="Model reference, resolved now and pinned to that exact version. Default: the server's "
        "default model. Omit it and give `dimension` for a vector-only collection.",
    )
    dimension: int | None = Field(default=None, ge=1, le=65536, description="Only for vector-only collections.")
    metric: Literal["cosine", "dot"] = "cosine"
    index: IndexOptions | IndexKind = Field(default_factory=IndexOptions)
    modality_gap_correction: bool = Field(
        default=False, description="Remove each modality's mean vector (and re-normalise) at index and query time."
    )


class ReembedRequest(RequestBody):
    model: str | None = Field(
        default=None,
        description="Model reference to re-embed with, resolved now and pinned. Default: the `production` alias "
        "of the collection's model name, else its latest version.",
    )


class ReembedStatus(BaseModel):
    state: Literal["running", "done", "failed"]
    source_model: str | None = Field(description="The version the collection held when the re-embed started.")
    target_model: str = Field(description="The version it is being re-embedded with.")
    total: int = Field(description="Items to re-embed.")
    done: int = Field(description="Items re-embedded so far.")
    error: str | None = Field(default=None, description="Why it failed; the collection was left as it was.")
    started_at: str
    finished_at: str | None = None


class CompatibleModel(BaseModel):
    """A version whose queries may search the collection's vectors, with the numbers its training measured."""

    model: str = Field(description="The version, e.g. 'shapes/2'.")
    mapped: bool = Field(description="Whether its query vectors go through a learned new -> old map.")
    metrics: dict[str, float] = Field(
        default_factory=dict, description="'<set>/new-old/<metric>' beside '<set>/old-old/...' and '<set>/new-new/...'."
    )


class CollectionInfo(BaseModel):
    name: str
    model: str | None
    dimension: int
    metric: str
    modalities: list[str]
    index: dict[str, Any]
    modality_gap_correction: bool
    created_at: str
    count: int
    stats: dict[str, Any]
    reembed: ReembedStatus | None = Field(
        default=None, description="The last re-embed since the service started (running, done or failed)."
    )
    compatible_models: list[CompatibleModel] = Field(
        default_factory=list,
        description="Versions registered compatible with `model` (trained with compatible_with): a search may name "
        "one as its `model` (its queries search these vectors, no re-embed). Filled by GET /v1/collections/{name}.",
    )


class UnavailableCollection(BaseModel):
    name: str
    error: str = Field(description="Why it cannot be opened. DELETE /v1/collections/{name} removes it.")


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CollectionInfo]
    unavailable: list[UnavailableCollection] = Field(
        default_factory=list,
        description="Collections on disk that cannot be opened (damaged files): requests to them get 503.",
    )


class ItemIn(RequestBody):
    id: str = Field(min_length=1, max_length=256)
    text: str | None = None
    image: str | None = Field(default=None, description="data:image/<type>;base64,... URI")
    vector: list[float] | str | None = Field(default=None, description=VECTOR_DESCRIPTION)
    modality: Literal["text", "image"] | None = Field(
        default=None, description="For raw vectors: which modality they came from (for the modality gap)."
    )
    payload: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_content(self) -> ItemIn:
        given = [k for k in ("text", "image", "vector") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"item '{self.id}' needs exactly one of text, image or vector (got {given or 'none'})")
        return self


class UpsertRequest(RequestBody):
    items: list[ItemIn] = Field(min_length=1)
    model: str | None = Field(default=None, description="If given, must resolve to the collection's pinned version.")


class UpsertResponse(BaseModel):
    upserted: int
    seq: int = Field(description="Sequence number of this write in the collection's store.")
    truncated: list[str] = Field(default_factory=list, description="Ids whose text was cut to the token limit.")


class ItemOut(BaseModel):
    id: str
    modality: str
    payload: dict[str, Any]
    content: str | None = None
    vector: list[float] | None = None


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None


class DeleteRequest(RequestBody):
    ids: list[str] | None = None
    filter: dict[str, Any] | None = None


class DeleteResponse(BaseModel):
    deleted: int
    ids: list[str]
    seq: int


class Query(RequestBody):
    text: str | None = None
    image: str | None = None
    vector: list[float] | str | None = Field(default=None, description=VECTOR_DESCRIPTION)
    id: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Query:
        given = [k for k in ("text", "image", "vector", "id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a query needs exactly one of text, image, vector or id (got {given or 'none'})")
        return self


class SearchRequest(RequestBody):
    query: Query | None = None
    queries: list[Query] | None = None
    k: int = 10
    filter: dict[str, Any] | None = None
    modality: Literal["text", "image", "vector"] | None = Field(default=None, description="Only items of this kind.")
    nprobe: int | None = Field(default=None, ge=1, le=2048)
    rescore: bool | None = Field(
        default=None,
        description="Quantised collections: rank the candidates again with the stored float vectors (true) or "
        "answer with the index's own estimates (false). Default: the collection's `index.rescore`.",
    )
    model: str | None = Field(
        default=None,
        description="If given, the collection's pinned version, or a version registered compatible with it "
        "(GET /v1/collections/{name} lists them): texts and images are then embedded by that version.",
    )
    include: list[HitField] | None = Field(
        default=None,
        description="What each hit carries besides id, score and modality: any of payload, content and vector "
        "(the stored, normalised vector, as floats). Default: payload and content. `[]` answers fastest.",
    )

    @model_validator(mode="after")
    def _one_of(self) -> SearchRequest:
        if (self.query is None) == (self.queries is None):
            raise ValueError('give either "query" or "queries"')
        return self


class SearchHit(BaseModel):
    id: str
    score: float
    payload: dict[str, Any] | None = Field(default=None, description="Absent unless included (by default it is).")
    modality: str
    content: str | None = Field(default=None, description="Absent unless included (by default it is).")
    vector: list[float] | None = Field(default=None, description='Only with "vector" in `include`.')


class SearchModels(BaseModel):
    query: str = Field(description="The version that embedded the texts and images of the search.")
    gallery: str = Field(description="The collection's pinned version, whose vectors were searched.")


class SearchResponse(BaseModel):
    results: list[SearchHit] | list[list[SearchHit]]
    model: str | None
    collection: str
    models: SearchModels | None = Field(
        default=None,
        description="Which pair answered: differs from `model` when `model` named a version registered compatible "
        "with the pinned one. None for a vector-only collection.",
    )
