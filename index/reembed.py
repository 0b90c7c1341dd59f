"""Re-embedding a collection into another model version, beside the live one.

A new model version is a new vector space, so a collection moves to it by embedding every
item again from its stored content. The job builds a complete new generation of the
collection (store, index, snapshot in `gen-N/` inside the collection's folder) while searches
keep using the old one; then the manager flips, under its lock, the open collection and the
`collection.json` that names the generation (one atomic rename), so a search, and a restart,
sees either the whole old collection or the whole new one. Old and new never share a file
path, so nothing that still holds the old one (a search in flight, an SQLite connection
closing late) can touch the new one's files; the old generation is deleted after a grace.

Writes during the rebuild are refused (`CollectionBusyError`, HTTP 409), checked under the
collection's writer lock: every write is either in the store before the copy starts or
refused, so none is lost and none lands in the old space after the copy read past it.
(Replaying the op log after the bulk copy would keep writes open, at the price of a catch-up
loop and a final catch-up under the writer lock; refusing is simpler and clearly correct.)
A failure removes the staging folder and thaws the old collection, untouched.

The job knows nothing about models: the service passes `embed`, which turns items (their
modality and content) into vectors with the target version.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from index.backend import EmbedFn
from index.collection import Collection
from index.config import CollectionConfig
from index.items import StoredItem
from index.layout import data_folder

logger = logging.getLogger(__name__)

BATCH_ITEMS = 256  # items read, embedded and written per step (progress moves in these steps)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ReembedCancelledError(Exception):
    """The service is shutting down; the old collection stays as it was."""


@dataclass
class ReembedProgress:
    """What `GET /v1/collections/{name}` reports about the collection's last re-embed."""

    target_model: str
    source_model: str | None
    total: int
    state: Literal["running", "done", "failed"] = "running"
    done: int = 0
    error: str | None = None
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def finish(self, state: Literal["done", "failed"], error: str | None) -> None:
        """The job's end; `state` last, so a reader that sees it finished sees its error and time too."""
        self.error = error
        self.finished_at = _now()
        self.state = state


def busy_message(name: str, target_model: str | None, done: int, total: int) -> str:
    """Why a drop or a second re-embed is refused while one runs (both backends say the same)."""
    return (
        f"collection '{name}' is being re-embedded into {target_model} ({done}/{total} items); "
        f"GET /v1/collections/{name} shows progress"
    )


class ReembedJob:
    """One re-embed in its own thread: copy with the new model into a new generation, then `flip`."""

    def __init__(
        self,
        source: Collection,
        config: CollectionConfig,
        embed: EmbedFn,
        flip: Callable[[ReembedJob], None],
        use_gpu: bool = False,
    ) -> None:
        self.source = source
        self.config = config  # the source's, with the new model, dimension and generation
        self.embed = embed
        self.flip = flip
        self.use_gpu = use_gpu
        self.target: Collection | None = None  # the new generation, open; installed by `flip`
        self.progress = ReembedProgress(
            target_model=config.model or "", source_model=source.config.model, total=source.store.count()
        )
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"reembed-{source.name}", daemon=True)

    @property
    def running(self) -> bool:
        return self.progress.state == "running"

    def start(self) -> None:
        self._thread.start()

    def cancel(self, wait: float = 30.0) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._thread.join(wait)

    def _run(self) -> None:
        try:
            with self.source.using():  # a drop or close waits for the copy (drops are refused meanwhile anyway)
                self._copy()
            self.flip(self)
        except Exception as exc:  # the job's error is reported in its status, never raised into a request
            logger.exception("re-embedding collection %s into %s failed", self.source.name, self.config.model)
            self._discard()
            self.source.thaw()
            self._finish("failed", getattr(exc, "message", None) or str(exc) or type(exc).__name__)
        else:
            self._finish("done", None)
            logger.info(
                "collection %s re-embedded: %d items, %s -> %s",
                self.source.name,
                self.progress.done,
                self.progress.source_model,
                self.config.model,
            )

    def _finish(self, state: Literal["done", "failed"], error: str | None) -> None:
        self.progress.finish(state, error)

    def _copy(self) -> None:
        """Every item, embedded again from its content, into the new generation."""
        staging = data_folder(self.source.folder, self.config.generation)
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of an attempt cut short
        staging.mkdir(parents=True)
        target = self.target = Collection(self.source.folder, self.config, self.use_gpu)
        for batch in self.source.store.iter_contents(BATCH_ITEMS):
            if self._cancelled.is_set():
                raise ReembedCancelledError("the service is shutting down")
            vectors = target.prepare_vectors(self.embed(batch))
            target.upsert(
                [
                    StoredItem(id=i.id, modality=i.modality, vector=v, payload=i.payload, content=i.content)
                    for i, v in zip(batch, vectors)
                ]
            )
            self.progress.done += len(batch)
        target.rebuild()  # the index kind for the final size, modality centroids over all items, a snapshot

    def _discard(self) -> None:
        """Remove the half-built generation; the source was never touched."""
        if self.target is not None:
            self.target.store.close()
        shutil.rmtree(data_folder(self.source.folder, self.config.generation), ignore_errors=True)
