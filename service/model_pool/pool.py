"""Loaded model versions, their batchers, and the memory budget they share.

Requests name a model by reference (`minilm`, `minilm@staging`, `minilm/3`). The pool
resolves the reference through the registry, loads the version on first use (verifying its
files' hash), warms it up, and starts its batcher. Several versions can be loaded at once;
when their parameters would exceed the memory budget, the least recently used idle version
is unloaded. Aliases are resolved through the alias watcher (`hot_swap`), which alone moves
them; a version that cannot be made to fit raises the pool's own errors (`errors`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import numpy as np
from PIL import Image

from encoders.encoder import Encoder
from registry.names import parse_model_ref
from registry.store import ModelRegistry, ModelVersionInfo
from service.batching import Batcher, BatchLimits
from service.metrics import Metrics
from service.model_pool.cpu_policy import TorchThreads, default_batch_size, inference_workers
from service.model_pool.errors import ModelMemoryBudgetError, ModelMemoryBusyError
from service.model_pool.hot_swap import AliasWatcher
from service.settings import Settings

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    info: ModelVersionInfo
    encoder: Encoder
    batcher: Batcher
    memory_bytes: int
    last_used: float = field(default_factory=time.monotonic)

    @property
    def ref(self) -> str:
        return self.info.ref


def estimate_bytes(folder: Path) -> int:
    """Weights on disk approximate parameters in memory (fp32 on CPU) before loading."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)


class ModelPool:
    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._versions: dict[str, ModelVersionInfo] = {}  # "name/N" -> its record (versions are immutable)
        self.watcher = AliasWatcher(self)  # the aliases seen so far, and what each serves
        self._protected: set[str] = set()  # versions the memory budget must not evict (the old side of a swap)
        self.workers = inference_workers(settings)
        self._torch_threads = TorchThreads(settings.device, self.workers)
        self._limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size or default_batch_size(settings.device),
            max_batch_images=settings.max_batch_images,
            max_queue_items=settings.max_queue_items,
            max_queue_wait_s=settings.max_queue_wait_ms / 1000,
        )

    def set_torch_threads(self) -> None:
        self._torch_threads.split()

    def restore_torch_threads(self) -> None:
        self._torch_threads.restore()

    async def refresh_aliases(self) -> None:
        """One round of the alias watcher (see `hot_swap`)."""
        await self.watcher.refresh()

    @property
    def budget_bytes(self) -> int:
        return self.settings.model_memory_budget_mb * 1024 * 1024

    async def resolve(self, ref: str | None) -> ModelVersionInfo:
        """Reference -> version. Versions are cached for good; aliases are watched once seen."""
        parsed = parse_model_ref(ref or self.settings.default_model)
        if parsed.version is None:
            return await self.watcher.resolve(parsed)
        key = str(parsed)
        info = self._versions.get(key)
        if info is None:
            info = self._versions[key] = await anyio.to_thread.run_sync(self.registry.resolve, parsed)
        return info

    async def get(self, ref: str | None) -> LoadedModel:
        return await self.ensure_loaded(await self.resolve(ref))

    async def ensure_loaded(self, info: ModelVersionInfo) -> LoadedModel:
        """The loaded version, loading it first if needed (one load however many callers wait)."""
        model = self.loaded.get(info.ref)
        if model is None:
            model = await self._load_once(info)
        model.last_used = time.monotonic()
        return model

    def loaded_or_loading(self, ref: str) -> bool:
        return ref in self.loaded or ref in self._loading

    @contextmanager
    def keeping_loaded(self, ref: str) -> Iterator[None]:
        """While inside, the memory budget does not evict `ref` (the old side of a swap)."""
        self._protected.add(ref)
        try:
            yield
        finally:
            self._protected.discard(ref)

    async def _load_once(self, info: ModelVersionInfo) -> LoadedModel:
        task = self._loading.get(info.ref)
        if task is None:
            task = asyncio.ensure_future(self._load(info))
            self._loading[info.ref] = task
            task.add_done_callback(lambda _: self._loading.pop(info.ref, None))
        return await asyncio.shield(task)

    async def _load(self, info: ModelVersionInfo) -> LoadedModel:
        needed = estimate_bytes(info.path)
        self._make_room(needed)
        model = await anyio.to_thread.run_sync(self._load_sync, info)
        self.loaded[info.ref] = model
        self._make_room(0)  # the real size may exceed the estimate
        self._update_gauges()
        return model

    def _load_sync(self, info: ModelVersionInfo) -> LoadedModel:
        started = time.perf_counter()
        self.registry.verify(info)
        encoder = Encoder.load(
            info.path,
            device=self.settings.device,
            dtype=self.settings.dtype,
            contract=info.manifest.contract,
            packing=self.settings.text_packing,
            pack_tokens=self.settings.pack_tokens,
        )
        if self.settings.warmup:
            _warm_up(encoder)
        batcher = Batcher(
            name=info.ref,
            encode=self.watcher.announcing(info.ref, encoder.encode),
            limits=self._limits_for(encoder),
            metrics=self.metrics,
            workers=self.workers,
        )
        batcher.start()
        logger.info(
            "loaded %s on %s in %.1fs (%s)",
            info.ref,
            encoder.device,
            time.perf_counter() - started,
            "trained" if info.manifest.trained else "UNTRAINED",
        )
        return LoadedModel(info=info, encoder=encoder, batcher=batcher, memory_bytes=encoder.memory_bytes())

    def _limits_for(self, encoder: Encoder) -> BatchLimits:
        """A packed model's text batch is one pack: its budget is real tokens, and the batch size
        needs no cap of its own (no padding to bound), unless one was set."""
        if encoder.packed is None:
            return self._limits
        return replace(
            self._limits,
            packed=True,
            max_batch_tokens=self.settings.pack_tokens,
            max_batch_size=self.settings.max_batch_size or self.settings.pack_tokens,
        )

    def _make_room(self, needed: int) -> None:
        """Unload least recently used idle models until `needed` more bytes fit the budget."""
        if needed > self.budget_bytes:
            raise ModelMemoryBudgetError(
                f"the model needs about {needed // 2**20} MB, more than the whole memory budget of "
                f"{self.settings.model_memory_budget_mb} MB (DUET_MODEL_MEMORY_BUDGET_MB)"
            )
        for model in sorted(self.loaded.values(), key=lambda m: m.last_used):
            if self._used() + needed <= self.budget_bytes:
                return
            if model.batcher.pending == 0 and model.ref not in self._protected:
                self.unload(model.ref)
        if self._used() + needed > self.budget_bytes:
            raise ModelMemoryBusyError("no memory to load another model while the loaded ones are busy; retry shortly")

    def _used(self) -> int:
        return sum(m.memory_bytes for m in self.loaded.values())

    def unload(self, ref: str) -> None:
        model = self.loaded.pop(ref, None)
        if model is not None:
            model.batcher.stop()
            logger.info("unloaded %s", ref)
            self._update_gauges()

    def unload_if_idle(self, ref: str) -> None:
        """Free a version loaded only for a refused swap (unless requests by version use it meanwhile)."""
        model = self.loaded.get(ref)
        if model is not None and model.batcher.pending == 0:
            self.unload(ref)

    def _update_gauges(self) -> None:
        self.metrics.models_loaded.set(len(self.loaded))
        self.metrics.model_memory.set(self._used())

    def dead_workers(self) -> list[str]:
        return [ref for ref, m in self.loaded.items() if not m.batcher.alive]

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        for ref in list(self.loaded):
            await anyio.to_thread.run_sync(self.unload, ref)


def _warm_up(encoder: Encoder) -> None:
    """One small forward per modality, so the first request does not pay for lazy init."""
    if encoder.contract.accepts("text"):
        encoder.encode(["warm-up"] * 2, "text")
    if encoder.contract.accepts("image"):
        side = encoder.contract.image_size or 64
        encoder.encode([Image.fromarray(np.zeros((side, side, 3), dtype=np.uint8))], "image")
