"""The FAISS side of a collection: build, mutate, search, snapshot.

Validated at the boundary (float32, C-contiguous, 2-D, right dimension); the index factory
string is stored with every snapshot so the index can be rebuilt from the store alone.
FAISS is not safe for add/remove during search, so mutations take the write side of a
readers-writer lock and searches the read side.

Kinds:
- flat:  `IDMap2,Flat`, exact inner product. The default.
- ivf:   `IVF{nlist},Flat`, trained on a sample; `nprobe` per query.
- ivfpq: `IVF{nlist},PQ{m}` for memory (about m bytes per vector).
- hnsw:  `IDMap2,HNSW{M}`. FAISS cannot remove from HNSW, so deletions are tombstones
         excluded at search time; append-mostly collections only.
- auto:  flat, rebuilt as ivf once the collection passes `auto_ivf_threshold` vectors.

Quantisation (`index.quantization`) changes what each kind stores: `int8` is FAISS's 8-bit scalar
quantiser (`IDMap2,SQ8`, `IVF{nlist},SQ8`, `IDMap2,HNSW{M}_SQ8`), `binary` one sign bit per
dimension in a binary index searched by Hamming distance (`BIDMap2,BFlat`, `BIDMap2,BHNSW{M}`; `auto`
stays a flat scan: 32x smaller than float, and FAISS's binary IVF cannot filter). `ivfpq` is already
a quantiser and takes neither.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from common.durable import fsync_dir
from index.errors import InvalidCollectionError, InvalidVectorError
from index.quantization import (
    MAX_OVERSAMPLE,
    QUANTIZATIONS,
    Quantization,
    hamming_scores,
    is_binary,
    make_binary_index,
    to_bits,
)

IndexKind = Literal["auto", "flat", "ivf", "ivfpq", "hnsw"]
_MAGIC = b"DUETIDX3"
_END = b"DUETEND3"
_DIGEST = 32  # sha256 of every byte before it


@dataclass(frozen=True)
class IndexSpec:
    kind: IndexKind = "auto"
    auto_ivf_threshold: int = 100_000
    nlist: int | None = None
    pq_m: int = 16
    hnsw_m: int = 32
    nprobe: int = 16
    ef_search: int = 128
    quantization: Quantization = "none"
    rescore: bool = True  # re-rank k * oversample quantised candidates with the stored float vectors
    oversample: int = 4
    recall_target: float | None = None  # HNSW: pick efSearch by measuring recall@10 (index.recall)

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "flat", "ivf", "ivfpq", "hnsw"):
            raise InvalidCollectionError(f"unknown index kind {self.kind!r}: use auto, flat, ivf, ivfpq or hnsw")
        if self.nprobe < 1 or self.ef_search < 1 or self.pq_m < 1 or self.hnsw_m < 2:
            raise InvalidCollectionError("nprobe, ef_search, pq_m must be >= 1 and hnsw_m >= 2")
        self._check_quantization()
        target = self.recall_target
        if target is not None:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
                raise InvalidCollectionError(f"recall_target must be a number in (0, 1], e.g. 0.95; got {target!r}")
            if self.kind != "hnsw":
                raise InvalidCollectionError(
                    f"recall_target picks HNSW's efSearch; index kind {self.kind!r} has none (use kind hnsw, or "
                    "nprobe for the IVF kinds)"
                )

    def _check_quantization(self) -> None:
        if self.quantization not in QUANTIZATIONS:
            raise InvalidCollectionError(f"unknown quantization {self.quantization!r}: use none, int8 or binary")
        if not isinstance(self.rescore, bool):
            raise InvalidCollectionError(f"rescore must be true or false, got {self.rescore!r}")
        if isinstance(self.oversample, bool) or not isinstance(self.oversample, int):
            raise InvalidCollectionError(f"oversample must be a whole number, got {self.oversample!r}")
        if not 1 <= self.oversample <= MAX_OVERSAMPLE:
            raise InvalidCollectionError(f"oversample must be between 1 and {MAX_OVERSAMPLE}, got {self.oversample}")
        if self.quantization != "none" and self.kind == "ivfpq":
            raise InvalidCollectionError(
                f"index kind ivfpq is already quantised (product quantisation) and takes no quantization "
                f"{self.quantization!r}: use kind flat, ivf, hnsw or auto with it"
            )
        if self.quantization == "binary" and self.kind == "ivf":
            raise InvalidCollectionError(
                "quantization 'binary' scans sign bits exactly (flat) or through HNSW: use index kind flat, hnsw "
                "or auto (FAISS's binary IVF cannot apply filters)"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, dim: int) -> None:
        """Refuse options that could never build an index of this dimension, for every size the collection
        may reach (`auto` turns into IVF later): checked before a collection is written, never after."""
        if self.quantization == "binary" and dim % 8:
            raise InvalidCollectionError(
                f"quantization 'binary' packs 8 dimensions per byte: the dimension must be a multiple of 8, got {dim}"
            )
        for count in {0, self.auto_ivf_threshold}:
            factory = self.factory(dim, count)
            try:
                _new_index(dim, factory)
            except (RuntimeError, ValueError) as exc:
                raise InvalidCollectionError(f"index {factory!r} cannot be built for dimension {dim}: {exc}") from None

    def effective_kind(self, count: int) -> str:
        if self.kind == "auto":
            return "ivf" if count >= self.auto_ivf_threshold and self.quantization != "binary" else "flat"
        return self.kind

    def factory(self, dim: int, count: int) -> str:
        kind = self.effective_kind(count)
        nlist = self.nlist or max(16, min(65536, int(4 * math.sqrt(max(count, 1)))))
        if self.quantization == "binary":
            return f"BIDMap2,BHNSW{self.hnsw_m}" if kind == "hnsw" else "BIDMap2,BFlat"
        sq = "SQ8" if self.quantization == "int8" else None
        if kind == "flat":
            return f"IDMap2,{sq or 'Flat'}"
        if kind == "hnsw":
            return f"IDMap2,HNSW{self.hnsw_m}" + (f"_{sq}" if sq else "")
        if kind == "ivf":
            return f"IVF{nlist},{sq or 'Flat'}"
        if dim % self.pq_m:
            raise InvalidCollectionError(f"pq_m={self.pq_m} must divide the dimension {dim}")
        return f"IVF{nlist},PQ{self.pq_m}"


# Largest vector norm under the dot metric: the product of two stays finite in float32 (< 3.4e38).
MAX_DOT_NORM = 1e18


def as_matrix(vectors: Any, dim: int, *, normalize: bool) -> np.ndarray:
    """Validate and convert to the float32, C-contiguous (n, dim) array FAISS needs."""
    try:
        matrix = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidVectorError("vectors must be lists of numbers") from None
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] != dim:
        got = matrix.shape[-1] if matrix.ndim >= 1 and matrix.size else 0
        raise InvalidVectorError(f"vectors must have {dim} dimensions; got {got}")
    if not np.isfinite(matrix).all():
        raise InvalidVectorError("vectors contain NaN or infinity")
    # In float64: a float32 norm overflows to inf past ~1.8e19 (and [3e38]*4 became zeros) and underflows
    # to 0 for tiny vectors that have a perfectly good direction.
    norms = np.linalg.norm(matrix.astype(np.float64), axis=1, keepdims=True)
    if normalize:
        if (norms == 0).any():
            raise InvalidVectorError("a zero vector has no direction; cosine similarity is undefined for it")
        matrix = matrix / norms
    elif (norms > MAX_DOT_NORM).any():
        raise InvalidVectorError(
            f"a vector's norm is {norms.max():.3g}; with the dot metric at most {MAX_DOT_NORM:.0e}, "
            "so inner products stay within float32"
        )
    return np.ascontiguousarray(matrix, dtype=np.float32)


def _new_index(dim: int, factory: str) -> Any:
    if is_binary(factory):
        return make_binary_index(dim, factory)
    return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)


class RWLock:
    """Many readers or one writer; writers are not starved by a stream of readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class FaissIndex:
    """One FAISS index plus what it needs to be snapshotted and replayed."""

    def __init__(self, dim: int, factory: str, spec: IndexSpec) -> None:
        self.dim = dim
        self.factory = factory
        self.spec = spec
        self.binary = is_binary(factory)
        self.index = _new_index(dim, factory)
        self.applied_seq = 0
        self.deleted: set[int] = set()  # HNSW tombstones only
        # HNSW's efSearch chosen from `spec.recall_target` (index.recall): ef_search, recall, k, sample, count
        self.tuning: dict[str, Any] | None = None
        self.trained_on = 0  # vectors the quantisers were trained on (0: none needed, or trained elsewhere)
        self.lock = RWLock()
        self._gpu: Any = None
        self._gpu_dirty = True

    @property
    def is_hnsw(self) -> bool:
        return "HNSW" in self.factory

    @property
    def quantized(self) -> bool:
        """Whether this index ranks approximately by codes (SQ8 or bits) rather than float vectors."""
        return self.binary or "SQ8" in self.factory

    @property
    def ef_search(self) -> int:
        """The efSearch searches use: the one measured for the recall target, else the configured one."""
        return int(self.tuning["ef_search"]) if self.tuning else self.spec.ef_search

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def live_count(self) -> int:
        return int(self.index.ntotal) - len(self.deleted)

    def train(self, sample: np.ndarray) -> None:
        if not self.index.is_trained:
            self.index.train(np.ascontiguousarray(sample, dtype=np.float32))
            self.trained_on = len(sample)

    def _codes(self, vectors: np.ndarray) -> np.ndarray:
        """What FAISS takes: float32 rows, or for a binary index their sign bits."""
        return to_bits(vectors) if self.binary else np.ascontiguousarray(vectors, dtype=np.float32)

    def add(self, vids: np.ndarray, vectors: np.ndarray) -> None:
        if len(vids) == 0:
            return
        with self.lock.write():
            self.index.add_with_ids(self._codes(vectors), vids.astype(np.int64))
            self._gpu_dirty = True

    def remove(self, vids: np.ndarray) -> None:
        if len(vids) == 0:
            return
        with self.lock.write():
            if self.is_hnsw:
                self.deleted.update(int(v) for v in vids)
            else:
                self.index.remove_ids(faiss.IDSelectorBatch(vids.astype(np.int64)))
            self._gpu_dirty = True

    def _params(self, selector: Any, nprobe: int | None, ef_search: int | None = None) -> Any:
        if "IVF" in self.factory:
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe or self.spec.nprobe)
        if self.is_hnsw:
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(ef_search or self.ef_search, 1))
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, vids) per query; `allowed` restricts candidates *before* ranking. Scores are
        inner products, estimated from the codes for quantised indexes (binary: see `hamming_scores`)."""
        with self.lock.read():
            if allowed is not None and self.deleted:
                allowed = np.setdiff1d(allowed, np.fromiter(self.deleted, dtype=np.int64))
            selector = None
            if allowed is not None:
                selector = faiss.IDSelectorBatch(allowed.astype(np.int64))
            elif self.deleted:
                selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self.deleted, dtype=np.int64)))
            params = self._params(selector, nprobe, ef_search)
            found: tuple[np.ndarray, np.ndarray]  # (scores, ids); faiss itself is untyped
            if selector is None and self._gpu is not None and not self._gpu_dirty:
                found = self._gpu.search(queries, k)
            elif self.binary:
                distances, ids = self.index.search(self._codes(queries), k, params=params)
                found = hamming_scores(distances, self.dim), ids
            else:
                found = self.index.search(queries, k, params=params)
            return found

    # -- GPU -----------------------------------------------------------------------------

    def enable_gpu(self) -> bool:
        """Clone to the GPU for unfiltered searches; the CPU index stays the persisted truth. Not HNSW and not
        quantised indexes (FAISS has no GPU version of a flat SQ8 or a binary index; they exist to save memory)."""
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1 or self.is_hnsw or self.quantized:
            return False
        with self.lock.write():
            self._gpu_resources = getattr(self, "_gpu_resources", None) or faiss.StandardGpuResources()
            self._gpu = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
            self._gpu_dirty = False
        return True

    @property
    def on_gpu(self) -> bool:
        return self._gpu is not None

    def refresh_gpu(self) -> None:
        if self._gpu is not None and self._gpu_dirty:
            self.enable_gpu()

    # -- snapshots -----------------------------------------------------------------------

    def write_snapshot(self, path: Path) -> None:
        """Atomic and streamed: FAISS writes straight into a temp file (no in-memory copy of the
        index), which is fsynced, renamed over the old snapshot, and the folder fsynced.

        Layout: MAGIC | faiss index bytes | trailer JSON (seq, factory, dim, HNSW tombstones) |
        trailer length (8 bytes) | sha256 of all the bytes before it (32) | END_MAGIC. The digest
        covers the trailer too: a flipped bit in `applied_seq` would silently skip the replay of
        acknowledged writes.
        """
        tmp = path.with_suffix(".tmp")
        digest = hashlib.sha256()
        with open(tmp, "wb") as handle:
            handle.write(_MAGIC)
            digest.update(_MAGIC)

            def write(chunk: bytes) -> int:
                digest.update(chunk)
                return handle.write(chunk)

            with self.lock.read():
                (faiss.write_index_binary if self.binary else faiss.write_index)(
                    self.index, faiss.PyCallbackIOWriter(write)
                )
                trailer = json.dumps(
                    {
                        "factory": self.factory,
                        "dim": self.dim,
                        "applied_seq": self.applied_seq,
                        "deleted": sorted(self.deleted),
                        "tuning": self.tuning,
                        "trained_on": self.trained_on,
                    }
                ).encode()
            tail = trailer + struct.pack("<Q", len(trailer))
            digest.update(tail)
            handle.write(tail + digest.digest() + _END)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @classmethod
    def read_snapshot(cls, path: Path, spec: IndexSpec) -> FaissIndex:
        """Load a snapshot; raises ValueError if it is truncated, corrupt or not ours.

        The checksum (over every byte but the end marker, which is compared) is verified in a
        streaming pass before anything in the file is believed, and FAISS then reads from the
        file, so loading needs no copy of the index beyond the index itself.
        """
        trailer, start, end = read_snapshot_trailer(path)
        with open(path, "rb") as handle:
            if handle.read(start) != _MAGIC:
                raise ValueError("not a Duet index snapshot")
            handle.seek(start)
            left = end - start

            def read(size: int) -> bytes:
                nonlocal left
                chunk = handle.read(min(size, left))
                left -= len(chunk)
                return chunk

            try:
                reader = faiss.read_index_binary if is_binary(trailer["factory"]) else faiss.read_index
                index = reader(faiss.PyCallbackIOReader(read))
            except RuntimeError as exc:
                raise ValueError(f"snapshot index unreadable: {exc}") from None
        if index.d != trailer["dim"] or not index.is_trained:
            raise ValueError(f"snapshot index has dimension {index.d}, its trailer says {trailer['dim']}")
        loaded = cls(trailer["dim"], trailer["factory"], spec)
        loaded.index = index
        loaded.applied_seq = trailer["applied_seq"]
        loaded.deleted = set(trailer["deleted"])
        loaded.tuning = trailer.get("tuning")
        trained_on = trailer.get("trained_on", 0)
        loaded.trained_on = trained_on if isinstance(trained_on, int) else 0
        return loaded


def read_snapshot_trailer(path: Path) -> tuple[dict[str, Any], int, int]:
    """(trailer, start, end) of a snapshot file's index bytes; ValueError if it is not whole, if any
    byte differs from what was written (sha256 over the whole file), or if the trailer is malformed."""
    size = path.stat().st_size
    tail = 8 + _DIGEST + len(_END)
    if size < len(_MAGIC) + tail:
        raise ValueError("not a Duet index snapshot (too short)")
    with open(path, "rb") as handle:
        magic = handle.read(len(_MAGIC))
        if magic != _MAGIC:
            old = magic[:7] == _MAGIC[:7]
            raise ValueError(
                "an older snapshot format, without a trailer checksum" if old else "not a Duet index snapshot"
            )
        handle.seek(size - _DIGEST - len(_END))
        stored, end_marker = handle.read(_DIGEST), handle.read(len(_END))
        if end_marker != _END:
            raise ValueError("snapshot truncated (no end marker)")
        handle.seek(0)
        digest = hashlib.sha256()
        remaining = size - _DIGEST - len(_END)
        while remaining:
            chunk = handle.read(min(1 << 22, remaining))
            if not chunk:
                raise ValueError("snapshot truncated")
            digest.update(chunk)
            remaining -= len(chunk)
        if digest.digest() != stored:
            raise ValueError("snapshot checksum mismatch")
        handle.seek(size - tail)
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - len(_MAGIC) - tail:
            raise ValueError("snapshot trailer length out of range")
        handle.seek(size - tail - length)
        try:
            trailer = json.loads(handle.read(length))
        except ValueError:
            raise ValueError("snapshot trailer unreadable") from None
    _check_trailer(trailer)
    return trailer, len(_MAGIC), size - tail - length


def _check_trailer(trailer: Any) -> None:
    """The trailer's fields have the types they were written with (the checksum proves the bytes,
    this proves the writer was us)."""
    ok = (
        isinstance(trailer, dict)
        and isinstance(trailer.get("factory"), str)
        and all(isinstance(trailer.get(k), int) and trailer[k] >= 0 for k in ("dim", "applied_seq"))
        and isinstance(trailer.get("deleted"), list)
        and all(isinstance(v, int) for v in trailer["deleted"])
        and _tuning_ok(trailer.get("tuning"))
    )
    if not ok:
        raise ValueError("snapshot trailer malformed")


def _tuning_ok(tuning: Any) -> bool:
    return tuning is None or (isinstance(tuning, dict) and isinstance(tuning.get("ef_search"), int))
