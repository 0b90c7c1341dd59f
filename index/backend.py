"""The seam between the service and whatever stores collections.

The service needs the same things of every store, named here once: a *backend* creates, finds,
lists and drops collections and re-embeds one into a new generation with an atomic flip; a
*collection handle* writes, reads, pages and searches items. Two backends implement them:

- `faiss` (`index.manager.CollectionManager`): one SQLite store + one FAISS index per collection
  on this machine's disk. One writer process (the data-dir lock); the fastest on one machine.
- `milvus` (`index.milvus.manager.MilvusBackend`): collections in a Milvus server (or milvus-lite
  for trying it), which shards, replicates and survives machine loss; any number of API replicas
  share them, with no shared disk.

Both raise the errors of `index.errors`, which the service maps to HTTP statuses in one table,
and both validate the same way (`index.config`, `index.filters`, `index.payloads`), so a request
gets the same answer on either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from index.config import CollectionConfig
from index.items import HIT_DEFAULT, Hit, StoredItem
from index.payloads import PayloadLimits

BackendKind = Literal["faiss", "milvus"]
EmbedFn = Callable[[list[StoredItem]], np.ndarray]  # items (modality + content) -> one vector each


class ReembedHandle(Protocol):
    """A running or finished re-embed; `progress.as_dict()` is what the API reports."""

    progress: Any


class CollectionHandle(Protocol):
    """One collection, as a request uses it."""

    config: CollectionConfig

    @property
    def name(self) -> str: ...

    def check_writable(self) -> None:
        """Raise `CollectionBusyError` if writes are refused right now (a re-embed is running)."""

    def prepare_vectors(self, vectors: Any) -> np.ndarray:
        """Validate (dimension, finite, non-zero) and, for cosine, normalise: float32, 2-D."""

    def upsert(self, items: list[StoredItem], limits: PayloadLimits | None = None) -> int:
        """Insert or replace by id, durably; returns the write's sequence number (increasing)."""

    def delete(self, ids: list[str] | None = None, filter: dict[str, Any] | None = None) -> tuple[int, list[str]]:
        """Delete by ids and/or filter; (sequence number, ids deleted)."""

    def get(self, item_id: str) -> StoredItem: ...

    def page(self, cursor: str | None, limit: int, filter: dict[str, Any] | None) -> list[StoredItem]:
        """Up to `limit` items with ids after `cursor`, in id order."""

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        query_modalities: list[str] | None = None,
        filter: dict[str, Any] | None = None,
        modality: str | None = None,
        nprobe: int | None = None,
        exclude: list[str | None] | None = None,
        include: AbstractSet[str] = HIT_DEFAULT,
        rescore: bool | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query; `include`: what each hit carries besides id, score and modality (`HIT_FIELDS`);
        `rescore`: for a quantised index, overrides the collection's own choice."""

    def count(self) -> int: ...

    def stats(self) -> dict[str, Any]:
        """`count`, `by_modality`, `payload_fields`, `modality_gap`, ... and an `index` section of the backend's own."""

    def rebuild(self) -> str:
        """Rebuild the index from the stored items; returns what was built."""


class CollectionBackend(Protocol):
    """All collections of one service."""

    @property
    def kind(self) -> BackendKind: ...

    def create(self, config: CollectionConfig) -> CollectionHandle: ...

    def get(self, name: str) -> CollectionHandle: ...

    def listing(self) -> tuple[Sequence[CollectionHandle], dict[str, str]]:
        """(usable collections, {name: why it cannot be used})."""

    def drop(self, name: str) -> None: ...

    def start_reembed(self, config: CollectionConfig, embed: EmbedFn) -> ReembedHandle: ...

    def reembed_status(self, name: str) -> dict[str, Any] | None: ...

    def open_all(self) -> None:
        """At start-up: open what can be opened now (the faiss backend replays its indexes)."""

    def snapshot_dirty(self) -> list[str]:
        """Periodic upkeep (the faiss backend snapshots changed indexes); returns what was done."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class MilvusOptions:
    """Where the milvus backend keeps collections (service settings `DUET_MILVUS_*`)."""

    uri: str  # a file path: milvus-lite embedded in this process; http(s)://host:19530: a Milvus server
    token: str | None = None
    db_name: str | None = None
    prefix: str = "duet"  # Milvus collection names: {prefix}_{name}_g{generation}, alias {prefix}_{name}
    timeout_seconds: float = 10.0


def open_backend(
    kind: BackendKind, *, root: Path, use_gpu: bool = False, milvus: MilvusOptions | None = None
) -> CollectionBackend:
    """The backend the settings name; milvus is imported only when chosen (pymilvus is an extra)."""
    if kind == "faiss":
        from index.manager import CollectionManager

        return CollectionManager(root, use_gpu=use_gpu)
    if kind == "milvus":
        if milvus is None:
            raise ValueError("the milvus backend needs MilvusOptions (DUET_MILVUS_URI)")
        from index.milvus.manager import MilvusBackend

        return MilvusBackend(milvus)
    raise ValueError(f"unknown collections backend {kind!r}: use faiss or milvus")
