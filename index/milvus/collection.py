"""One Duet collection in Milvus, as a request uses it (`index.backend.CollectionHandle`).

A handle is cheap and short-lived: `MilvusBackend.get` makes one per lookup from the config row
in the meta collection, so every replica sees creates, drops and re-embed flips of the others. A
handle addresses the physical collection of *its* config's generation (not the alias), so a request
that looked the collection up before a re-embed flip finishes on the old generation, whose vector
space matches the config (dimension, model) it embedded its query with; the old generation is kept
for a grace after the flip for exactly these requests.

Sequence numbers: Milvus has no per-collection write counter, so the number an upsert or delete
returns is a time stamp in microseconds, strictly increasing within one process (max(last + 1,
now)). Across replicas they are only as ordered as the replicas' clocks; they say "later than",
not "how many writes".
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import numpy as np

from index.config import MODALITIES, CollectionConfig, validate_item_id
from index.engine import as_matrix
from index.errors import CollectionBusyError, CollectionNotFoundError, InvalidCollectionError, ItemNotFoundError
from index.items import HIT_DEFAULT, Hit, StoredItem
from index.milvus import names
from index.milvus.expressions import after_clause, compile_filter, conjunction, ids_clause, modality_clause
from index.milvus.schema import (
    CONTENT_MAX_BYTES,
    ITEM_FIELDS,
    MAX_LIMIT,
    ROW_FIELDS,
    build_index_params,
    index_type,
    search_params,
)
from index.payloads import PayloadLimits, check_payload
from index.quantization import rescore_candidates
from index.store import _merge_schema

if TYPE_CHECKING:
    from index.milvus.manager import MilvusBackend

logger = logging.getLogger(__name__)

FIELD_TYPES = ("number", "string", "bool")
MODALITY_GAP_MAX_ITEMS = 20_000  # stats compute the modality gap from the vectors up to this many items
ID_BATCH = 1000  # ids per `id in [...]` expression / delete RPC
REEMBED_STALE_SECONDS = 120.0  # a running re-embed whose heartbeat is older died with its replica

_seq_lock = threading.Lock()
_last_seq = 0


def next_seq() -> int:
    """Microseconds since the epoch, strictly increasing within this process."""
    global _last_seq
    with _seq_lock:
        _last_seq = max(_last_seq + 1, time.time_ns() // 1000)
        return _last_seq


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def reembed_running(state: dict[str, Any] | None) -> bool:
    """A re-embed row that refuses writes: running, and its replica alive (a fresh heartbeat)."""
    if not state or state.get("state") != "running":
        return False
    heartbeat = state.get("heartbeat_ms", 0)
    if isinstance(heartbeat, bool) or not isinstance(heartbeat, (int, float)):
        return False  # an unreadable row refuses no writes (it would, forever)
    return now_ms() - int(heartbeat) < REEMBED_STALE_SECONDS * 1000


def _vector(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _hit_fields(include: AbstractSet[str], rescoring: bool) -> list[str]:
    """The output fields of a search: id and modality, what the hits include, and the vectors a rescore needs."""
    fields = [f for f in ROW_FIELDS if f in ("id", "modality") or f in include]
    return [*fields, "vector"] if rescoring or "vector" in include else fields


def row_to_item(row: dict[str, Any], dim: int | None = None) -> StoredItem:
    vector = _vector(row["vector"]) if "vector" in row else np.zeros(dim or 0, dtype=np.float32)
    return StoredItem(
        id=row["id"],
        modality=row["modality"],
        vector=vector,
        payload=dict(row.get("payload") or {}),
        content=row.get("content"),
    )


def _rescored(hits: list[dict[str, Any]], query: np.ndarray) -> list[dict[str, Any]]:
    """Hits ranked by the exact inner product of the query with their float vectors (which becomes their
    `distance`, the score reported)."""
    scored = []
    for hit in hits:
        entity = hit.get("entity", {})
        vector = entity.get("vector")
        if vector is None:
            continue
        scored.append({**hit, "distance": float(np.dot(query, _vector(vector)))})
    scored.sort(key=lambda hit: -hit["distance"])
    return scored


class MilvusCollection:
    def __init__(self, backend: MilvusBackend, config: CollectionConfig) -> None:
        self.backend = backend
        self.conn = backend.conn
        self.config = config
        self.physical = names.physical(backend.prefix, config.name, config.generation)

    @property
    def name(self) -> str:
        return self.config.name

    def __repr__(self) -> str:
        return f"MilvusCollection({self.name!r}, {self.physical!r})"

    # -- metadata -------------------------------------------------------------------------

    @property
    def schema(self) -> dict[str, str]:
        """The filterable payload fields and their types (one meta row each)."""
        out: dict[str, str] = {}
        for row in self.backend.meta.rows("field", self.name):
            value = row.get("value")
            if isinstance(value, dict) and isinstance(value.get("field"), str) and value.get("type") in FIELD_TYPES:
                out[value["field"]] = value["type"]
            else:  # skipped: the next write that holds the field records it again
                logger.warning("milvus: unreadable field row %r of collection %s", row.get("key"), self.name)
        return out

    def check_writable(self) -> None:
        """Refuse a write while a re-embed runs (on any replica), and a write through a handle whose
        generation a re-embed has replaced (it would land in the generation about to be dropped), in one
        read of the collection's `config` and `reembed` rows."""
        rows = self.backend.meta.get_many([f"config:{self.name}", f"reembed:{self.name}"])
        config = rows.get(f"config:{self.name}")
        if config is None:
            raise CollectionNotFoundError(f"collection '{self.name}' was dropped")
        state = rows.get(f"reembed:{self.name}")
        if reembed_running(state):
            assert state is not None
            raise CollectionBusyError(
                f"collection '{self.name}' is being re-embedded into {state.get('target_model')} "
                f"({state.get('done', 0)}/{state.get('total', 0)} items); retry writes after it"
            )
        if config.get("generation") == self.config.generation and config.get("created_at") != self.config.created_at:
            # dropped and created again (the same generation: the same Milvus collection name) since this
            # request looked it up: its write was meant for the collection that is gone
            raise CollectionNotFoundError(
                f"collection '{self.name}' was dropped (and created again) while this request ran"
            )
        if config.get("generation") != self.config.generation:
            raise CollectionBusyError(f"collection '{self.name}' was re-embedded while this request ran; retry")

    def prepare_vectors(self, vectors: Any) -> np.ndarray:
        return as_matrix(vectors, self.config.dim, normalize=self.config.metric == "cosine")

    # -- writes ---------------------------------------------------------------------------

    def upsert(self, items: list[StoredItem], limits: PayloadLimits | None = None) -> int:
        """Validate everything first (ids, payloads, content, schema), then one upsert RPC."""
        unique = list({validate_item_id(item.id, new=True): item for item in items}.values())
        if not unique:
            raise InvalidCollectionError("no items to upsert")
        for item in unique:
            check_payload(item.payload, limits, f"item '{item.id}' payload")
            if item.modality not in MODALITIES:
                raise InvalidCollectionError(f"item '{item.id}': unknown modality {item.modality!r}")
            if item.content is not None and len(item.content.encode("utf-8")) > CONTENT_MAX_BYTES:
                raise InvalidCollectionError(
                    f"item '{item.id}': its content is {len(item.content.encode('utf-8'))} bytes; the milvus "
                    f"backend stores at most {CONTENT_MAX_BYTES} (a smaller image, or the faiss backend)"
                )
        vectors = np.stack([np.asarray(item.vector, dtype=np.float32).reshape(-1) for item in unique])
        if vectors.shape[1] != self.config.dim:
            raise InvalidCollectionError(f"vectors must have {self.config.dim} dimensions; got {vectors.shape[1]}")
        known = self.schema
        merged = dict(known)
        for item in unique:
            _merge_schema(merged, item.payload, limits.max_collection_fields if limits else None)
        self.check_writable()  # right before writing: a re-embed started on any replica refuses it
        new = [(f, t) for f, t in merged.items() if f not in known]
        self.backend.meta.put_many(
            [(f"field:{self.name}:{f}", self.name, "field", {"field": f, "type": t}) for f, t in new]
        )
        written_at = now_ms()
        rows = [
            {
                "id": item.id,
                "vector": vector.tolist(),
                "modality": item.modality,
                "content": item.content,
                "payload": item.payload,
                "written_at": written_at,
            }
            for item, vector in zip(unique, vectors)
        ]
        self.conn.call("upsert", self.physical, rows)
        return next_seq()

    def delete(self, ids: list[str] | None = None, filter: dict[str, Any] | None = None) -> tuple[int, list[str]]:
        if ids is None and filter is None:
            raise InvalidCollectionError('delete needs "ids" or "filter"')
        id_expr = None
        if ids is not None:
            clean = list(dict.fromkeys(validate_item_id(i) for i in ids))
            if not clean:
                raise InvalidCollectionError('"ids" is empty')
            id_expr = ids_clause(clean)
        where = compile_filter(filter, self.schema) if filter is not None else None
        self.check_writable()
        matched = self.ids(conjunction(id_expr, where))
        for start in range(0, len(matched), ID_BATCH):
            self.conn.call("delete", self.physical, filter=ids_clause(matched[start : start + ID_BATCH]))
        return next_seq(), sorted(matched)

    # -- reads ----------------------------------------------------------------------------

    def ids(self, expr: str) -> list[str]:
        """Ids of the items matching `expr` ("" for all), in no particular order."""
        out: list[str] = []
        for batch in self.conn.iterate(self.physical, expr, ["id"], batch=ID_BATCH * 4):
            out.extend(row["id"] for row in batch)
        return out

    def rows(self, ids: list[str], fields: list[str] = ITEM_FIELDS) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), ID_BATCH):
            chunk = ids[start : start + ID_BATCH]
            for row in self.conn.call(
                "query", self.physical, filter=ids_clause(chunk), output_fields=fields, limit=len(chunk)
            ):
                out[row["id"]] = row
        return out

    def get(self, item_id: str) -> StoredItem:
        rows = self.conn.call(
            "query", self.physical, filter=ids_clause([validate_item_id(item_id)]), output_fields=ITEM_FIELDS, limit=1
        )
        if not rows:
            raise ItemNotFoundError(f"no item '{item_id}' in collection '{self.name}'")
        return row_to_item(rows[0])

    def page(self, cursor: str | None, limit: int, filter: dict[str, Any] | None) -> list[StoredItem]:
        """Up to `limit` items after `cursor` in id order: one query in the server's iterator mode, which
        returns the smallest matching ids in order (a plain Milvus query returns rows in no particular
        order), so a page costs O(limit), not O(matches). Should a server ever answer out of order, the
        page is made the slow, sure way: every matching id after the cursor, the `limit` smallest."""
        if limit <= 0:
            return []
        where = compile_filter(filter, self.schema) if filter else None
        expr = conjunction(after_clause(cursor) if cursor is not None else None, where)
        batch = next(iter(self.conn.iterate(self.physical, expr, ITEM_FIELDS, batch=limit)), [])
        ids = [row["id"] for row in batch]
        if cursor is not None and any(i <= cursor for i in ids):  # (never seen: the cursor is in the filter)
            ids = heapq.nsmallest(limit, self.ids(expr))
            rows = self.rows(ids)
            return [row_to_item(rows[i]) for i in ids if i in rows]
        return [row_to_item(row) for row in batch]

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
        rescore: bool | None = None,
        include: AbstractSet[str] = HIT_DEFAULT,
    ) -> list[list[Hit]]:
        """Top-k per query in one search RPC; `exclude[i]` drops one id from query i's hits. A quantised
        index (IVF_SQ8, HNSW_SQ, IVF_RABITQ) is asked for `k * oversample` candidates with their float
        vectors, ranked again here by the exact inner product, unless rescoring is off (`rescore`
        overrides the collection's choice). Only the fields in `include` travel back (id and modality always)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        skips = list(exclude) if exclude else [None] * len(queries)
        where = compile_filter(filter, self.schema) if filter else None
        expr = conjunction(where, modality_clause(modality) if modality is not None else None)
        if len(queries) == 0 or k <= 0:
            return [[] for _ in range(len(queries))]
        fetch = k + (1 if any(skips) else 0)
        spec = self.config.index
        rescoring = spec.quantization != "none" and (spec.rescore if rescore is None else rescore)
        limit = min(rescore_candidates(fetch, spec.oversample, len(queries)), MAX_LIMIT) if rescoring else fetch
        results = self.conn.call(
            "search",
            self.physical,
            data=queries.tolist(),
            filter=expr,
            limit=limit,
            output_fields=_hit_fields(include, rescoring),
            search_params=search_params(spec, limit, nprobe),
            consistency_level="Strong",
        )
        out = []
        with_vector = "vector" in include
        for row_hits, query, skip in zip(results, queries, skips):
            if rescoring:
                row_hits = _rescored(row_hits, query)
            hits = []
            for hit in row_hits:
                entity = hit.get("entity", {})
                item_id = hit.get("id", entity.get("id"))
                if item_id == skip:
                    continue
                hits.append(
                    Hit(
                        item_id,
                        float(hit["distance"]),
                        dict(entity.get("payload") or {}),
                        entity.get("modality"),
                        entity.get("content"),
                        _vector(entity["vector"]) if with_vector else None,
                    )
                )
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def _quantization_stats(self) -> dict[str, Any]:
        spec = self.config.index
        if spec.quantization == "none":
            scores = "float"
        else:
            scores = "float (rescored)" if spec.rescore else f"{index_type(spec)} estimate (not rescored)"
        return {
            "quantization": spec.quantization,
            "rescore": spec.rescore,
            "oversample": spec.oversample,
            "scores": scores,
        }

    def count(self, expr: str = "") -> int:
        rows = self.conn.call("query", self.physical, filter=expr, output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def modality_counts(self) -> dict[str, int]:
        counts = {m: self.count(modality_clause(m)) for m in MODALITIES}
        return {m: n for m, n in counts.items() if n}

    def count_without_content(self) -> int:
        return self.count("content is null")

    def centroids(self, modalities: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for modality in modalities:
            total: np.ndarray | None = None
            n = 0
            for batch in self.conn.iterate(self.physical, modality_clause(modality), ["vector"]):
                vectors = np.asarray([row["vector"] for row in batch], dtype=np.float64)
                total = vectors.sum(0) if total is None else total + vectors.sum(0)
                n += len(vectors)
            if n and total is not None:
                out[modality] = (total / n).astype(np.float32)
        return out

    def modality_gap(self, counts: dict[str, int]) -> float | None:
        """Distance between the text and image centroids; None with one modality, or (not to read
        every vector for a stats call) above MODALITY_GAP_MAX_ITEMS items."""
        if "text" not in counts or "image" not in counts or sum(counts.values()) > MODALITY_GAP_MAX_ITEMS:
            return None
        centroids = self.centroids(["text", "image"])
        return float(np.linalg.norm(centroids["text"] - centroids["image"]))

    def stats(self) -> dict[str, Any]:
        counts = self.modality_counts()
        total = sum(counts.values())
        return {
            "count": total,
            "by_modality": counts,
            "seq": None,  # no per-collection counter on this backend (see the module docstring)
            "index": {
                "backend": "milvus",
                "kind": self.config.index.kind,
                "milvus_index": index_type(self.config.index),
                "collection": self.physical,
                "alias": names.alias(self.backend.prefix, self.name),
                "uri": self.conn.where,
                "modality_gap_max_items": MODALITY_GAP_MAX_ITEMS,
                **self._quantization_stats(),
            },
            "payload_fields": self.schema,
            "modality_gap": self.modality_gap(counts) if len(counts) > 1 else None,
            "modality_gap_correction": self.config.modality_gap_correction,
        }

    def rebuild(self) -> str:
        """Build the Milvus index again: release, drop the index, create it, load."""
        self.conn.call("release_collection", self.physical)
        self.conn.call("drop_index", self.physical, "vector")
        self.conn.call("create_index", self.physical, build_index_params(self.config.index))
        self.conn.call("load_collection", self.physical)
        return index_type(self.config.index)
