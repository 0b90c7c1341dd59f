"""Loaded model versions, their batchers, and the memory budget they share.

Requests name a model by reference (`minilm`, `minilm@staging`, `minilm/3`). The pool
resolves the reference through the registry, loads the version on first use (verifying its
files' hash), warms it up, and starts its batcher. Several versions can be loaded at once;
when their parameters would exceed the memory budget, the least recently used idle version
is unloaded.

Hot swap: once an alias has been resolved, requests keep getting the version the pool holds
for it, without a registry call; the alias watcher (`refresh_aliases`, polled every
`alias_refresh_seconds` by the service state) owns alias moves. When an alias points to a new
version, the watcher loads and warms it beside the old one, checks that its vector contract
matches, and only then swaps the alias's answer (one assignment on the event loop, so it is
atomic for requests). Requests already holding the old version finish on it; a request never
waits for the new version's load. An incompatible move is refused, logged and counted, and
the old version keeps serving until the alias moves again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import anyio
import numpy as np
from PIL import Image

from encoders.contract import VectorContract
from encoders.encoder import Encoder, pick_device
from registry.errors import ModelNotFoundError, VersionNotFoundError
from registry.names import ModelRef, parse_model_ref
from registry.store import ModelRegistry, ModelVersionInfo
from service.batching import Batcher, BatchLimits, EncodeFn
from service.errors import ApiError
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# DUET_ALIAS_REFRESH_SECONDS=0 would poll the registry in a busy loop (a resolve costs ~10 ms of
# CPU with the embedded SQLite registry); the watcher waits at least this long between rounds
# (a candidate for a setting of its own).
ALIAS_POLL_FLOOR_SECONDS = 0.5


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


@dataclass
class AliasWatch:
    """An alias reference the pool has resolved: the version it serves, and the last refused move."""

    info: ModelVersionInfo
    refused: str | None = None  # a target whose swap failed; retried only once the alias moves elsewhere
    registry_error: str | None = None  # logged once, not every round, while the registry is unreachable
    waiting: str | None = None  # why the new version cannot load yet (memory busy), logged once


class SwapRefusedError(Exception):
    """The new version cannot replace the old one (its vectors differ in shape or meaning)."""


def contract_differences(old: VectorContract, new: VectorContract) -> list[str]:
    """Why vectors of `new` cannot stand in for `old`'s; empty when they can.

    Clients and indexes rely on the dimension, similarity and normalisation; a new version
    may add modalities but must keep every one the old version accepted.
    """
    problems = []
    if old.dimension != new.dimension:
        problems.append(f"dimension {old.dimension} -> {new.dimension}")
    if old.similarity != new.similarity:
        problems.append(f"similarity {old.similarity} -> {new.similarity}")
    if old.normalized != new.normalized:
        problems.append(f"normalized {old.normalized} -> {new.normalized}")
    lost = [m for m in old.modalities if m not in new.modalities]
    if lost:
        problems.append(f"modalities {', '.join(old.modalities)} -> {', '.join(new.modalities)}")
    return problems


def default_batch_size(device: str) -> int:
    """Small batches on the CPU: after sorting by length, a forward pass of 16 wastes less on
    padding than one of 64 and costs no more per input (measured, see DUET_MAX_BATCH_SIZE);
    a GPU wants large ones."""
    return 256 if _on_cuda(device) else 16


def _on_cuda(device: str) -> bool:
    return pick_device(device).startswith("cuda")


def usable_cores() -> int:
    """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def inference_workers(settings: Settings) -> int:
    """Forward passes at once per model: one per core on the CPU, where a single-threaded pass per
    core beat one pass over both cores of the 2-core bench machine (bench/RESULTS.md, serve); one on
    CUDA, where one large batch keeps the device busy."""
    if settings.inference_workers:
        return settings.inference_workers
    return 1 if _on_cuda(settings.device) else usable_cores()


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
        self.aliases: dict[str, AliasWatch] = {}  # "name@alias" -> what it serves; moved by the watcher
        self._protected: set[str] = set()  # versions the memory budget must not evict (the old side of a swap)
        self._announce: dict[str, str] = {}  # new version -> old one: log its first response after a swap
        self.workers = inference_workers(settings)
        self._torch_threads_before: int | None = None
        self._limits = BatchLimits(
            max_batch_tokens=settings.max_batch_tokens,
            max_batch_size=settings.max_batch_size or default_batch_size(settings.device),
            max_batch_images=settings.max_batch_images,
            max_queue_items=settings.max_queue_items,
            max_queue_wait_s=settings.max_queue_wait_ms / 1000,
        )

    def set_torch_threads(self) -> None:
        """On the CPU, split the cores between the worker threads (torch's thread count is one
        per process; by default it would give every concurrent forward pass all the cores)."""
        import torch

        if not _on_cuda(self.settings.device):
            threads = max(1, usable_cores() // self.workers)
            self._torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
            logger.info(
                "CPU inference: %d forward passes at once per model, %d torch threads each", self.workers, threads
            )

    def restore_torch_threads(self) -> None:
        """Undo `set_torch_threads` (the process outlives the service in tests and embedders)."""
        import torch

        if self._torch_threads_before is not None:
            torch.set_num_threads(self._torch_threads_before)
            self._torch_threads_before = None

    @property
    def budget_bytes(self) -> int:
        return self.settings.model_memory_budget_mb * 1024 * 1024

    async def resolve(self, ref: str | None) -> ModelVersionInfo:
        """Reference -> version. Versions are cached for good; aliases are watched once seen."""
        parsed = parse_model_ref(ref or self.settings.default_model)
        if parsed.version is None:
            return await self._resolve_alias(parsed)
        key = str(parsed)
        info = self._versions.get(key)
        if info is None:
            info = self._versions[key] = await anyio.to_thread.run_sync(self.registry.resolve, parsed)
        return info

    async def _resolve_alias(self, parsed: ModelRef) -> ModelVersionInfo:
        """An alias seen for the first time is resolved (and then loaded) inline, as any first use;
        after that the watcher owns it, so no request resolves it to a version that is not warm yet."""
        key = str(parsed)
        watch = self.aliases.get(key)
        if watch is None:
            info = await anyio.to_thread.run_sync(self.registry.resolve, parsed)
            watch = self.aliases.setdefault(key, AliasWatch(info))  # concurrent first uses: the first one wins
        return watch.info

    async def get(self, ref: str | None) -> LoadedModel:
        info = await self.resolve(ref)
        model = self.loaded.get(info.ref)
        if model is None:
            model = await self._load_once(info)
        model.last_used = time.monotonic()
        return model

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
            encode=self._announcing(info.ref, encoder.encode),
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

    def _announcing(self, ref: str, encode: EncodeFn) -> EncodeFn:
        """`encode`, plus one log line when the first batch after an alias swap to `ref` is answered,
        so operators see when the new version really started serving."""

        def encode_and_announce(payloads, modality):
            vectors = encode(payloads, modality)
            swapped_from = self._announce.pop(ref, None)
            if swapped_from is not None:
                logger.info("first response from %s after swap from %s", ref, swapped_from)
            return vectors

        return encode_and_announce

    def _make_room(self, needed: int) -> None:
        """Unload least recently used idle models until `needed` more bytes fit the budget."""
        if needed > self.budget_bytes:
            raise ApiError(
                507,
                f"the model needs about {needed // 2**20} MB, more than the whole memory budget of "
                f"{self.settings.model_memory_budget_mb} MB (DUET_MODEL_MEMORY_BUDGET_MB)",
                code="model_memory_budget",
            )
        for model in sorted(self.loaded.values(), key=lambda m: m.last_used):
            if self._used() + needed <= self.budget_bytes:
                return
            if model.batcher.pending == 0 and model.ref not in self._protected:
                self.unload(model.ref)
        if self._used() + needed > self.budget_bytes:
            raise ApiError(
                503,
                "no memory to load another model while the loaded ones are busy; retry shortly",
                code="model_memory_busy",
                headers={"Retry-After": "5"},
            )

    def _used(self) -> int:
        return sum(m.memory_bytes for m in self.loaded.values())

    def unload(self, ref: str) -> None:
        model = self.loaded.pop(ref, None)
        if model is not None:
            model.batcher.stop()
            logger.info("unloaded %s", ref)
            self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.models_loaded.set(len(self.loaded))
        self.metrics.model_memory.set(self._used())

    # -- alias watching (hot swap) -----------------------------------------------------

    async def refresh_aliases(self) -> None:
        """One watcher round: re-resolve every alias in use and swap those that moved."""
        for key in list(self.aliases):
            try:
                await self._refresh_alias(key)
            except Exception:  # one alias's trouble must not stop the others being watched
                logger.exception("checking alias %s failed; will retry", key)

    async def _refresh_alias(self, key: str) -> None:
        watch = self.aliases.get(key)
        if watch is None:
            return
        try:
            target = await anyio.to_thread.run_sync(self.registry.resolve, key)
        except (ModelNotFoundError, VersionNotFoundError) as exc:
            self.aliases.pop(key, None)  # the next request resolves afresh (and gets its 404)
            logger.warning("alias %s no longer resolves (%s); stopped serving %s through it", key, exc, watch.info.ref)
            return
        except Exception as exc:  # registry unreachable: keep serving what we have
            if str(exc) != watch.registry_error:
                logger.warning("cannot check alias %s (%s); still serving %s", key, exc, watch.info.ref)
            watch.registry_error = str(exc)
            return
        watch.registry_error = None
        if target.ref == watch.info.ref:
            watch.refused = None  # moved back: a later move to the refused version is tried again
        elif target.ref != watch.refused:
            await self._swap(key, watch, target)

    async def _swap(self, key: str, watch: AliasWatch, target: ModelVersionInfo) -> None:
        """Warm `target` beside the version `key` serves, check its contract, then switch the alias."""
        old = watch.info
        serving = old.ref in self.loaded or old.ref in self._loading
        loaded_for_swap = serving and target.ref not in self.loaded
        try:
            new_contract = await self._prepare_swap(old, target, serving)
            problems = contract_differences(self._contract_of(old), new_contract)
            if problems:
                if loaded_for_swap:
                    self._unload_if_idle(target.ref)
                raise SwapRefusedError(f"vector contract differs: {'; '.join(problems)}")
        except ApiError as exc:
            if exc.status == 503:  # the budget is busy right now: try again next round (logged once)
                if watch.waiting != exc.message:
                    logger.warning(
                        "alias %s: cannot load %s beside %s yet (%s); will retry", key, target.ref, old.ref, exc.message
                    )
                watch.waiting = exc.message
                return
            self._refuse(key, watch, target, "load", exc.message)
            return
        except SwapRefusedError as exc:
            self._refuse(key, watch, target, "contract", str(exc))
            return
        except Exception as exc:
            self._refuse(key, watch, target, "load", f"{type(exc).__name__}: {exc}")
            return
        watch.info, watch.refused, watch.waiting = target, None, None  # the swap: new requests get `target`
        self.metrics.alias_swaps.labels(key).inc()
        if serving:
            self._announce[target.ref] = old.ref
        logger.info("alias %s now serves %s (was %s)", key, target.ref, old.ref)

    async def _prepare_swap(self, old: ModelVersionInfo, target: ModelVersionInfo, serving: bool) -> VectorContract:
        """Load and warm `target` if the alias is being served (keeping the old version loaded meanwhile);
        returns the new version's contract. An alias nobody embeds through is just re-pointed."""
        if not serving:
            return target.manifest.contract
        self._protected.add(old.ref)
        try:
            model = self.loaded.get(target.ref) or await self._load_once(target)
        finally:
            self._protected.discard(old.ref)
        model.last_used = time.monotonic()
        return model.encoder.contract

    def _contract_of(self, info: ModelVersionInfo) -> VectorContract:
        loaded = self.loaded.get(info.ref)
        return loaded.encoder.contract if loaded is not None else info.manifest.contract

    def _refuse(self, key: str, watch: AliasWatch, target: ModelVersionInfo, reason: str, message: str) -> None:
        """Keep serving the old version; remember the target so the next rounds do not retry it."""
        watch.refused = target.ref
        self.metrics.alias_swap_failures.labels(key, reason).inc()
        logger.error(
            "not swapping alias %s from %s to %s: %s; still serving %s (a later alias move retries)",
            key,
            watch.info.ref,
            target.ref,
            message,
            watch.info.ref,
        )

    def _unload_if_idle(self, ref: str) -> None:
        """Free a version loaded only for a refused swap (unless requests by version use it meanwhile)."""
        model = self.loaded.get(ref)
        if model is not None and model.batcher.pending == 0:
            self.unload(ref)

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
