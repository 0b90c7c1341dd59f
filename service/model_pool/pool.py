"""Loaded model versions, their batchers, and the memory budget they share.

Requests name a model by reference (`minilm`, `minilm@staging`, `minilm/3`). The pool
resolves the reference through the registry, loads the version on first use (verifying its
files' hash), warms it up, and starts its batcher. Several versions can be loaded at once;
when their parameters would exceed the memory budget, the least recently used idle version
is unloaded. Aliases are resolved through the alias watcher (`hot_swap`), which alone moves
them; a version that cannot be made to fit raises the pool's own errors (`errors`).

A reference may end in a variant (`minilm/1:onnx-int8`, `minilm:openvino-int8`; encoders/variants.py):
the reference before ':' resolves as usual (aliases watched the same way), then the version's
variant is loaded under its own key, only if its fidelity gate passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import numpy as np
from PIL import Image

from encoders.encoder import Encoder
from encoders.errors import RuntimeMissingError, VariantSpecError
from encoders.variants import VariantSpec, split_variant
from registry.errors import InvalidNameError
from registry.names import parse_model_ref
from registry.store import ModelRegistry, ModelVersionInfo, VariantInfo
from service.batching import Batcher, BatchLimits
from service.metrics import Metrics
from service.model_pool.cpu_policy import TorchThreads, default_batch_size, inference_workers, usable_cores
from service.model_pool.errors import ModelMemoryBudgetError, ModelMemoryBusyError, VariantUnavailableError
from service.model_pool.hot_swap import AliasWatcher
from service.settings import Settings

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")


@dataclass
class LoadedModel:
    info: ModelVersionInfo
    encoder: Encoder
    batcher: Batcher
    memory_bytes: int
    last_used: float = field(default_factory=time.monotonic)
    variant: VariantInfo | None = None  # set when a runtime variant of `info` answers

    @property
    def ref(self) -> str:
        return self.variant.ref if self.variant is not None else self.info.ref


def split_reference(ref: str) -> tuple[str, VariantSpec | None]:
    """The reference before ':' and the variant after it; a malformed variant is a bad reference (400)."""
    try:
        return split_variant(ref)
    except VariantSpecError as exc:
        raise InvalidNameError(str(exc)) from None


def refused_message(variant: VariantInfo) -> str:
    fidelity = variant.record.fidelity
    return (
        f"{variant.ref} is not served: its fidelity gate refused it ({'; '.join(fidelity.reasons)}; measured "
        f"cosine to fp32 min {fidelity.cosine_min:.4f}, STS Spearman {fidelity.spearman:.2f} vs fp32 "
        f"{fidelity.spearman_fp32:.2f}). Ask for {variant.version.ref} itself or another variant"
    )


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
        """Reference -> version (a variant's version: what collections pin). Versions are cached
        for good; aliases are watched once seen."""
        base, _ = split_reference(ref or self.settings.default_model)
        parsed = parse_model_ref(base)
        if parsed.version is None:
            return await self.watcher.resolve(parsed)
        key = str(parsed)
        info = self._versions.get(key)
        if info is None:
            info = self._versions[key] = await anyio.to_thread.run_sync(self.registry.resolve, parsed)
        return info

    async def get(self, ref: str | None) -> LoadedModel:
        base, spec = split_reference(ref or self.settings.default_model)
        info = await self.resolve(base)
        if spec is None:
            return await self.ensure_loaded(info)
        return await self.ensure_variant_loaded(info, spec)

    async def ensure_loaded(self, info: ModelVersionInfo) -> LoadedModel:
        """The loaded version, loading it first if needed (one load however many callers wait)."""
        model = self.loaded.get(info.ref)
        if model is None:
            model = await self._load_once(info.ref, info.path, lambda: self._load_sync(info))
        model.last_used = time.monotonic()
        return model

    async def ensure_variant_loaded(self, info: ModelVersionInfo, spec: VariantSpec) -> LoadedModel:
        """The loaded variant of `info`, if its record says the fidelity gate passed and its runtime
        is installed here; otherwise `VariantUnavailableError` saying why (with the gate's numbers)."""
        key = f"{info.ref}:{spec.name}"
        model = self.loaded.get(key)
        if model is None:
            variant = await anyio.to_thread.run_sync(self.registry.get_variant, info, spec.name)
            if not variant.record.fidelity.passed:
                raise VariantUnavailableError(refused_message(variant))
            model = await self._load_once(key, variant.path, lambda: self._load_variant_sync(variant, spec))
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

    async def _load_once(self, key: str, folder: Path, load: Callable[[], LoadedModel]) -> LoadedModel:
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, folder, load))
            self._loading[key] = task
            task.add_done_callback(lambda _: self._loading.pop(key, None))
        return await asyncio.shield(task)

    async def _load(self, key: str, folder: Path, load: Callable[[], LoadedModel]) -> LoadedModel:
        needed = estimate_bytes(folder)
        self._make_room(needed)
        model = await anyio.to_thread.run_sync(load)
        self.loaded[key] = model
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
        return self._serve(info, None, encoder, started)

    def _load_variant_sync(self, variant: VariantInfo, spec: VariantSpec) -> LoadedModel:
        """A runtime variant: the version's files and the variant's both verified, on the CPU, with
        the cores split between the batcher's workers as for torch."""
        from encoders.runtime import load_variant_encoder

        started = time.perf_counter()
        info = variant.version
        self.registry.verify(info)
        self.registry.verify_variant(variant)
        try:
            encoder = load_variant_encoder(
                info.path,
                variant.path,
                spec,
                threads=max(1, usable_cores() // self.workers),
                contract=info.manifest.contract,
            )
        except RuntimeMissingError as exc:
            raise VariantUnavailableError(f"{variant.ref} cannot be served by this server: {exc}") from None
        return self._serve(info, variant, encoder, started)

    def _serve(
        self, info: ModelVersionInfo, variant: VariantInfo | None, encoder: Encoder, started: float
    ) -> LoadedModel:
        """Warm the encoder up and start its batcher."""
        ref = variant.ref if variant is not None else info.ref
        if self.settings.warmup:
            _warm_up(encoder)
        batcher = Batcher(
            name=ref,
            encode=self.watcher.announcing(ref, encoder.encode),
            limits=self._limits_for(encoder),
            metrics=self.metrics,
            workers=self.workers,
        )
        batcher.start()
        logger.info(
            "loaded %s on %s in %.1fs (%s)",
            ref,
            encoder.device,
            time.perf_counter() - started,
            "trained" if info.manifest.trained else "UNTRAINED",
        )
        model = LoadedModel(info=info, encoder=encoder, batcher=batcher, memory_bytes=encoder.memory_bytes())
        model.variant = variant
        return model

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
