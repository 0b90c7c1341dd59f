"""The faiss backend's manager: every collection under one folder, and the protocols by which
collections appear and disappear whole (create, drop, re-embed flip)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

from common.durable import fsync_dir
from index.backend import EmbedFn
from index.collection import Collection
from index.config import CollectionConfig, validate_collection_name
from index.errors import (
    CollectionBusyError,
    CollectionExistsError,
    CollectionNotFoundError,
    CollectionUnavailableError,
    InvalidCollectionError,
    ReembedRefusedError,
)
from index.layout import CONFIG_FILE, remove_generation, remove_stale_generations, write_config
from index.reembed import ReembedJob, busy_message

logger = logging.getLogger(__name__)

# A generation replaced by a re-embed keeps its files this long, for searches still running on it.
RETIRED_GRACE_SECONDS = 60.0
# How long a drop waits for the calls in flight on the collection before it gives up with a 409.
DROP_WAIT_SECONDS = 30.0


def _reason(exc: BaseException) -> str:
    """A one-line reason for an operator: the error's own message, else its kind."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


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

    kind: Final = "faiss"

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
            fsync_dir(self.root)
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
            fsync_dir(self.root)
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
            raise CollectionBusyError(busy_message(name, job.config.model, job.progress.done, job.progress.total))

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
