"""A collection: its durable store, its FAISS index, and the rules that keep them in step.

Writers are serialised by one lock per collection: a write commits to the store first (that
is the acknowledgement), then applies to the index. If the process dies in between, the
store's sequence numbers tell the next start what to replay. Searches run concurrently with
writes (the index's readers-writer lock keeps FAISS from seeing both at once).

Quantised collections (`index.quantization`) rank `k * oversample` candidates again with the float
vectors of the store; HNSW collections with a recall target measure their efSearch (`index.recall`)
when the index is built and when a snapshot finds the size moved.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index.config import MODALITIES, CollectionConfig, validate_item_id
from index.engine import FaissIndex, as_matrix
from index.errors import (
    CollectionBusyError,
    CollectionNotFoundError,
    FilterError,
    InvalidCollectionError,
    ItemNotFoundError,
)
from index.filters import compile_filter
from index.hit_names import HitNames
from index.items import HIT_DEFAULT, Hit, StoredItem
from index.layout import SNAPSHOT_FILE, STORE_FILE, data_folder
from index.payloads import PayloadLimits, check_payload
from index.quantization import SQ_RETRAIN_GROWTH, SQ_TRAIN_MIN, SQ_TRAIN_SAMPLE, rescore, rescore_candidates
from index.recall import RECALL_K, SAMPLE_QUERIES, calibrate, exact_top, held_out_like, needs_calibration
from index.store import CollectionStore

logger = logging.getLogger(__name__)

# Below this many filter matches, an approximate index is bypassed for an exact scan of
# just the matches: exact, and cheaper than a selective ANN search that may miss them.
EXACT_SUBSET_LIMIT = 20_000
RACE_MARGIN = 8
# How long closing (service shutdown) waits for calls in flight before leaving the store open.
CLOSE_WAIT_SECONDS = 30.0


def _in_use(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Collection method as a call in flight (see `Collection.using`)."""

    @functools.wraps(method)
    def wrapper(self: Collection, *args: Any, **kwargs: Any) -> Any:
        with self.using():
            return method(self, *args, **kwargs)

    return wrapper


class Collection:
    def __init__(self, folder: Path, config: CollectionConfig, use_gpu: bool = False) -> None:
        self.folder = folder
        self.data = data_folder(folder, config.generation)
        self.config = config
        self.use_gpu = use_gpu
        self._life = threading.Condition()
        self._users = 0  # calls in flight (`using`); a drop or close waits for them to end
        self._gone: Exception | None = None  # set once closing: what new calls raise
        self.store = CollectionStore(self.data / STORE_FILE, config.dim)
        self._writer = threading.Lock()
        self._frozen: str | None = None  # why writes are refused (a re-embed is building its successor)
        self._centroids: dict[str, np.ndarray] = {}
        self._snapshotted_seq: int | None = None
        self._names: HitNames | None = None  # vid -> id, modality; read in at the first search that needs it
        try:
            self._set_index(self._open_index())
        except BaseException:
            self.store.close()
            raise

    def _set_index(self, index: FaissIndex) -> None:
        """Install a (re)built index; with GPU search on, clone it to the GPU as well."""
        self.index = index
        if self.use_gpu and index.enable_gpu():
            logger.info("collection %s: searching on the GPU", self.name)

    @property
    def name(self) -> str:
        return self.config.name

    # -- calls in flight ---------------------------------------------------------------

    @contextmanager
    def using(self) -> Iterator[None]:
        """Every call that touches the store or the index runs inside this: closing the store under a
        running SQLite statement can crash the process, so a drop stops admitting calls, waits for
        those in flight, and only then closes; calls after that raise why the collection is gone."""
        with self._life:
            if self._gone is not None:
                raise type(self._gone)(str(self._gone))  # a fresh one: threads must not share a traceback
            self._users += 1
        try:
            yield
        finally:
            with self._life:
                self._users -= 1
                if not self._users:
                    self._life.notify_all()

    def stop_admitting(self, error: Exception) -> None:
        with self._life:
            self._gone = error

    def readmit(self) -> None:
        with self._life:
            self._gone = None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight (after `stop_admitting`); False if `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._life:
            while self._users:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._life.wait(left)
        return True

    def shut(self, snapshot: bool) -> None:
        """Close the store (and snapshot a changed index first, if asked); only once idle."""
        with self._writer:
            if snapshot and self.dirty:
                self.snapshot_locked()
            self.store.close()

    # -- index life cycle --------------------------------------------------------------

    def _open_index(self) -> FaissIndex:
        path = self.data / SNAPSHOT_FILE
        if path.exists():
            try:
                index = FaissIndex.read_snapshot(path, self.config.index)
                self._check_snapshot(index)
                self._centroids = self._load_centroids()
                self._replay(index)
                self._check_replayed(index)
            except Exception as exc:  # any doubt means: rebuild from the store, keep serving
                logger.warning("collection %s: snapshot unusable (%s); rebuilding from the store", self.name, exc)
                self._snapshotted_seq = None
            else:
                return index
        return self._build()

    def _check_snapshot(self, index: FaissIndex) -> None:
        """What a checksummed snapshot still has to agree with: this collection and its store."""
        if index.dim != self.config.dim:
            raise ValueError(f"snapshot dimension {index.dim}, collection {self.config.dim}")
        store_seq = self.store.seq
        if index.applied_seq > store_seq:
            raise ValueError(f"snapshot holds writes up to seq {index.applied_seq}, the store only up to {store_seq}")
        self._snapshotted_seq = index.applied_seq

    def _check_replayed(self, index: FaissIndex) -> None:
        """After replay the index must hold exactly the store's items."""
        live = index.live_count
        if index.is_hnsw and index.deleted:
            # Replay may tombstone vectors added and replaced after the snapshot, never in this index.
            ids = faiss.vector_to_array(index.index.id_map)
            live = int(np.count_nonzero(~np.isin(ids, np.fromiter(index.deleted, dtype=np.int64))))
        if live != self.store.count():
            raise ValueError(f"after replay the index holds {live} vectors, the store {self.store.count()}")

    def _replay(self, index: FaissIndex) -> None:
        removed = self.store.tombstones_after(index.applied_seq)
        index.remove(removed)
        added = 0
        for vids, vectors, modalities in self.store.iter_vectors(after_seq=index.applied_seq):
            index.add(vids, self._for_index(vectors, modalities))
            added += len(vids)
        index.applied_seq = self.store.seq
        if added or len(removed):
            logger.info("collection %s: replayed %d adds, %d removals", self.name, added, len(removed))

    def _build(self) -> FaissIndex:
        """A fresh index from every row in the store (also recomputes modality centroids)."""
        count = self.store.count()
        factory = self._factory(count)
        index = FaissIndex(self.config.dim, factory, self.config.index)
        self._centroids = self._compute_centroids() if self.config.modality_gap_correction else {}
        self.store.set_meta("centroids", {m: c.tolist() for m, c in self._centroids.items()})
        if not index.is_trained:
            sample = max(256 * _nlist(factory), SQ_TRAIN_SAMPLE if "SQ8" in factory else 0)
            index.train(self._for_index(self.store.sample_vectors(min(count, sample)), None))
        for vids, vectors, modalities in self.store.iter_vectors():
            index.add(vids, self._for_index(vectors, modalities))
        index.applied_seq = self.store.seq
        logger.info("collection %s: built %s over %d vectors", self.name, factory, count)
        self._calibrate(index)
        return index

    def _factory(self, count: int) -> str:
        factory = self.config.index.factory(self.config.dim, count)
        nlist = _nlist(factory)
        if nlist and count < 39 * nlist:  # too few vectors to train the coarse quantizer well
            return "IDMap2,Flat"
        if "SQ8" in factory and count < SQ_TRAIN_MIN:  # too few to train the int8 ranges: exact until then
            return "IDMap2,Flat"
        return factory

    def _grown(self, count: int) -> bool:
        """The collection outgrew its index: an exact stand-in can now be trained into the configured index
        (IVF, int8), an int8 flat index of an `auto` collection has reached IVF size, or a flat or IVF int8
        index has SQ_RETRAIN_GROWTH times the vectors its ranges were trained on (index.quantization)."""
        current, wanted = self.index.factory, self._factory(count)
        if current == "IDMap2,Flat":
            return wanted != current
        trained = self.index.trained_on
        retrainable = "SQ8" in current and not self.index.is_hnsw and 0 < trained < SQ_TRAIN_SAMPLE
        if retrainable and count >= SQ_RETRAIN_GROWTH * trained:
            return True
        return current == "IDMap2,SQ8" and wanted.startswith("IVF")

    def _calibrate(self, index: FaissIndex) -> None:
        """Measure HNSW's efSearch for the collection's recall target (see index.recall), if it is due."""
        count = self.store.count()
        if not needs_calibration(index, count):
            return
        sampled = self.store.matching_vids("vid IN (SELECT vid FROM items ORDER BY random() LIMIT ?)", [SAMPLE_QUERIES])
        found = self._float_vectors(sampled)
        vids = np.array(sorted(found), dtype=np.int64)
        points = np.stack([found[int(v)] for v in vids])
        nearest = exact_top(points, vids, self._index_blocks(), 1)[:, 0]  # the nearest other stored vector
        near = self._float_vectors(nearest)
        keep = np.array([int(v) in near for v in nearest])
        queries = held_out_like(points[keep], np.stack([near[int(v)] for v in nearest[keep]]))
        spec = self.config.index
        candidates = (RECALL_K + RACE_MARGIN) * spec.oversample if index.quantized and spec.rescore else RECALL_K
        index.tuning = calibrate(index, queries, self._index_blocks(), count, candidates)
        logger.info("collection %s: HNSW efSearch from recall target: %s", self.name, index.tuning)

    def _index_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every stored (vids, vectors) as the index holds them, in blocks."""
        return ((vids, self._for_index(vectors, modalities)) for vids, vectors, modalities in self.store.iter_vectors())

    def _float_vectors(self, vids: np.ndarray) -> dict[int, np.ndarray]:
        """The stored float vectors of these rows, as the index holds them (modality gap removed);
        rows deleted meanwhile are absent. Only the vector and modality are read (no payload is decoded):
        rescoring runs this on every search of a quantised collection."""
        items = self.store.hit_rows(vids, {"vector"})
        if not items:
            return {}
        keys = list(items)
        vectors = self._for_index(np.stack([items[v].vector for v in keys]), [items[v].modality for v in keys])
        return dict(zip(keys, vectors))

    @_in_use
    def rebuild(self) -> str:
        with self._writer:
            self._set_index(self._build())
            self.snapshot_locked()
        return self.index.factory

    @_in_use
    def snapshot(self) -> None:
        with self._writer:
            self.snapshot_locked()

    def snapshot_locked(self) -> None:
        self._calibrate(self.index)
        self.index.write_snapshot(self.data / SNAPSHOT_FILE)
        self._snapshotted_seq = self.index.applied_seq
        self.store.prune_tombstones(self.index.applied_seq)

    @property
    def dirty(self) -> bool:
        """The index holds writes its snapshot does not (or there is no snapshot yet)."""
        return self._snapshotted_seq != self.index.applied_seq

    @_in_use
    def count(self) -> int:
        return self.store.count()

    def close(self) -> None:
        """Snapshot if changed and close, once the calls in flight end (service shutdown)."""
        self.stop_admitting(CollectionNotFoundError(f"collection '{self.name}' is closed: the service is stopping"))
        if not self.wait_idle(CLOSE_WAIT_SECONDS):
            logger.warning("collection %s: calls still running after %.0f s; not closed", self.name, CLOSE_WAIT_SECONDS)
            return
        self.shut(snapshot=True)

    # -- modality gap ------------------------------------------------------------------

    def _compute_centroids(self) -> dict[str, np.ndarray]:
        return {m: (total / n).astype(np.float32) for m, (total, n) in self.store.modality_sums().items()}

    def _load_centroids(self) -> dict[str, np.ndarray]:
        stored = self.store.get_meta("centroids", {})
        return {m: np.asarray(v, dtype=np.float32) for m, v in stored.items()}

    def _for_index(self, vectors: np.ndarray, modalities: list[str] | None) -> np.ndarray:
        """Per-modality mean removal (+ re-normalisation) when the collection asks for it."""
        if not self._centroids or modalities is None:
            return vectors
        shifted = vectors.copy()
        for modality, centroid in self._centroids.items():
            mask = np.array([m == modality for m in modalities])
            if mask.any():
                shifted[mask] -= centroid
        norms = np.linalg.norm(shifted, axis=1, keepdims=True)
        unit: np.ndarray = (shifted / np.maximum(norms, 1e-12)).astype(np.float32)
        return unit

    @_in_use
    def modality_gap(self) -> float | None:
        """Distance between the text and image centroids of the stored (normalised) vectors."""
        centroids = self._compute_centroids()
        if "text" not in centroids or "image" not in centroids:
            return None
        return float(np.linalg.norm(centroids["text"] - centroids["image"]))

    # -- writes ------------------------------------------------------------------------

    def freeze(self, reason: str) -> None:
        """Refuse writes from now on (checked under the writer lock, so none is half in)."""
        with self._writer:
            self._frozen = reason

    def thaw(self) -> None:
        with self._writer:
            self._frozen = None

    def check_writable(self) -> None:
        if self._frozen is not None:
            raise CollectionBusyError(self._frozen)

    def prepare_vectors(self, vectors: Any) -> np.ndarray:
        return as_matrix(vectors, self.config.dim, normalize=self.config.metric == "cosine")

    @_in_use
    def upsert(self, items: list[StoredItem], limits: PayloadLimits | None = None) -> int:
        """Store then index; returns the write's sequence number. Last item wins on duplicate ids.
        Payloads must be strict JSON, within `limits` if given (copies of stored items pass none)."""
        unique = list({validate_item_id(item.id, new=True): item for item in items}.values())
        if not unique:
            raise InvalidCollectionError("no items to upsert")
        for item in unique:
            check_payload(item.payload, limits, f"item '{item.id}' payload")
        with self._writer:
            self.check_writable()
            seq, replaced = self.store.upsert(unique, limits.max_collection_fields if limits else None)
            self.index.remove(replaced)
            if self._names is not None:  # names in before vectors, out after (index/hit_names.py)
                self._names.remove(replaced)
                self._names.add((i.vid for i in unique), (i.id for i in unique), (i.modality for i in unique))
            vectors = np.stack([item.vector for item in unique])
            self.index.add(
                np.array([item.vid for item in unique], dtype=np.int64),
                self._for_index(vectors, [item.modality for item in unique]),
            )
            self.index.applied_seq = seq
            self._maybe_grow()
        return seq

    def _maybe_grow(self) -> None:
        """Rebuild when the index no longer fits the data: `auto` collections switch from exact
        to IVF once big enough to train it, and HNSW compacts once a quarter is tombstones."""
        grown = self._grown(self.store.count())
        bloated = self.index.is_hnsw and len(self.index.deleted) > max(1000, self.index.index.ntotal // 4)
        if grown or bloated:
            self._set_index(self._build())
            self.snapshot_locked()

    @_in_use
    def delete(self, ids: list[str] | None = None, filter: dict[str, Any] | None = None) -> tuple[int, list[str]]:
        if ids is None and filter is None:
            raise InvalidCollectionError('delete needs "ids" or "filter"')
        clauses, params = [], []
        if ids is not None:
            clean = [validate_item_id(i) for i in ids]
            if not clean:
                raise InvalidCollectionError('"ids" is empty')
            clauses.append(f"id IN ({','.join('?' * len(clean))})")
            params.extend(clean)
        if filter is not None:
            where, args = compile_filter(filter, self.store.schema)
            clauses.append(f"({where})")
            params.extend(args)
        with self._writer:
            self.check_writable()
            seq, vids, deleted = self.store.delete(" AND ".join(clauses), params)
            self.index.remove(vids)
            if self._names is not None:
                self._names.remove(vids)
            self.index.applied_seq = seq
            self._maybe_grow()
        return seq, deleted

    # -- reads -------------------------------------------------------------------------

    @_in_use
    def get(self, item_id: str) -> StoredItem:
        item = self.store.get(validate_item_id(item_id))
        if item is None:
            raise ItemNotFoundError(f"no item '{item_id}' in collection '{self.name}'")
        return item

    @_in_use
    def page(self, cursor: str | None, limit: int, filter: dict[str, Any] | None) -> list[StoredItem]:
        where, params = compile_filter(filter, self.store.schema) if filter else (None, [])
        return self.store.page(cursor, limit, where, params)

    def _candidates(self, filter: dict[str, Any] | None, modality: str | None) -> np.ndarray | None:
        clauses, params = [], []
        if filter:
            where, args = compile_filter(filter, self.store.schema)
            clauses.append(where)
            params.extend(args)
        if modality is not None:
            if modality not in MODALITIES:
                raise FilterError(f"unknown modality filter {modality!r}: use text, image or vector")
            clauses.append("modality = ?")
            params.append(modality)
        if not clauses:
            return None
        return self.store.matching_vids(" AND ".join(clauses), params)

    @_in_use
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
        """Top-k hits per query (queries validated and normalised like stored vectors).

        `query_modalities` lets modality-gap correction shift each query by its own centroid;
        `exclude[i]` drops one id from query i's results (a query by item id skips itself);
        `rescore` overrides the collection's own choice for a quantised index; `include`: what hits
        carry besides id, score and modality (`index.items.HIT_FIELDS`), and so what rows are read.
        """
        if self._centroids and query_modalities is not None:
            queries = self._for_index(queries, query_modalities)
        allowed = self._candidates(filter, modality)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in range(len(queries))]
        # A few extra candidates cover items deleted between the FAISS search and the row
        # lookup (writes commit to the store before they reach the index), and self-exclusion.
        fetch = k + RACE_MARGIN + (1 if exclude and any(exclude) else 0)
        if allowed is not None and len(allowed) <= EXACT_SUBSET_LIMIT and self.index.factory != "IDMap2,Flat":
            scores, vids = self._exact(queries, allowed, fetch)
        else:
            scores, vids = self._index_search(queries, fetch, allowed, nprobe, rescore)
        return self._hits(scores, vids, k, exclude or [None] * len(queries), include)

    def _index_search(
        self, queries: np.ndarray, fetch: int, allowed: np.ndarray | None, nprobe: int | None, wanted: bool | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The index's top `fetch`; a quantised index's top `fetch * oversample` (within MAX_RESCORE_ROWS a
        call), ranked again by the exact float inner product (unless rescoring is off for the collection or
        this search)."""
        spec = self.config.index
        if not self.index.quantized or not (spec.rescore if wanted is None else wanted):
            return self.index.search(queries, fetch, allowed, nprobe)
        candidates = rescore_candidates(fetch, spec.oversample, len(queries))
        _, vids = self.index.search(queries, candidates, allowed, nprobe)
        return rescore(queries, vids, self._float_vectors, fetch)

    def _exact(self, queries: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = self._float_vectors(allowed)
        vids = np.array(list(found), dtype=np.int64)
        if not len(vids):  # every allowed row deleted since the filter ran
            return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
        vectors = np.stack([found[int(v)] for v in vids])
        scores = queries @ vectors.T
        k = min(k, len(vids))
        top = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, top, axis=1), vids[top]

    def _hit_names(self) -> HitNames:
        """The in-memory vid -> (id, modality) map, read from the store under the write lock the first time
        (so no write slips between the read and the map's first update)."""
        names = self._names
        if names is None:
            with self._writer:
                names = self._names
                if names is None:
                    names = self._names = HitNames.from_rows(self.store.names())
        return names

    def _hits(
        self, scores: np.ndarray, vids: np.ndarray, k: int, exclude: list[str | None], include: AbstractSet[str]
    ) -> list[list[Hit]]:
        if not include:
            return self._named_hits(scores, vids, k, exclude)
        # Rows for the first k (+1 for a self-exclusion) candidates of each query first, all queries in one
        # lookup; the spare candidates are looked up only if some of those rows vanished in the meantime.
        first = vids[:, : k + (1 if any(exclude) else 0)]
        items = self.store.hit_rows(first, include)
        if any(int(v) not in items for v in first.ravel() if v >= 0):
            items = self.store.hit_rows(vids, include)
        with_vector = "vector" in include
        results = []
        for row_scores, row_vids, skip in zip(scores, vids, exclude):
            hits = []
            for score, vid in zip(row_scores, row_vids):
                item = items.get(int(vid))
                if item is None or item.id == skip:
                    continue  # -1 padding, or deleted between search and lookup
                hits.append(
                    Hit(
                        item.id,
                        float(score),
                        item.payload,
                        item.modality,
                        item.content,
                        item.vector if with_vector else None,
                    )
                )
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def _named_hits(self, scores: np.ndarray, vids: np.ndarray, k: int, exclude: list[str | None]) -> list[list[Hit]]:
        """Hits that carry only id, score and modality, named from memory rather than the store: at ANN speeds
        the row lookup cost more than the search (index/hit_names.py)."""
        ids, modalities, found = self._hit_names().lookup(vids)  # not found: padding, or deleted meanwhile
        for row, skip in enumerate(exclude):
            if skip is not None:
                found[row] &= ids[row] != skip
        keep = found & (np.cumsum(found, axis=1) <= k)  # each query's first k named candidates, in rank order
        flat = [
            Hit(item_id, score, {}, modality, None)
            for item_id, score, modality in zip(
                ids[keep].tolist(), scores[keep].tolist(), modalities[keep].tolist(), strict=True
            )
        ]
        ends = np.cumsum(keep.sum(axis=1)).tolist()
        return [flat[start:end] for start, end in zip([0, *ends[:-1]], ends, strict=True)]

    @_in_use
    def stats(self) -> dict[str, Any]:
        counts = self.store.modality_counts()
        return {
            "count": sum(counts.values()),
            "by_modality": counts,
            "seq": self.store.seq,
            "index": {
                "factory": self.index.factory,
                "kind": self.config.index.kind,
                "vectors": int(self.index.index.ntotal),
                "tombstones": len(self.index.deleted),
                "snapshot_current": not self.dirty,
                "gpu": self.index.on_gpu,
                **self._quantization_stats(),
            },
            "payload_fields": self.store.schema,
            "modality_gap": self.modality_gap() if len(counts) > 1 else None,
            "modality_gap_correction": self.config.modality_gap_correction,
        }

    def _quantization_stats(self) -> dict[str, Any]:
        """What the index stores and what its scores mean (`scores`), and HNSW's efSearch and how it was chosen."""
        spec, index = self.config.index, self.index
        if not index.quantized:
            scores = "float"
        elif spec.rescore:
            scores = "float (rescored)"
        elif index.binary:
            scores = "binary estimate, 1 - 2*hamming/dim (not rescored)"
        else:
            scores = "int8 estimate (not rescored)"
        stats: dict[str, Any] = {
            "quantization": spec.quantization,
            "rescore": spec.rescore,
            "oversample": spec.oversample,
            "scores": scores,
        }
        if index.is_hnsw:
            stats["ef_search"] = index.ef_search
            stats["recall_target"] = spec.recall_target
            stats["tuning"] = index.tuning
        return stats


def _nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0
