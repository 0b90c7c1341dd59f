"""Hot swap: an alias moves to a new version without a failed request or a cold one.

Once an alias has been resolved, requests keep getting the version the pool holds for it,
without a registry call; the alias watcher (`AliasWatcher.refresh`, polled every
`alias_refresh_seconds` by the service state) owns alias moves. When an alias points to a new
version, the watcher loads and warms it beside the old one, checks that its vector contract
matches, and only then swaps the alias's answer (one assignment on the event loop, so it is
atomic for requests). Requests already holding the old version finish on it; a request never
waits for the new version's load. An incompatible move is refused, logged and counted, and
the old version keeps serving until the alias moves again.

Kept apart from the pool: the pool loads and evicts; this module decides when an alias may
change what it serves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from encoders.contract import VectorContract
from registry.errors import ModelNotFoundError, VersionNotFoundError
from registry.names import ModelRef
from registry.store import ModelVersionInfo
from service.batching import EncodeFn
from service.model_pool.errors import ModelMemoryBusyError, ModelPoolError

if TYPE_CHECKING:
    from service.model_pool.pool import ModelPool

logger = logging.getLogger(__name__)

# DUET_ALIAS_REFRESH_SECONDS=0 would poll the registry in a busy loop (a resolve costs ~10 ms of
# CPU with the embedded SQLite registry); the watcher waits at least this long between rounds
# (a candidate for a setting of its own).
ALIAS_POLL_FLOOR_SECONDS = 0.5


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


class AliasWatcher:
    """The aliases the pool has resolved ("name@alias" -> what it serves), and the rounds that move them."""

    def __init__(self, pool: ModelPool) -> None:
        self.pool = pool
        self.aliases: dict[str, AliasWatch] = {}
        self._announce: dict[str, str] = {}  # new version -> old one: log its first response after a swap

    async def resolve(self, parsed: ModelRef) -> ModelVersionInfo:
        """An alias seen for the first time is resolved (and then loaded) inline, as any first use;
        after that the watcher owns it, so no request resolves it to a version that is not warm yet."""
        key = str(parsed)
        watch = self.aliases.get(key)
        if watch is None:
            info = await anyio.to_thread.run_sync(self.pool.registry.resolve, parsed)
            watch = self.aliases.setdefault(key, AliasWatch(info))  # concurrent first uses: the first one wins
        return watch.info

    def announcing(self, ref: str, encode: EncodeFn) -> EncodeFn:
        """`encode`, plus one log line when the first batch after an alias swap to `ref` is answered,
        so operators see when the new version really started serving."""

        def encode_and_announce(payloads, modality):
            vectors = encode(payloads, modality)
            swapped_from = self._announce.pop(ref, None)
            if swapped_from is not None:
                logger.info("first response from %s after swap from %s", ref, swapped_from)
            return vectors

        return encode_and_announce

    async def refresh(self) -> None:
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
            target = await anyio.to_thread.run_sync(self.pool.registry.resolve, key)
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
        serving = self.pool.loaded_or_loading(old.ref)
        loaded_for_swap = serving and target.ref not in self.pool.loaded
        try:
            new_contract = await self._prepare_swap(old, target, serving)
            problems = contract_differences(self._contract_of(old), new_contract)
            if problems:
                if loaded_for_swap:
                    self.pool.unload_if_idle(target.ref)
                raise SwapRefusedError(f"vector contract differs: {'; '.join(problems)}")
        except ModelMemoryBusyError as exc:  # the budget is busy right now: try again next round (logged once)
            if watch.waiting != str(exc):
                logger.warning("alias %s: cannot load %s beside %s yet (%s); will retry", key, target.ref, old.ref, exc)
            watch.waiting = str(exc)
            return
        except ModelPoolError as exc:
            self._refuse(key, watch, target, "load", str(exc))
            return
        except SwapRefusedError as exc:
            self._refuse(key, watch, target, "contract", str(exc))
            return
        except Exception as exc:
            self._refuse(key, watch, target, "load", f"{type(exc).__name__}: {exc}")
            return
        watch.info, watch.refused, watch.waiting = target, None, None  # the swap: new requests get `target`
        self.pool.metrics.alias_swaps.labels(key).inc()
        if serving:
            self._announce[target.ref] = old.ref
        logger.info("alias %s now serves %s (was %s)", key, target.ref, old.ref)

    async def _prepare_swap(self, old: ModelVersionInfo, target: ModelVersionInfo, serving: bool) -> VectorContract:
        """Load and warm `target` if the alias is being served (keeping the old version loaded meanwhile);
        returns the new version's contract. An alias nobody embeds through is just re-pointed."""
        if not serving:
            return target.manifest.contract
        with self.pool.keeping_loaded(old.ref):
            model = await self.pool.ensure_loaded(target)
        return model.encoder.contract

    def _contract_of(self, info: ModelVersionInfo) -> VectorContract:
        loaded = self.pool.loaded.get(info.ref)
        return loaded.encoder.contract if loaded is not None else info.manifest.contract

    def _refuse(self, key: str, watch: AliasWatch, target: ModelVersionInfo, reason: str, message: str) -> None:
        """Keep serving the old version; remember the target so the next rounds do not retry it."""
        watch.refused = target.ref
        self.pool.metrics.alias_swap_failures.labels(key, reason).inc()
        logger.error(
            "not swapping alias %s from %s to %s: %s; still serving %s (a later alias move retries)",
            key,
            watch.info.ref,
            target.ref,
            message,
            watch.info.ref,
        )
