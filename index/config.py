"""What a collection is, whatever stores it: its name and item-id rules and its config.

Both backends (`faiss`: SQLite + FAISS on local disk, `milvus`: a Milvus server) keep the
same `CollectionConfig`, so a collection means the same thing, and is refused for the same
reasons, on either. Imports nothing heavier than the index spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from index.engine import IndexSpec
from index.errors import InvalidCollectionError

Metric = Literal["cosine", "dot"]
# \Z, not $: Python's $ also matches before a final newline, which let "name\n" through as a folder name.
# Unanchored, so the API's schemas (service/collection_schemas.py, service/openapi.py) state the same rule.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"
_NAME = re.compile(rf"^{NAME_PATTERN}\Z")
_ID = re.compile(r"^[^\x00-\x1f\ud800-\udfff]{1,256}\Z")  # no lone surrogates: stores keep UTF-8
MODALITIES = ("text", "image", "vector")


def validate_collection_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidCollectionError(
            f"invalid collection name {name!r}: use 1-100 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def validate_item_id(item_id: Any, *, new: bool = False) -> str:
    """Any id that can be stored (`new`) must be addressable as GET /v1/collections/{name}/items/{id}:
    '/' is fine (the route takes the rest of the path), but '.' and '..' segments are resolved
    away by URL normalisation in clients, so the item could never be fetched."""
    if not isinstance(item_id, str) or not _ID.match(item_id):
        raise InvalidCollectionError(
            f"invalid item id {item_id!r}: ids are 1-256 characters, no control characters or lone surrogates"
        )
    if new and any(segment in (".", "..") for segment in item_id.split("/")):
        raise InvalidCollectionError(
            f"invalid item id {item_id!r}: '.' and '..' cannot be parts of an id between slashes "
            "(URLs resolve them away, so the item could not be fetched by id)"
        )
    return item_id


@dataclass(frozen=True)
class CollectionConfig:
    name: str
    dim: int
    metric: Metric = "cosine"
    index: IndexSpec = field(default_factory=IndexSpec)
    model: str | None = None  # the pinned model version, "name/version"; None for vector-only
    modalities: tuple[str, ...] = ("text",)
    modality_gap_correction: bool = False
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    generation: int = 0  # which data folder holds the store and index (see `data_folder`); +1 per re-embed

    def __post_init__(self) -> None:
        validate_collection_name(self.name)
        if self.metric not in ("cosine", "dot"):
            raise InvalidCollectionError(f"unknown metric {self.metric!r}: use cosine or dot")
        if not 1 <= self.dim <= 65536:
            raise InvalidCollectionError(f"dimension must be between 1 and 65536, got {self.dim}")
        self.index.check(self.dim)  # before anything is written: a refused create leaves nothing behind

    def to_json(self) -> dict[str, Any]:
        data = self.__dict__.copy()
        data["index"] = self.index.as_dict()
        data["modalities"] = list(self.modalities)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CollectionConfig:
        data = dict(data)
        data["index"] = IndexSpec(**data["index"])
        data["modalities"] = tuple(data["modalities"])
        return cls(**data)
