"""What the collections API does, apart from HTTP: the routes (`service/routes/collections.py`) parse a
request, call one method here and render what it returns.

A collection is pinned to the exact model version that resolved when it was created; texts and images
are embedded with that version, and a request that names another version is refused (409), because
another version's vectors live in another space. Moving a collection to another version is a re-embed:
every item is embedded again from its stored content into a new generation beside the old one, which is
swapped in when complete; writes get 409 meanwhile.

The collections themselves live in a `CollectionBackend` (`index.backend`: faiss on this machine, or
Milvus); its calls block (disk, network), so every one runs in a worker thread. Its errors
(`index.errors`) go up as they are: `service/errors.py` maps them to statuses in one table.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import anyio
import numpy as np

from encoders.contract import Modality
from index.backend import CollectionBackend, CollectionHandle, EmbedFn
from index.config import CollectionConfig
from index.engine import IndexSpec
from index.errors import BackendUnavailableError, CollectionBusyError, CollectionNotFoundError, InvalidVectorError
from index.items import HIT_DEFAULT, Hit, StoredItem
from index.payloads import PayloadLimits, check_payload
from registry.compat import QueryCompat, fit_problem, load_map, map_queries, query_compat
from registry.errors import RegistryError, UnusableMapError, VersionNotFoundError
from registry.manifest import Compatibility
from registry.names import DEFAULT_ALIAS, LATEST
from registry.store import ModelRegistry, ModelVersionInfo
from service.batching import QueueFullError
from service.collection_schemas import CollectionCreate, DeleteRequest, ItemIn, Query, SearchRequest, UpsertRequest
from service.embedding import embed_prepared
from service.errors import ApiError
from service.inputs import check_modalities, check_text, prepare
from service.limits import ImageMemoryFullError
from service.metrics import Metrics
from service.model_pool.pool import ModelPool
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class CollectionView:
    """What a collection's info is made of: its config, its stats, and a re-embed's progress if any."""

    config: CollectionConfig
    stats: dict[str, Any]
    reembed: dict[str, Any] | None = None
    compatible: list[CompatibleVersion] = dataclasses.field(default_factory=list)  # only `info` fills it


@dataclass
class Listing:
    collections: list[CollectionView]
    unavailable: dict[str, str]  # name -> why it cannot be used


@dataclass
class Upserted:
    upserted: int
    seq: int
    truncated: list[str]


@dataclass
class Deleted:
    seq: int
    ids: list[str]


@dataclass
class Page:
    items: list[StoredItem]
    next_cursor: str | None


@dataclass
class SearchResult:
    hits: list[list[Hit]]  # one list per query
    model: str | None
    collection: str
    warning: str | None  # `X-Duet-Warning`: the pinned version is untrained
    include: AbstractSet[str] = HIT_DEFAULT  # what the hits carry besides id, score and modality
    query_model: str | None = None  # the version that embedded the texts and images (pinned, or compatible)


@dataclass(frozen=True)
class QuerySide:
    """Who embeds a search's texts and images: the pinned version, or a version registered compatible with
    it (then `mapping` is its new -> old map, if it has one)."""

    ref: str | None  # None: a vector-only collection
    compatible: bool = False
    mapping: np.ndarray | None = None


@dataclass(frozen=True)
class CompatibleVersion:
    """A version whose queries may search a collection pinned to another (its manifest's claim, still valid)."""

    ref: str
    record: Compatibility


class CollectionsService:
    """The collections of one service, and the models that embed into them."""

    def __init__(
        self,
        backend: CollectionBackend,
        pool: ModelPool,
        registry: ModelRegistry,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._maps: dict[tuple[str, str], np.ndarray | None] = {}  # (version, map file) -> map; versions are immutable

    async def _get(self, name: str) -> CollectionHandle:
        return await anyio.to_thread.run_sync(self.backend.get, name)

    # -- collections -------------------------------------------------------------------

    async def create(self, body: CollectionCreate) -> CollectionView:
        """Create a collection pinned to one model version (or a vector-only one)."""
        model_ref, dim = None, body.dimension
        modalities: tuple[str, ...] = ("vector",)
        if body.model is not None or body.dimension is None:
            info = await self.pool.resolve(body.model)
            contract = info.manifest.contract
            if body.dimension is not None and body.dimension != contract.dimension:
                raise ApiError(
                    400,
                    f"dimension {body.dimension} does not match {info.ref}'s {contract.dimension}; omit it",
                    code="invalid_dimensions",
                    param="dimension",
                )
            model_ref, dim, modalities = info.ref, contract.dimension, tuple(contract.modalities)
        options = {"kind": body.index} if isinstance(body.index, str) else body.index.model_dump()
        config = CollectionConfig(
            name=body.name,
            dim=cast(int, dim),
            metric=body.metric,
            index=IndexSpec(**options),
            model=model_ref,
            modalities=modalities,
            modality_gap_correction=body.modality_gap_correction,
        )
        collection = await anyio.to_thread.run_sync(self.backend.create, config)
        return await anyio.to_thread.run_sync(_created_view, collection, self.backend.kind)

    async def info(self, name: str) -> CollectionView:
        """A collection's view, with the versions registered compatible with its pinned one."""
        collection = await self._get(name)
        view = await anyio.to_thread.run_sync(
            lambda: _view(collection, self.backend.kind, self.backend.reembed_status(name))
        )
        if collection.config.model is not None:
            view.compatible = await self.compatible_versions(collection.config.model)
        return view

    async def compatible_versions(self, pinned: str) -> list[CompatibleVersion]:
        """Every registered version whose manifest claims compatibility with `pinned`, where the claim still
        holds (`query_compat`). A scan of the registry's versions; their manifests come from the pool's cache
        (versions are immutable), so after the first scan it costs the registry's version listing alone."""
        pinned_info = await self.pool.resolve(pinned)
        pinned_sha = pinned_info.manifest.lineage.weights_sha256
        summaries = await anyio.to_thread.run_sync(self.registry.list_models)
        found = []
        for summary in summaries:
            for version in range(1, (summary.latest_version or 0) + 1):
                ref = f"{summary.name}/{version}"
                if ref == pinned:
                    continue
                try:
                    info = await self.pool.resolve(ref)
                except VersionNotFoundError:
                    continue
                except (RegistryError, OSError, ValueError) as exc:  # one unreadable version: not listed, not a 500
                    logger.warning("%s is left out of %s's compatible versions: %s", ref, pinned, exc)
                    continue
                answer = query_compat(ref, info.manifest, pinned, pinned_sha)
                if answer.allowed and answer.record is not None:
                    found.append(CompatibleVersion(ref, answer.record))
        return found

    async def listing(self) -> Listing:
        """Every collection; ones that cannot be opened are listed apart, with the reason."""
        return await anyio.to_thread.run_sync(self._listing)

    def _listing(self) -> Listing:
        opened, broken = self.backend.listing()
        broken = dict(broken)
        views = []
        for collection in opened:
            try:
                views.append(_view(collection, self.backend.kind, self.backend.reembed_status(collection.name)))
            except (CollectionNotFoundError, CollectionBusyError):
                continue  # dropped, or replaced by a re-embed, while the list was made
            except BackendUnavailableError:
                raise  # the whole backend: 503 for the listing
            except Exception as exc:  # one collection that cannot be read is listed apart, not a 500 for all
                logger.exception("collection %s cannot be listed", collection.name)
                broken[collection.name] = f"cannot be read: {type(exc).__name__}: {str(exc)[:300]}"
        return Listing(views, broken)

    async def drop(self, name: str) -> None:
        await anyio.to_thread.run_sync(self.backend.drop, name)

    async def rebuild(self, name: str) -> CollectionView:
        """Rebuild the index from the store (retrains IVF, recomputes modality centroids)."""
        collection = await self._get(name)
        await anyio.to_thread.run_sync(collection.rebuild)
        return await anyio.to_thread.run_sync(_view, collection, self.backend.kind)

    # -- re-embed ----------------------------------------------------------------------

    async def reembed(self, name: str, model: str | None) -> dict[str, Any]:
        """Start embedding every item again with another version (`model`, or the default target) in the
        background; the re-embed's progress as the API reports it."""
        collection = await self._get(name)
        target = await self._reembed_target(collection, model)
        contract = target.manifest.contract
        config = dataclasses.replace(
            collection.config, model=target.ref, dim=contract.dimension, modalities=tuple(contract.modalities)
        )
        embed = self._reembedder(asyncio.get_running_loop(), target.ref)
        job = await anyio.to_thread.run_sync(self.backend.start_reembed, config, embed)
        return job.progress.as_dict()

    async def _reembed_target(self, collection: CollectionHandle, ref: str | None) -> ModelVersionInfo:
        """The version to re-embed with, asked of the registry itself: the pool's alias answer may still be
        the old version while the watcher warms the new one, and a re-embed is for the new one."""
        if ref is None:
            if collection.config.model is None:
                raise ApiError(
                    409,
                    f"collection '{collection.name}' is vector-only (no model): there is nothing to re-embed it from",
                    code="reembed_refused",
                )
            model_name = collection.config.model.split("/")[0]
            try:
                return await anyio.to_thread.run_sync(self.registry.resolve, f"{model_name}@{DEFAULT_ALIAS}")
            except VersionNotFoundError:
                ref = f"{model_name}@{LATEST}"
        return await anyio.to_thread.run_sync(self.registry.resolve, ref)

    def _reembedder(self, loop: asyncio.AbstractEventLoop, ref: str) -> EmbedFn:
        """The job's `embed` (it runs in the job's thread): the work goes to the event loop and through the
        version's batcher, so re-embedding shares the model, its batches and its queue bound with live traffic."""

        def embed(items: list[StoredItem]) -> np.ndarray:
            return asyncio.run_coroutine_threadsafe(self._embed_stored(ref, items), loop).result()

        return embed

    async def _embed_stored(self, ref: str, items: list[StoredItem]) -> np.ndarray:
        """Vectors of stored items from their content; waits out a full queue (and a full image-memory
        budget) instead of failing the job."""
        contents = [(cast(Modality, item.modality), item.content or "") for item in items]
        labels = [f"item '{item.id}'" for item in items]
        while True:
            model = await self.pool.get(ref)
            try:
                prepared = await prepare(contents, model.encoder, self.settings, labels)
                return await embed_prepared(model, prepared)
            except (ImageMemoryFullError, QueueFullError) as exc:  # no room now: wait; any other refusal fails the job
                await asyncio.sleep(exc.retry_after)

    # -- items -------------------------------------------------------------------------

    async def upsert(self, name: str, body: UpsertRequest) -> Upserted:
        """Insert or replace items by id, embedding texts and images with the pinned version; returns once
        the write is durable."""
        settings = self.settings
        if len(body.items) > settings.max_inputs_per_request:
            raise ApiError(
                400,
                f"{len(body.items)} items in one request; at most {settings.max_inputs_per_request} "
                "(DUET_MAX_INPUTS_PER_REQUEST): send them in batches (duet index import does)",
                code="too_many_items",
                param="items",
            )
        limits = self.payload_limits()
        for i, item in enumerate(body.items):  # before any embedding; the backend's upsert checks again
            check_payload(item.payload, limits, f"items[{i}].payload")
        collection = await self._get(name)
        collection.check_writable()  # early, to spare the embedding; upsert checks again under its lock
        await self._check_pinned(collection, body.model)
        vectors: list[np.ndarray | None] = [None] * len(body.items)
        contents: list[tuple[Modality, str]] = []
        labels, positions = [], []
        for i, row in _given_vectors(collection, [item.vector for item in body.items], "items").items():
            vectors[i] = row
        for i, item in enumerate(body.items):
            if item.vector is None:
                kind: Modality = "text" if item.text is not None else "image"
                contents.append((kind, cast(str, item.text if kind == "text" else item.image)))
                labels.append(f"items[{i}].{kind}")
                positions.append(i)
        truncated_ids = []
        if contents:
            embedded, truncated = await self._embed_contents(collection, contents, labels)
            rows = collection.prepare_vectors(embedded)
            for row, position, cut in zip(rows, positions, truncated):
                vectors[position] = row
                if cut:
                    truncated_ids.append(body.items[position].id)
        stored = [
            StoredItem(
                id=item.id,
                modality=_item_modality(item),
                vector=cast(np.ndarray, vectors[i]),
                payload=item.payload,
                content=item.text if item.text is not None else item.image,
            )
            for i, item in enumerate(body.items)
        ]
        seq = await anyio.to_thread.run_sync(collection.upsert, stored, limits)
        return Upserted(upserted=len({item.id for item in body.items}), seq=seq, truncated=truncated_ids)

    def payload_limits(self) -> PayloadLimits:
        return PayloadLimits(
            max_fields=self.settings.max_payload_fields,
            max_bytes=self.settings.max_payload_bytes,
            max_key_chars=self.settings.max_payload_key_chars,
            max_collection_fields=self.settings.max_collection_fields,
        )

    async def get_item(self, name: str, item_id: str) -> StoredItem:
        collection = await self._get(name)
        return await anyio.to_thread.run_sync(collection.get, item_id)

    async def page(self, name: str, cursor: str | None, limit: int, filter: str | None) -> Page:
        """Up to `limit` items after `cursor` in id order, and the cursor of the next page if there is one;
        `filter` is JSON, as in search."""
        collection = await self._get(name)
        parsed = parse_filter(filter)

        def read() -> Page:
            items = collection.page(cursor, limit + 1, parsed)
            more = len(items) > limit
            items = items[:limit]
            return Page(items, items[-1].id if more and items else None)

        return await anyio.to_thread.run_sync(read)

    async def delete(self, name: str, body: DeleteRequest) -> Deleted:
        if body.ids is not None and len(body.ids) > self.settings.max_inputs_per_request:
            raise ApiError(
                400,
                f"{len(body.ids)} ids in one request; at most {self.settings.max_inputs_per_request} "
                "(DUET_MAX_INPUTS_PER_REQUEST): delete in batches, or by filter",
                code="too_many_items",
                param="ids",
            )
        collection = await self._get(name)
        seq, ids = await anyio.to_thread.run_sync(lambda: collection.delete(ids=body.ids, filter=body.filter))
        return Deleted(seq, ids)

    # -- search ------------------------------------------------------------------------

    async def search(self, name: str, body: SearchRequest) -> SearchResult:
        """Nearest neighbours of texts, images, vectors or stored items, across modalities."""
        settings = self.settings
        if not 1 <= body.k <= settings.max_search_k:
            raise ApiError(
                400, f"k must be between 1 and {settings.max_search_k}, got {body.k}", code="invalid_k", param="k"
            )
        queries = [body.query] if body.query is not None else body.queries or []
        if not 1 <= len(queries) <= settings.max_search_queries:
            raise ApiError(
                400,
                f"queries must hold 1 to {settings.max_search_queries} queries, got {len(queries)}",
                code="invalid_queries",
                param="queries",
            )
        _check_not_empty(queries, single=body.query is not None)
        collection = await self._get(name)
        side = await self._query_side(collection, body.model)
        vectors, modalities, exclude = await self._query_vectors(queries, collection, side)
        include = HIT_DEFAULT if body.include is None else frozenset(body.include)
        started = time.perf_counter()
        hits = await anyio.to_thread.run_sync(
            lambda: collection.search(
                vectors,
                body.k,
                query_modalities=modalities,
                filter=body.filter,
                modality=body.modality,
                nprobe=body.nprobe,
                rescore=body.rescore,
                exclude=exclude,
                include=include,
            )
        )
        self.metrics.index_search_latency.observe(time.perf_counter() - started)
        warning = await self._untrained(collection)
        return SearchResult(hits, collection.config.model, collection.name, warning, include, side.ref)

    async def _query_vectors(
        self, queries: list[Query], collection: CollectionHandle, side: QuerySide
    ) -> tuple[np.ndarray, list[str], list[str | None]]:
        """(vectors, modality of each query, id each query excludes). Texts and images are embedded by
        `side`'s version (mapped into the pinned version's space when it is a compatible one)."""
        if side.compatible:
            _refuse_given_vectors(queries, side, collection)
        rows: list[np.ndarray | None] = [None] * len(queries)
        modalities: list[str] = ["vector"] * len(queries)
        exclude: list[str | None] = [None] * len(queries)
        contents: list[tuple[Modality, str]] = []
        labels, positions = [], []
        for i, row in _given_vectors(collection, [query.vector for query in queries], "queries").items():
            rows[i] = row
        for i, query in enumerate(queries):
            if query.vector is not None:
                continue
            if query.id is not None:
                item = await anyio.to_thread.run_sync(collection.get, query.id)
                rows[i], modalities[i], exclude[i] = item.vector, item.modality, item.id
            else:
                kind: Modality = "text" if query.text is not None else "image"
                contents.append((kind, cast(str, query.text if kind == "text" else query.image)))
                labels.append(f"queries[{i}].{kind}")
                positions.append(i)
                modalities[i] = kind
        if contents:
            embedded, _ = await self._embed_contents(collection, contents, labels, side.ref)
            if side.compatible:
                embedded = map_queries(embedded, side.mapping)
            for row, position in zip(collection.prepare_vectors(embedded), positions):
                rows[position] = row
        return np.stack(cast(list[np.ndarray], rows)), modalities, exclude

    async def _untrained(self, collection: CollectionHandle) -> str | None:
        """The warning for a collection whose pinned version is untrained, as embeddings responses say."""
        if collection.config.model is None:
            return None
        info = await self.pool.resolve(collection.config.model)
        return None if info.manifest.trained else f"{info.ref} is untrained"

    # -- embedding ---------------------------------------------------------------------

    async def _check_pinned(self, collection: CollectionHandle, ref: str | None) -> None:
        """A write that names a model must name the collection's pinned version: the gallery holds one
        version's vectors (a compatible version may search it, not write to it)."""
        if ref is None:
            return
        info = await self.pool.resolve(ref)
        if info.ref != collection.config.model:
            raise ApiError(
                409,
                f"collection '{collection.name}' holds vectors of {collection.config.model or 'a vector-only space'}; "
                f"{info.ref}'s vectors live in a different space. Write with {collection.config.model or 'vectors'} "
                f"(or omit model){_move_hint(collection, info.ref)}",
                code="model_version_mismatch",
                param="model",
            )

    async def _query_side(self, collection: CollectionHandle, ref: str | None) -> QuerySide:
        """Which version embeds a search's queries: the pinned one, or the named one when its manifest claims
        compatibility with the pinned version (`registry.compat.query_compat`); else 409 with the reason."""
        pinned = collection.config.model
        if ref is None:
            return QuerySide(pinned)
        info = await self.pool.resolve(ref)
        if info.ref == pinned:
            return QuerySide(pinned)
        if pinned is None:
            await self._check_pinned(collection, ref)  # a vector-only collection: its 409
        pinned_info = await self.pool.resolve(cast(str, pinned))
        answer = query_compat(info.ref, info.manifest, pinned_info.ref, pinned_info.manifest.lineage.weights_sha256)
        if not answer.allowed:
            raise await self._incompatible(collection, info.ref, answer)
        record = cast(Compatibility, answer.record)
        try:
            mapping = await self._map(info.ref, info.path, record)
        except UnusableMapError as exc:
            raise ApiError(
                409,
                f"{info.ref} claims compatibility with {pinned}, but {exc}: search with {pinned} "
                f"(or re-register {info.ref} with a usable map)",
                code="model_version_mismatch",
                param="model",
            ) from None
        problem = fit_problem(info, mapping, f"collection '{collection.name}'", collection.config.dim)
        if problem is not None:
            raise ApiError(
                409,
                f"{info.ref} claims compatibility with {pinned}, but {problem}: search with {pinned}",
                code="model_version_mismatch",
                param="model",
            )
        return QuerySide(info.ref, compatible=True, mapping=mapping)

    async def _incompatible(self, collection: CollectionHandle, ref: str, answer: QueryCompat) -> ApiError:
        pinned = cast(str, collection.config.model)
        others = [version.ref for version in await self.compatible_versions(pinned)]
        allowed = pinned if not others else f"{pinned} or a version registered compatible with it ({', '.join(others)})"
        return ApiError(
            409,
            f"collection '{collection.name}' holds vectors of {pinned}, and {answer.reason}. Search it with "
            f"{allowed}{_move_hint(collection, ref)}",
            code="model_version_mismatch",
            param="model",
        )

    async def _map(self, ref: str, path: Path, record: Compatibility) -> np.ndarray | None:
        """A compatible version's new -> old map, read once per version."""
        key = (ref, record.map_file or "")
        if key not in self._maps:
            self._maps[key] = await anyio.to_thread.run_sync(load_map, path, record)
        return self._maps[key]

    async def _embed_contents(
        self,
        collection: CollectionHandle,
        contents: list[tuple[Modality, str]],
        labels: list[str],
        ref: str | None = None,
    ) -> tuple[np.ndarray, list[bool]]:
        """Embed texts/images with the collection's pinned version (or `ref`, a version registered compatible
        with it); (vectors, truncated flags)."""
        if collection.config.model is None:
            raise ApiError(
                400,
                f"collection '{collection.name}' is vector-only (no model): send vectors, not {labels[0]}",
                code="no_model",
                param=labels[0],
            )
        for (modality, value), label in zip(contents, labels):
            if modality == "text":
                check_text(value, label, self.settings)
        model = await self.pool.get(ref or collection.config.model)
        check_modalities(contents, model.info.manifest.contract, model.ref, labels)
        prepared = await prepare(contents, model.encoder, self.settings, labels)
        return await embed_prepared(model, prepared), prepared.truncated


def parse_filter(raw: str | None) -> dict[str, Any] | None:
    """A filter sent as JSON text (a query parameter)."""
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"filter is not valid JSON: {exc}", code="invalid_filter", param="filter") from None
    except RecursionError:
        raise ApiError(400, "filter is nested too deeply", code="invalid_filter", param="filter") from None
    return parsed


def _view(collection: CollectionHandle, kind: str, reembed: dict[str, Any] | None = None) -> CollectionView:
    stats = collection.stats()
    if isinstance(stats.get("index"), dict):
        stats["index"].setdefault("backend", kind)  # which backend holds it, on every backend
    return CollectionView(collection.config, stats, reembed)


def _created_view(collection: CollectionHandle, kind: str) -> CollectionView:
    """A new collection's view. Another request may drop it before this answer is made; the create
    still happened (201), and the answer says the collection is already gone."""
    try:
        return _view(collection, kind)
    except CollectionNotFoundError:
        return CollectionView(collection.config, {"count": 0, "dropped": True})


def _given_vectors(
    collection: CollectionHandle, values: list[list[float] | str | None], prefix: str
) -> dict[int, np.ndarray]:
    """{position: checked vector} of the entries that give a vector (`{prefix}[i].vector`)."""
    given = [i for i, value in enumerate(values) if value is not None]
    if not given:
        return {}
    matrix = _vectors(
        collection, [cast(list[float] | str, values[i]) for i in given], [f"{prefix}[{i}].vector" for i in given]
    )
    return dict(zip(given, matrix))


def _vectors(collection: CollectionHandle, values: list[list[float] | str], labels: list[str]) -> np.ndarray:
    """The given vectors (floats or base64), checked and normalised as one matrix: one `prepare_vectors` for a
    256-query batch instead of 256. When the matrix is refused, each row is checked alone to name the one
    at fault (`queries[3].vector: ...`)."""
    dim = collection.config.dim
    rows = [_decoded(value, dim, label) if isinstance(value, str) else value for value, label in zip(values, labels)]
    try:
        return collection.prepare_vectors(rows)
    except InvalidVectorError as exc:
        for row, label in zip(rows, labels):
            _vector(collection, row, label)
        raise ApiError(400, f"the given vectors: {exc}", code="invalid_vector", param=labels[0]) from None


def _vector(collection: CollectionHandle, values: list[float] | np.ndarray, label: str) -> np.ndarray:
    try:
        return collection.prepare_vectors(values)[0]
    except InvalidVectorError as exc:
        raise ApiError(400, f"{label}: {exc}", code="invalid_vector", param=label) from None


def _decoded(value: str, dim: int, label: str) -> np.ndarray:
    """A base64 vector: little-endian float32, as /v1/embeddings answers with `encoding_format: "base64"`."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(
            400,
            f"{label} is a string but not base64: send a list of numbers, or base64 of little-endian float32 "
            '(what /v1/embeddings returns with "encoding_format": "base64")',
            code="invalid_vector",
            param=label,
        ) from None
    if len(raw) != 4 * dim:
        hint = (
            " (one byte a value is a quantised output_dtype: search and upsert take float32)"
            if len(raw) < 4 * dim
            else ""
        )
        raise ApiError(
            400,
            f"{label} decodes to {len(raw)} bytes; this collection's {dim}-dimension vectors are {4 * dim} bytes "
            f"of little-endian float32{hint}",
            code="invalid_vector",
            param=label,
        )
    return np.frombuffer(raw, dtype="<f4")


def _item_modality(item: ItemIn) -> str:
    if item.vector is not None:
        return item.modality or "vector"
    return "text" if item.text is not None else "image"


def _check_not_empty(queries: list[Query], single: bool) -> None:
    """An empty text query is refused in plain words (it is what an empty search box sends)."""
    for i, query in enumerate(queries):
        if query.text == "":
            where = "the query" if single else f"query {i + 1} (queries[{i}])"
            raise ApiError(
                400,
                f"{where} is empty; type some text, or search by an image, a vector or an item id",
                code="invalid_input",
                param="query" if single else f"queries[{i}]",
            )


def _move_hint(collection: CollectionHandle, ref: str) -> str:
    """How to move a collection's gallery to another version: a re-embed."""
    if collection.config.model is None:
        return ""
    return (
        f"; to move the collection to {ref}, re-embed it (POST /v1/collections/{collection.name}/reembed "
        f'with {{"model": "{ref}"}})'
    )


def _refuse_given_vectors(queries: list[Query], side: QuerySide, collection: CollectionHandle) -> None:
    """With `model` naming a compatible version, texts and images are embedded by it; a given vector would be
    ambiguous (its vectors, or the collection's own?), so it is refused rather than guessed."""
    for i, query in enumerate(queries):
        if query.vector is not None:
            raise ApiError(
                400,
                f"queries[{i}].vector: with model {side.ref} (a version compatible with the pinned "
                f"{collection.config.model}) send texts or images; vectors must be in the collection's own space, "
                "sent without model",
                code="invalid_queries",
                param=f"queries[{i}].vector",
            )
