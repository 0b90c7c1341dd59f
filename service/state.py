"""What the app's lifespan owns: registry, model pool, metrics, readiness."""

from __future__ import annotations

import asyncio
import gc
import logging
from dataclasses import dataclass, field

import anyio

from common.lifetime import DataDirLease, check_writable, hold_data_dir
from common.logs import adopt_library_loggers
from index.backend import CollectionBackend, MilvusOptions, open_backend
from index.errors import BackendUnavailableError
from registry.store import ModelRegistry
from service.bootstrap import register_default_models
from service.jobs_runtime import JobsRuntime
from service.metrics import Metrics
from service.model_pool.hot_swap import ALIAS_POLL_FLOOR_SECONDS
from service.model_pool.pool import ModelPool
from service.quantized_output import CalibrationCache, embedder
from service.settings import Settings

logger = logging.getLogger(__name__)


def open_registry(settings: Settings) -> ModelRegistry:
    """The embedded registry under the data dir, or the configured remote one."""
    return ModelRegistry.open(settings.registry_dir, settings.registry_uri, settings.artifact_uri)


class CollectionsBackendMissingError(RuntimeError):
    """The chosen collections backend's package is not installed; the message says what to install."""


def open_collections(settings: Settings) -> CollectionBackend:
    """The collections backend the settings choose (`DUET_COLLECTIONS_BACKEND`). A Milvus that is down
    must not stop start-up: the backend reports it per call (`BackendUnavailableError`, a 503)."""
    milvus = None
    if settings.collections_backend == "milvus":
        milvus = MilvusOptions(
            uri=settings.milvus_uri_or_default,
            token=settings.milvus_token.get_secret_value() if settings.milvus_token else None,
            db_name=settings.milvus_db_name,
            prefix=settings.milvus_prefix,
            timeout_seconds=settings.milvus_timeout_seconds,
        )
    try:
        return open_backend(
            settings.collections_backend, root=settings.collections_dir, use_gpu=settings.faiss_gpu, milvus=milvus
        )
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "pymilvus":
            raise CollectionsBackendMissingError(settings.missing_backend_package() or str(exc)) from None
        raise


@dataclass
class ServiceState:
    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    pool: ModelPool
    collections: CollectionBackend
    calibrations: CalibrationCache  # int8/uint8 output ranges per version; empty until such a request
    ready: bool = False
    startup_error: str | None = None
    jobs: JobsRuntime | None = None
    lease: DataDirLease | None = field(default=None, repr=False)
    _preload: asyncio.Task[None] | None = field(default=None, repr=False)
    _snapshots: asyncio.Task[None] | None = field(default=None, repr=False)
    _alias_watch: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, settings: Settings) -> ServiceState:
        """Lock the data dir, open the registry and register defaults (blocking start-up), then
        preload in the background. A second server on the same data dir is refused here, before
        it opens (and replays into) a single collection.

        The lock is the faiss backend's: its collection files have one writer. With the milvus
        backend the collections live in Milvus, replicas may share the data dir, and no lock is
        taken (`Settings.holds_data_dir_lock`)."""
        problem = settings.missing_backend_package()
        if problem:
            raise CollectionsBackendMissingError(problem)
        if not settings.holds_data_dir_lock:
            await anyio.to_thread.run_sync(check_writable, settings.data_dir)
            return await cls._open(settings)
        lease = await anyio.to_thread.run_sync(hold_data_dir, settings.data_dir)
        try:
            state = await cls._open(settings)
        except BaseException:
            lease.release()
            raise
        state.lease = lease
        return state

    @classmethod
    async def _open(cls, settings: Settings) -> ServiceState:
        registry = await anyio.to_thread.run_sync(open_registry, settings)
        if settings.register_default_models:
            await anyio.to_thread.run_sync(register_default_models, registry, settings.data_dir)
        metrics = Metrics()
        collections = await anyio.to_thread.run_sync(open_collections, settings)
        try:
            await anyio.to_thread.run_sync(collections.open_all)  # faiss: replays each index from its store
        except BackendUnavailableError as exc:
            # Milvus down: serve anyway (embeddings work; collection calls answer 503 until it is back).
            logger.warning("collections backend unavailable at start-up (%s); collection calls answer 503", exc)
        pool = ModelPool(registry, settings, metrics)
        state = cls(
            settings=settings,
            registry=registry,
            metrics=metrics,
            pool=pool,
            collections=collections,
            calibrations=CalibrationCache(embedder(settings, pool)),
        )
        adopt_library_loggers()  # MLflow and transformers are imported by now: their lines go through ours
        state.pool.set_torch_threads()
        state.jobs = await JobsRuntime.start(settings)
        state._preload = asyncio.create_task(state._preload_models())
        state._snapshots = asyncio.create_task(state._snapshot_loop())
        state._alias_watch = asyncio.create_task(state._watch_aliases())
        return state

    async def _snapshot_loop(self) -> None:
        """Snapshot changed indexes now and then, so a restart replays little."""
        while True:
            await asyncio.sleep(self.settings.snapshot_interval_seconds)
            try:
                await anyio.to_thread.run_sync(self.collections.snapshot_dirty)
            except BackendUnavailableError as exc:
                logger.warning("collections upkeep skipped: %s; will retry", exc)
            except Exception:
                logger.exception("snapshotting collections failed; will retry")

    async def _watch_aliases(self) -> None:
        """Notice alias moves by polling the registry; the pool warms the new version, then swaps."""
        while True:
            await asyncio.sleep(max(self.settings.alias_refresh_seconds, ALIAS_POLL_FLOOR_SECONDS))
            await self.pool.refresh_aliases()

    async def _preload_models(self) -> None:
        try:
            for ref in self.settings.preload_models:
                await self.pool.get(ref)
            adopt_library_loggers()
            _freeze_startup_objects()  # before ready: its one collection pauses the event loop
            self.ready = True
            logger.info("ready: %s", ", ".join(self.pool.loaded) or "no models preloaded")
        except Exception as exc:
            self.startup_error = f"preloading failed: {exc}"
            logger.exception("preloading models failed")

    async def close(self) -> None:
        gc.unfreeze()  # what start-up froze may be garbage now (models, the registry client)
        self.pool.restore_torch_threads()
        for task in (self._preload, self._snapshots, self._alias_watch):
            if task is not None and not task.done():
                task.cancel()
        if self.jobs is not None:
            await self.jobs.close()
        await self.pool.close()
        try:
            await anyio.to_thread.run_sync(self.collections.close)
        except BackendUnavailableError as exc:
            logger.warning("closing the collections backend: %s", exc)
        if self.lease is not None:
            self.lease.release()


def _freeze_startup_objects() -> None:
    """Keep the garbage collector away from what start-up created (the imports of torch,
    transformers and MLflow, the loaded models: ~800k objects): a full collection over them held
    the GIL for ~0.5 s, stalling every forward pass at once (bench/serve.py's p99). Frozen objects
    are still freed by reference counting; `close()` unfreezes them. Process-wide, like the GC."""
    gc.collect()
    gc.freeze()
    logger.debug("froze %d start-up objects out of garbage collection", gc.get_freeze_count())
