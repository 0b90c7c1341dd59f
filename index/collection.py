"""A collection: its durable store, its FAISS index, and the rules that keep them in step.

Writers are serialised by one lock per collection: a write commits to the store first (that
is the acknowledgement), then applies to the index. If the process dies in between, the
store's sequence numbers tell the next start what to replay. Searches run concurrently with
writes (the index's readers-writer lock keeps FAISS from seeing both at once).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from index.engine import FaissIndex, IndexSpec, as_matrix
from index.errors import (
    CollectionBusyError,
    CollectionExistsError,
    CollectionNotFoundError,
    CollectionUnavailableError,
    FilterError,
    InvalidCollectionError,
    ItemNotFoundError,
    ReembedRefusedError,
)
from index.filters import compile_filter
from index.payloads import PayloadLimits, check_payload
from index.reembed import EmbedFn, ReembedJob
from index.store import CollectionStore, StoredItem

logger = logging.getLogger(__name__)

Metric = Literal["cosine", "dot"]
# \Z, not $: Python's $ also matches before a final newline, which let "name\n" through as a folder name.
# Unanchored, so the API's schemas (service/collection_schemas.py, service/openapi.py) state the same rule.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"
_NAME = re.compile(rf"^{NAME_PATTERN}\Z")
_ID = re.compile(r"^[^\x00-\x1f\ud800-\udfff]{1,256}\Z")  # no lone surrogates: SQLite stores UTF-8
SNAPSHOT_FILE = "index.snapshot"
STORE_FILE = "store.sqlite"
CONFIG_FILE = "collection.json"
# Below this many filter matches, an approximate index is bypassed for an exact scan of
# just the matches: exact, and cheaper than a selective ANN search that may miss them.
EXACT_SUBSET_LIMIT = 20_000
MODALITIES = ("text", "image", "vector")
RACE_MARGIN = 8
# A generation replaced by a re-embed keeps its files this long, for searches still running on it.
RETIRED_GRACE_SECONDS = 60.0
# How long a drop waits for the calls in flight on the collection before it gives up with a 409.
DROP_WAIT_SECONDS = 30.0
# How long closing (service shutdown) waits for them before leaving the store open.
CLOSE_WAIT_SECONDS = 30.0
_GENERATION = re.compile(r"^gen-(\d+)$")


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


def data_folder(folder: Path, generation: int) -> Path:
    """Where a generation's store and index snapshot live: generation 0 in the collection folder itself
    (the layout from before re-embeds), later ones in `gen-N/`, so two generations never share a path."""
    return folder if generation == 0 else folder / f"gen-{generation}"


def remove_generation(folder: Path, generation: int) -> None:
    """Delete one generation's store and snapshot (never the collection's config)."""
    if generation:
        shutil.rmtree(data_folder(folder, generation), ignore_errors=True)
        return
    for path in folder.glob("*"):
        if path.is_file() and path.name.startswith((STORE_FILE, "index.")):
            path.unlink(missing_ok=True)


def remove_stale_generations(folder: Path, current: int) -> None:
    """Leftovers of a re-embed that never flipped, or of the generation one replaced, cut short by a restart."""
    for path in folder.glob("gen-*"):
        match = _GENERATION.match(path.name)
        if match and int(match.group(1)) != current:
            logger.warning("collection %s: removing unused %s", folder.name, path.name)
            remove_generation(folder, int(match.group(1)))
    if current and (folder / STORE_FILE).exists():
        remove_generation(folder, 0)


def write_config(folder: Path, config: CollectionConfig) -> None:
    """Replace `collection.json` atomically and durably: the on-disk commit point of a re-embed."""
    tmp = folder / f"{CONFIG_FILE}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps(config.to_json(), indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / CONFIG_FILE)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (the folder's own entry list)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _in_use(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Collection method as a call in flight (see `Collection.using`)."""

    @functools.wraps(method)
    def wrapper(self: Collection, *args: Any, **kwargs: Any) -> Any:
        with self.using():
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    modality: str
    content: str | None


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
            index.train(self._for_index(self.store.sample_vectors(min(count, 256 * _nlist(factory))), None))
        for vids, vectors, modalities in self.store.iter_vectors():
            index.add(vids, self._for_index(vectors, modalities))
        index.applied_seq = self.store.seq
        logger.info("collection %s: built %s over %d vectors", self.name, factory, count)
        return index

    def _factory(self, count: int) -> str:
        factory = self.config.index.factory(self.config.dim, count)
        nlist = _nlist(factory)
        if nlist and count < 39 * nlist:  # too few vectors to train the coarse quantizer well
            return "IDMap2,Flat"
        return factory

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
        return (shifted / np.maximum(norms, 1e-12)).astype(np.float32)

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
        grown = self.index.factory == "IDMap2,Flat" and self._factory(self.store.count()) != "IDMap2,Flat"
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
    ) -> list[list[Hit]]:
        """Top-k hits per query (queries validated and normalised like stored vectors).

        `query_modalities` lets modality-gap correction shift each query by its own centroid;
        `exclude[i]` drops one id from query i's results (a query by item id skips itself).
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
            scores, vids = self.index.search(queries, fetch, allowed, nprobe)
        return self._hits(scores, vids, k, exclude or [None] * len(queries))

    def _exact(self, queries: np.ndarray, allowed: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        items = self.store.by_vids([int(v) for v in allowed])
        vids = np.array(list(items), dtype=np.int64)
        vectors = self._for_index(
            np.stack([items[int(v)].vector for v in vids]), [items[int(v)].modality for v in vids]
        )
        scores = queries @ vectors.T
        k = min(k, len(vids))
        top = np.argsort(-scores, axis=1)[:, :k]
        return np.take_along_axis(scores, top, axis=1), vids[top]

    def _hits(self, scores: np.ndarray, vids: np.ndarray, k: int, exclude: list[str | None]) -> list[list[Hit]]:
        # Rows for the first k (+1 for a self-exclusion) candidates of each query first; the
        # spare candidates are looked up only if some of those rows vanished in the meantime.
        first = vids[:, : k + (1 if any(exclude) else 0)]
        items = self.store.by_vids(sorted({int(v) for v in first.ravel() if v >= 0}), with_vectors=False)
        if any(int(v) not in items for v in first.ravel() if v >= 0):
            items = self.store.by_vids(sorted({int(v) for v in vids.ravel() if v >= 0}), with_vectors=False)
        results = []
        for row_scores, row_vids, skip in zip(scores, vids, exclude):
            hits = []
            for score, vid in zip(row_scores, row_vids):
                item = items.get(int(vid))
                if item is None or item.id == skip:
                    continue  # -1 padding, or deleted between search and lookup
                hits.append(Hit(item.id, float(score), item.payload, item.modality, item.content))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

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
            },
            "payload_fields": self.store.schema,
            "modality_gap": self.modality_gap() if len(counts) > 1 else None,
            "modality_gap_correction": self.config.modality_gap_correction,
        }


def _reason(exc: BaseException) -> str:
    """A one-line reason for an operator: the error's own message, else its kind."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def _nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


class CollectionManager:
    """All collections under one folder: create, open (replaying), list, drop, re-embed, close.

    Protocols (see docs/architecture.md, "Collections appear and disappear whole"):
    - create: options are validated first; the collection is built and closed in a private
      `.creating-<name>-<random>` folder, then renamed into place, then opened. Names being created
      or dropped are reserved under the lock, so concurrent creates of one name give one winner.
    - drop: the name is taken out of service under the lock (new lookups: not found), then the
      collection stops admitting calls and waits for those in flight (or gives up with
      `CollectionBusyError`), closes its store, and its folder is renamed to a private
      `.dropping-<name>-<random>` folder and deleted. Start-up deletes leftover dot-folders.
    - a collection that cannot be opened is recorded as unavailable with its reason (listed,
      droppable); it never stops the others or the service.
    """

    def __init__(self, root: Path, use_gpu: bool = False) -> None:
        self.root = root
        self.use_gpu = use_gpu
        self.root.mkdir(parents=True, exist_ok=True)
        self._open: dict[str, Collection] = {}
        self._lock = threading.Lock()
        self._reembeds: dict[str, ReembedJob] = {}  # the last re-embed of each collection (its status)
        self._retired: list[tuple[float, Collection]] = []  # replaced by a re-embed; deleted after a grace
        self._broken: dict[str, str] = {}  # collections on disk that failed to open: why
        self._busy: set[str] = set()  # names being created or dropped right now
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """Creates and drops cut short (a crash, a kill) leave private dot-folders; nothing refers to them."""
        for path in self.root.iterdir():
            if path.is_dir() and path.name.startswith((".creating-", ".dropping-")):
                logger.warning("collections: removing %s, left by a create or drop that was cut short", path.name)
                shutil.rmtree(path, ignore_errors=True)

    def _folder(self, name: str) -> Path:
        return self.root / validate_collection_name(name)

    def _private(self, kind: str, name: str) -> Path:
        return self.root / f".{kind}-{name}-{uuid.uuid4().hex[:12]}"

    def create(self, config: CollectionConfig) -> Collection:
        """Create a collection whole or not at all (its options were validated by CollectionConfig)."""
        name = config.name
        folder = self._folder(name)
        with self._lock:
            if name in self._busy:
                raise CollectionBusyError(f"collection '{name}' is being created or dropped right now; retry")
            if name in self._open or name in self._broken or os.path.lexists(folder):
                raise CollectionExistsError(f"collection '{name}' already exists")
            self._busy.add(name)
        try:
            tmp = self._private("creating", name)
            tmp.mkdir()
            try:
                write_config(tmp, config)
                Collection(tmp, config).shut(snapshot=True)  # the store and an empty index, on disk, closed
                os.rename(tmp, folder)  # a collection appears whole or not at all
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(self.root)
            collection = Collection(folder, config, self.use_gpu)
            with self._lock:
                self._open[name] = collection
            return collection
        finally:
            with self._lock:
                self._busy.discard(name)

    def get(self, name: str) -> Collection:
        with self._lock:
            if name in self._open:
                return self._open[name]
            folder = self._folder(name)
            if name in self._busy:  # being dropped (or not created yet)
                raise CollectionNotFoundError(f"no collection named '{name}' (it is being dropped or created)")
            if name in self._broken:
                raise CollectionUnavailableError(
                    f"collection '{name}' cannot be opened: {self._broken[name]}. DELETE /v1/collections/{name} "
                    "removes it"
                )
            if not folder.is_dir():
                raise CollectionNotFoundError(f"no collection named '{name}'; GET /v1/collections lists them")
            try:
                collection = self._open_folder(folder)
            except Exception as exc:  # one damaged collection must not take down the others, or start-up
                reason = _reason(exc)
                logger.error("collection %s cannot be opened (%s); it is listed as unavailable", name, reason)
                self._broken[name] = reason
                raise CollectionUnavailableError(f"collection '{name}' cannot be opened: {reason}") from exc
            self._open[name] = collection
            return collection

    def _open_folder(self, folder: Path) -> Collection:
        path = folder / CONFIG_FILE
        if not path.is_file():
            raise InvalidCollectionError(f"its folder has no {CONFIG_FILE}")
        config = CollectionConfig.from_json(json.loads(path.read_text()))
        if config.name != folder.name:
            raise InvalidCollectionError(f"its {CONFIG_FILE} names another collection, {config.name!r}")
        remove_stale_generations(folder, config.generation)
        return Collection(folder, config, self.use_gpu)

    def names(self) -> list[str]:
        """Collections on disk, usable or not (not the dot-folders of ones being created or dropped)."""
        return sorted(p.name for p in self.root.iterdir() if not p.name.startswith(".") and p.is_dir())

    def open_all(self) -> None:
        """Open every collection (replaying its index); ones that fail are recorded, not raised."""
        for name in self.names():
            with contextlib.suppress(CollectionNotFoundError, CollectionUnavailableError):
                self.get(name)

    def listing(self) -> tuple[list[Collection], dict[str, str]]:
        """(open collections, {name: why it cannot be opened}); ones dropped meanwhile are left out."""
        collections, broken = [], {}
        for name in self.names():
            try:
                collections.append(self.get(name))
            except CollectionNotFoundError:
                continue
            except CollectionUnavailableError:
                with self._lock:
                    if name in self._broken:
                        broken[name] = self._broken[name]
        return collections, broken

    def drop(self, name: str) -> None:
        """Remove a collection: new calls are refused at once, calls in flight finish first (or, past
        DROP_WAIT_SECONDS, the drop is refused with CollectionBusyError and the collection stays)."""
        folder = self._folder(name)
        with self._lock:
            self._refuse_while_reembedding(name)
            if name in self._busy:
                raise CollectionNotFoundError(f"no collection named '{name}' (it is being dropped or created)")
            if name not in self._open and name not in self._broken and not folder.is_dir():
                raise CollectionNotFoundError(f"no collection named '{name}'; GET /v1/collections lists them")
            self._busy.add(name)
            collection = self._open.pop(name, None)
            broken = self._broken.pop(name, None)
            retired = [r for r in self._retired if r[1].name == name]  # their files go with the folder
            self._retired = [r for r in self._retired if r[1].name != name]
        users = ([collection] if collection else []) + [c for _, c in retired]
        try:
            for user in users:
                user.stop_admitting(CollectionNotFoundError(f"collection '{name}' was dropped"))
            deadline = time.monotonic() + DROP_WAIT_SECONDS
            if not all(user.wait_idle(deadline - time.monotonic()) for user in users):
                for user in users:
                    user.readmit()
                with self._lock:
                    if collection is not None:
                        self._open[name] = collection
                    if broken is not None:
                        self._broken[name] = broken
                    self._retired.extend(retired)
                raise CollectionBusyError(
                    f"collection '{name}' still had requests running after {DROP_WAIT_SECONDS:.0f} s; "
                    "it was not dropped, retry"
                )
            for user in users:
                user.shut(snapshot=False)
            trash = self._private("dropping", name)
            os.rename(folder, trash)  # gone at once, even if the delete below is cut short
            _fsync_dir(self.root)
            shutil.rmtree(trash, ignore_errors=True)
            with self._lock:
                self._reembeds.pop(name, None)
        finally:
            with self._lock:
                self._busy.discard(name)

    # -- re-embedding --------------------------------------------------------------------

    def start_reembed(self, config: CollectionConfig, embed: EmbedFn) -> ReembedJob:
        """Start rebuilding collection `config.name` as `config` (another model) in the background.

        Refused (409) while another re-embed of it runs, when it already holds that model's
        vectors, when some items have no content to embed again, or when the new model does not
        embed some of its items' modalities. Writes are refused from here until the job ends.
        """
        name = config.name
        collection = self.get(name)
        with self._lock:
            if self._open.get(name) is not collection:  # dropped (or flipped) since the lookup
                raise CollectionNotFoundError(f"no collection named '{name}' (it is being dropped)")
            self._refuse_while_reembedding(name)
            if collection.config.model == config.model:
                raise ReembedRefusedError(f"collection '{name}' already holds vectors of {config.model}")
            collection.freeze(f"collection '{name}' is being re-embedded into {config.model}; retry writes after it")
            try:
                self._check_reembeddable(collection, config)
                config = replace(config, generation=collection.config.generation + 1)
                job = ReembedJob(collection, config, embed, self._flip, self.use_gpu)
            except BaseException:
                collection.thaw()
                raise
            self._reembeds[name] = job
        job.start()
        return job

    def _refuse_while_reembedding(self, name: str) -> None:
        job = self._reembeds.get(name)
        if job is not None and job.running:
            raise CollectionBusyError(
                f"collection '{name}' is being re-embedded into {job.config.model} "
                f"({job.progress.done}/{job.progress.total} items); GET /v1/collections/{name} shows progress"
            )

    @staticmethod
    def _check_reembeddable(collection: Collection, config: CollectionConfig) -> None:
        bare = collection.store.count_without_content()
        if bare:
            raise ReembedRefusedError(
                f"{bare} items of collection '{collection.name}' were stored as vectors, without the text or image "
                "they came from, so they cannot be embedded again; delete them or re-create the collection"
            )
        missing = [m for m in collection.store.modality_counts() if m not in config.modalities]
        if missing:
            raise ReembedRefusedError(
                f"collection '{collection.name}' holds {', '.join(missing)} items, which {config.model} does not "
                f"embed (it embeds {', '.join(config.modalities)})"
            )

    def _flip(self, job: ReembedJob) -> None:
        """Put the finished generation in the old one's place: a request that looks the collection up
        gets all of the old or all of the new; requests already holding the old one finish on it."""
        assert job.target is not None
        with self._lock:
            write_config(job.source.folder, job.config)  # on disk, the collection is now the new generation
            self._open[job.config.name] = job.target
            self._retired.append((time.monotonic(), job.source))

    def reembed_status(self, name: str) -> dict[str, Any] | None:
        job = self._reembeds.get(name)
        return job.progress.as_dict() if job is not None else None

    def _purge_retired(self, older_than: float) -> None:
        """Delete replaced generations once searches that started on them have had time to finish
        (call with the lock held)."""
        now = time.monotonic()
        keep = []
        for retired_at, collection in self._retired:
            if now - retired_at < older_than:
                keep.append((retired_at, collection))
                continue
            collection.stop_admitting(
                CollectionBusyError(f"collection '{collection.name}' was re-embedded while this request ran; retry")
            )
            if not collection.wait_idle(0):
                keep.append((retired_at, collection))  # a call still runs on it: next time
                continue
            collection.shut(snapshot=False)
            if collection.folder.exists():  # (dropped meanwhile: gone already)
                remove_generation(collection.folder, collection.config.generation)
        self._retired = keep

    def snapshot_dirty(self) -> list[str]:
        """Snapshot changed indexes (and refresh stale GPU copies); returns the names done."""
        with self._lock:
            self._purge_retired(RETIRED_GRACE_SECONDS)
        done = []
        with self._lock:
            collections = list(self._open.values())
        for collection in collections:
            try:
                if collection.dirty:
                    collection.snapshot()
                    done.append(collection.name)
                collection.index.refresh_gpu()
            except (CollectionNotFoundError, CollectionBusyError):
                continue  # dropped or replaced since the list was taken
        return done

    def close(self) -> None:
        for job in list(self._reembeds.values()):  # outside the lock: a finishing job flips under it
            job.cancel()
        with self._lock:
            for collection in self._open.values():
                collection.close()
            self._open.clear()
            self._purge_retired(0.0)
