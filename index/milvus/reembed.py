"""Re-embedding a Milvus-backed collection into another model version, beside the live one.

Like the faiss backend's job (`index.reembed`): every item is embedded again from its stored content
into a complete new generation (physical collection `{prefix}_{name}_g{N+1}`) while searches keep using
generation N; then the flip (`MilvusBackend.flip`) writes the config row and moves the alias, so each
lookup gets all of the old or all of the new; N is dropped after a grace.

Writes are refused meanwhile on *every* replica: the job first writes the `reembed:<name>` meta row
(state running, the freeze time, a heartbeat), and every upsert and delete reads it right before
writing. A write that read it just before the freeze may still land after the copy read past it, so
after the copy the job waits until `settle_seconds` (the RPC timeout: no such write can still be in
flight later) have passed since the freeze, then catches up: rows written since shortly before the
freeze are embedded again, ids only in the new generation are deleted, ids missing from it copied.
A failure drops the half-built generation and records the state `failed`, which unfreezes writes.
A replica that dies mid-job stops its heartbeat; after `REEMBED_STALE_SECONDS` writes are allowed
again and the job reads as failed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from index.backend import EmbedFn
from index.config import CollectionConfig
from index.errors import CollectionBusyError
from index.items import StoredItem
from index.milvus import names
from index.milvus.client import message
from index.milvus.collection import MilvusCollection, now_ms, row_to_item
from index.milvus.expressions import ids_clause
from index.reembed import ReembedCancelledError, ReembedProgress

if TYPE_CHECKING:
    from index.milvus.manager import MilvusBackend

logger = logging.getLogger(__name__)

BATCH_ITEMS = 256
CLAIM_SETTLE_SECONDS = 0.5  # a start reads its re-embed row back this long after writing it (see `claim`)
SKEW_MS = 5_000  # rows written this long before the freeze are re-copied too (replica clock skew)
COPY_FIELDS = ["id", "modality", "content", "payload", "written_at"]


class MilvusReembedJob:
    PROGRESS_KEYS = ("target_model", "source_model", "total", "state", "done", "error", "started_at", "finished_at")

    def __init__(
        self, backend: MilvusBackend, source: MilvusCollection, config: CollectionConfig, embed: EmbedFn
    ) -> None:
        self.backend = backend
        self.conn = backend.conn
        self.source = source
        self.config = config  # the source's, with the new model, dimension and generation
        self.embed = embed
        self.target_physical = names.physical(backend.prefix, config.name, config.generation)
        self.settle_seconds = backend.options.timeout_seconds
        self.progress = ReembedProgress(
            target_model=config.model or "", source_model=source.config.model, total=source.count()
        )
        self.frozen_at = 0
        self.token = uuid.uuid4().hex  # which job the `reembed:<name>` row belongs to
        self._created = False
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reembed-{config.name}", daemon=True)

    @property
    def key(self) -> str:
        return f"reembed:{self.config.name}"

    @property
    def running(self) -> bool:
        return self.progress.state == "running"

    def _row(self) -> dict[str, Any]:
        return {
            **self.progress.as_dict(),
            "frozen_at": self.frozen_at,
            "heartbeat_ms": now_ms(),
            "generation": self.config.generation,
            "token": self.token,
        }

    def _save(self) -> None:
        self.backend.meta.put(self.key, self.config.name, "reembed", self._row())

    def freeze(self) -> None:
        self.frozen_at = now_ms()
        self._save()

    def claim(self) -> None:
        """After `freeze`: make sure this job is the one re-embedding. Milvus has no compare-and-set, so two
        replicas starting a re-embed of one collection at once both see none running and both write the row;
        the row keeps the last write. Each reads it back once both writes have landed (CLAIM_SETTLE_SECONDS:
        far above an RPC's latency), and only the job whose token is there goes on (the other is refused,
        and leaves the row, which is the winner's, alone)."""
        time.sleep(CLAIM_SETTLE_SECONDS)
        row = self.backend.meta.get(self.key) or {}
        if row.get("token") != self.token:
            raise CollectionBusyError(
                f"collection '{self.config.name}' is being re-embedded (started by another replica at the same "
                "moment); GET the collection for its progress"
            )

    def unfreeze_refused(self) -> None:
        """The re-embed was refused before it started: no trace of it."""
        with contextlib.suppress(Exception):
            self.backend.meta.delete([self.key])

    def start(self) -> None:
        self._thread.start()

    def cancel(self, wait: float = 30.0) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._thread.join(wait)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._copy()
            self._catch_up()
            self.backend.flip(self)
        except Exception as exc:  # reported in the job's status, never raised into a request
            logger.exception("re-embedding collection %s into %s failed", self.config.name, self.config.model)
            self._discard()
            self._finish("failed", message(exc))
        else:
            self._finish("done", None)
            logger.info(
                "collection %s re-embedded: %d items, %s -> %s",
                self.config.name,
                self.progress.done,
                self.progress.source_model,
                self.config.model,
            )

    def _finish(self, state: Literal["done", "failed"], error: str | None) -> None:
        self.progress.finish(state, error)
        try:
            self._save()
        except Exception as exc:  # Milvus down: the row's heartbeat goes stale, which unfreezes too
            logger.warning("re-embed of %s: could not record its end (%s)", self.config.name, exc)

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise ReembedCancelledError("the service is shutting down")

    def _copy(self) -> None:
        if self.conn.call("has_collection", self.target_physical):  # leftovers of an attempt cut short
            self.conn.call("drop_collection", self.target_physical)
        self.backend._create_physical(self.config, self.target_physical)
        self._created = True
        for batch in self.conn.iterate(self.source.physical, "", COPY_FIELDS, batch=BATCH_ITEMS):
            self._check_cancelled()
            self._embed_into_target(batch)
            self.progress.done += len(batch)
            self._save()  # progress for every replica, and the heartbeat

    def _embed_into_target(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        items: list[StoredItem] = [row_to_item(row, self.source.config.dim) for row in rows]
        vectors = self.backend_prepare(self.embed(items))
        data = [
            {
                "id": row["id"],
                "vector": vector.tolist(),
                "modality": row["modality"],
                "content": row.get("content"),
                "payload": row.get("payload") or {},
                "written_at": int(row.get("written_at") or 0),
            }
            for row, vector in zip(rows, vectors)
        ]
        self.conn.call("upsert", self.target_physical, data)

    def backend_prepare(self, vectors: Any) -> Any:
        from index.engine import as_matrix

        return as_matrix(vectors, self.config.dim, normalize=self.config.metric == "cosine")

    def _catch_up(self) -> None:
        """Writes that passed the writable check just before the freeze (see the module docstring)."""
        wait = self.frozen_at / 1000 + self.settle_seconds - time.time()
        while wait > 0:
            self._check_cancelled()
            time.sleep(min(wait, 0.5))
            wait = self.frozen_at / 1000 + self.settle_seconds - time.time()
            self._save()
        source_ids = set(self.source.ids(""))
        target = MilvusCollection(self.backend, self.config)
        target_ids = set(target.ids(""))
        extra = sorted(target_ids - source_ids)
        for start in range(0, len(extra), 1000):
            self.conn.call("delete", self.target_physical, filter=ids_clause(extra[start : start + 1000]))
        late = set(self.source.ids(f"written_at >= {int(self.frozen_at - SKEW_MS)}")) | (source_ids - target_ids)
        ordered = sorted(late)
        for start in range(0, len(ordered), BATCH_ITEMS):
            self._check_cancelled()
            rows = self.source.rows(ordered[start : start + BATCH_ITEMS], COPY_FIELDS)
            self._embed_into_target(list(rows.values()))
        if extra or late:
            logger.info("re-embed of %s: caught up %d late writes, %d deletes", self.config.name, len(late), len(extra))

    def _discard(self) -> None:
        """Drop the half-built generation; the source was never touched."""
        if not self._created:
            return
        with contextlib.suppress(Exception):
            self.conn.call("drop_collection", self.target_physical)
