"""Collections: create/list/drop, upsert/get/page/delete items, cross-modal search.

A collection is pinned to the exact model version that resolved when it was created; texts
and images are embedded with that version, and a request that names another version is
refused (409), because another version's vectors live in another space. Moving a collection
to another version is a re-embed (`POST /v1/collections/{name}/reembed`): every item is
embedded again from its stored content into a new collection beside the old one, which is
swapped in when complete (see `index/reembed.py`); writes get 409 meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, cast

import anyio
import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi import Query as QueryParam
from fastapi.responses import Response

from encoders.contract import Modality
from index.collection import Collection
from index.config import CollectionConfig
from index.engine import IndexSpec
from index.errors import CollectionBusyError, CollectionNotFoundError, InvalidVectorError, ReembedRefusedError
from index.items import StoredItem
from index.payloads import PayloadLimits, check_payload
from index.reembed import EmbedFn
from registry.errors import VersionNotFoundError
from registry.names import DEFAULT_ALIAS, LATEST
from registry.store import ModelRegistry, ModelVersionInfo
from service.body import body_schema, parse_body
from service.collection_schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    DeleteRequest,
    DeleteResponse,
    ItemIn,
    ItemOut,
    ItemPage,
    Query,
    ReembedRequest,
    ReembedStatus,
    SearchRequest,
    SearchResponse,
    UnavailableCollection,
    UpsertRequest,
    UpsertResponse,
)
from service.deps import PoolDep, SettingsDep, StateDep, require_json
from service.embedding import embed_prepared
from service.errors import ApiError
from service.inputs import check_modalities, check_text, prepare
from service.model_pool import ModelPool
from service.settings import Settings

router = APIRouter(tags=["collections"])
JSON = [Depends(require_json)]


def _info(collection: Collection, reembed: dict[str, Any] | None = None) -> CollectionInfo:
    return _info_of(collection.config, collection.stats(), reembed)


def _created_info(collection: Collection) -> CollectionInfo:
    """A new collection's info. Another request may drop it before this answer is made; the create
    still happened (201), and the answer says the collection is already gone."""
    try:
        return _info(collection)
    except CollectionNotFoundError:
        return _info_of(collection.config, {"count": 0, "dropped": True})


def _info_of(config: CollectionConfig, stats: dict[str, Any], reembed: dict[str, Any] | None = None) -> CollectionInfo:
    return CollectionInfo(
        name=config.name,
        model=config.model,
        dimension=config.dim,
        metric=config.metric,
        modalities=list(config.modalities),
        index=config.index.as_dict(),
        modality_gap_correction=config.modality_gap_correction,
        created_at=config.created_at,
        count=stats["count"],
        stats=stats,
        reembed=ReembedStatus(**reembed) if reembed else None,
    )


async def _collection(state, name: str) -> Collection:
    return await anyio.to_thread.run_sync(state.collections.get, name)


@router.post("/v1/collections", response_model=CollectionInfo, status_code=201, dependencies=JSON)
async def create_collection(body: CollectionCreate, state: StateDep, pool: PoolDep) -> CollectionInfo:
    """Create a collection pinned to one model version (or a vector-only one)."""
    model_ref, dim, modalities = None, body.dimension, ("vector",)
    if body.model is not None or body.dimension is None:
        info = await pool.resolve(body.model)
        contract = info.manifest.contract
        if body.dimension is not None and body.dimension != contract.dimension:
            raise ApiError(
                400,
                f"dimension {body.dimension} does not match {info.ref}'s {contract.dimension}; omit it",
                code="invalid_dimensions",
                param="dimension",
            )
        model_ref, dim, modalities = info.ref, contract.dimension, contract.modalities
    options = {"kind": body.index} if isinstance(body.index, str) else body.index.model_dump()
    config = CollectionConfig(
        name=body.name,
        dim=dim,
        metric=body.metric,
        index=IndexSpec(**options),
        model=model_ref,
        modalities=tuple(modalities),
        modality_gap_correction=body.modality_gap_correction,
    )
    collection = await anyio.to_thread.run_sync(state.collections.create, config)
    return await anyio.to_thread.run_sync(_created_info, collection)


@router.get("/v1/collections", response_model=CollectionList)
async def list_collections(state: StateDep) -> CollectionList:
    """Every collection; ones that cannot be opened are listed apart, with the reason."""
    return await anyio.to_thread.run_sync(_listing, state.collections)


def _listing(collections: Any) -> CollectionList:
    opened, broken = collections.listing()
    data = []
    for collection in opened:
        try:
            data.append(_info(collection, collections.reembed_status(collection.name)))
        except (CollectionNotFoundError, CollectionBusyError):
            continue  # dropped, or replaced by a re-embed, while the list was made
    unavailable = [UnavailableCollection(name=name, error=error) for name, error in sorted(broken.items())]
    return CollectionList(data=data, unavailable=unavailable)


@router.get("/v1/collections/{name}", response_model=CollectionInfo)
async def get_collection(name: str, state: StateDep) -> CollectionInfo:
    collection = await _collection(state, name)
    return await anyio.to_thread.run_sync(_info, collection, state.collections.reembed_status(name))


@router.delete("/v1/collections/{name}")
async def drop_collection(name: str, state: StateDep) -> dict[str, Any]:
    with _reembed_conflicts():
        await anyio.to_thread.run_sync(state.collections.drop, name)
    return {"deleted": name}


@contextmanager
def _reembed_conflicts() -> Iterator[None]:
    """Re-embed conflicts are 409s with the index's own message (service/errors.py maps the other
    index errors; these two are handled here until it lists them)."""
    try:
        yield
    except CollectionBusyError as exc:
        raise ApiError(409, str(exc), code="collection_busy") from None
    except ReembedRefusedError as exc:
        raise ApiError(409, str(exc), code="reembed_refused") from None


def _optional_body(model: type[ReembedRequest]) -> dict[str, Any]:
    """`body_schema`, for a body that may be left out."""
    extra = body_schema(model)
    extra["requestBody"]["required"] = False
    return extra


@router.post(
    "/v1/collections/{name}/reembed",
    response_model=ReembedStatus,
    status_code=202,
    openapi_extra=_optional_body(ReembedRequest),
)
async def reembed_collection(
    name: str, request: Request, state: StateDep, pool: PoolDep, settings: SettingsDep
) -> ReembedStatus:
    """Embed every item again with another model version, in the background; the collection flips to
    the new version when all items are done (searches keep using the old one until then, writes get 409).
    `GET /v1/collections/{name}` shows progress in `reembed`."""
    body = await _reembed_body(request)
    collection = await _collection(state, name)
    target = await _reembed_target(state.registry, collection, body.model)
    contract = target.manifest.contract
    config = dataclasses.replace(
        collection.config, model=target.ref, dim=contract.dimension, modalities=tuple(contract.modalities)
    )
    embed = _reembedder(asyncio.get_running_loop(), pool, settings, target.ref)
    with _reembed_conflicts():
        job = await anyio.to_thread.run_sync(state.collections.start_reembed, config, embed)
    return ReembedStatus(**job.progress.as_dict())


async def _reembed_body(request: Request) -> ReembedRequest:
    """The body is optional: none (or an empty one) means the default target."""
    if not (await request.body()).strip():
        return ReembedRequest()
    await require_json(request)
    return await parse_body(request, ReembedRequest)


async def _reembed_target(registry: ModelRegistry, collection: Collection, ref: str | None) -> ModelVersionInfo:
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
            return await anyio.to_thread.run_sync(registry.resolve, f"{model_name}@{DEFAULT_ALIAS}")
        except VersionNotFoundError:
            ref = f"{model_name}@{LATEST}"
    return await anyio.to_thread.run_sync(registry.resolve, ref)


def _reembedder(loop: asyncio.AbstractEventLoop, pool: ModelPool, settings: Settings, ref: str) -> EmbedFn:
    """The job's `embed` (it runs in the job's thread): the work goes to the event loop and through the
    version's batcher, so re-embedding shares the model, its batches and its queue bound with live traffic."""

    def embed(items: list[StoredItem]) -> np.ndarray:
        return asyncio.run_coroutine_threadsafe(_embed_stored(pool, settings, ref, items), loop).result()

    return embed


async def _embed_stored(pool: ModelPool, settings: Settings, ref: str, items: list[StoredItem]) -> np.ndarray:
    """Vectors of stored items from their content; waits out a full queue instead of failing the job."""
    contents = [(cast(Modality, item.modality), item.content or "") for item in items]
    labels = [f"item '{item.id}'" for item in items]
    while True:
        model = await pool.get(ref)
        prepared = await prepare(contents, model.encoder, settings, labels)
        try:
            return await embed_prepared(model, prepared)
        except ApiError as exc:
            if exc.status != 429:
                raise
            await asyncio.sleep(float((exc.headers or {}).get("Retry-After", 1)))


@router.post("/v1/collections/{name}/rebuild", response_model=CollectionInfo)
async def rebuild_collection(name: str, state: StateDep) -> CollectionInfo:
    """Rebuild the index from the store (retrains IVF, recomputes modality centroids)."""
    collection = await _collection(state, name)
    await anyio.to_thread.run_sync(collection.rebuild)
    return await anyio.to_thread.run_sync(_info, collection)


# -- items ---------------------------------------------------------------------------


async def _check_model(pool: ModelPool, collection: Collection, ref: str | None) -> None:
    if ref is None:
        return
    info = await pool.resolve(ref)
    if info.ref != collection.config.model:
        raise ApiError(
            409,
            f"collection '{collection.name}' holds vectors of {collection.config.model or 'a vector-only space'}; "
            f"{info.ref}'s vectors live in a different space. Use {collection.config.model} or re-embed the "
            "collection into a new one",
            code="model_version_mismatch",
            param="model",
        )


async def _embed_contents(
    pool: ModelPool,
    collection: Collection,
    settings: Settings,
    contents: list[tuple[Modality, str]],
    labels: list[str],
) -> tuple[np.ndarray, list[bool]]:
    """Embed texts/images with the collection's pinned version; (vectors, truncated flags)."""
    if collection.config.model is None:
        raise ApiError(
            400,
            f"collection '{collection.name}' is vector-only (no model): send vectors, not {labels[0]}",
            code="no_model",
            param=labels[0],
        )
    for (modality, value), label in zip(contents, labels):
        if modality == "text":
            check_text(value, label, settings)
    model = await pool.get(collection.config.model)
    check_modalities(contents, model.info.manifest.contract, model.ref, labels)
    prepared = await prepare(contents, model.encoder, settings, labels)
    return await embed_prepared(model, prepared), prepared.truncated


def _vector(collection: Collection, values: list[float], label: str) -> np.ndarray:
    try:
        return collection.prepare_vectors(values)[0]
    except InvalidVectorError as exc:
        raise ApiError(400, f"{label}: {exc}", code="invalid_vector", param=label) from None


@router.put(
    "/v1/collections/{name}/items",
    response_model=UpsertResponse,
    dependencies=JSON,
    openapi_extra=body_schema(UpsertRequest),
)
async def upsert_items(
    name: str, request: Request, state: StateDep, pool: PoolDep, settings: SettingsDep
) -> UpsertResponse:
    """Insert or replace items by id. The reply comes after the write is durable."""
    body = await parse_body(request, UpsertRequest)
    if len(body.items) > settings.max_inputs_per_request:
        raise ApiError(
            400,
            f"{len(body.items)} items in one request; at most {settings.max_inputs_per_request} "
            "(DUET_MAX_INPUTS_PER_REQUEST): send them in batches (duet index import does)",
            code="too_many_items",
            param="items",
        )
    limits = _payload_limits(settings)
    for i, item in enumerate(body.items):  # before any embedding; Collection.upsert checks again
        check_payload(item.payload, limits, f"items[{i}].payload")
    collection = await _collection(state, name)
    with _reembed_conflicts():
        collection.check_writable()  # early, to spare the embedding; upsert checks again under its lock
    await _check_model(pool, collection, body.model)
    vectors: list[np.ndarray | None] = [None] * len(body.items)
    contents, labels, positions = [], [], []
    for i, item in enumerate(body.items):
        if item.vector is not None:
            vectors[i] = _vector(collection, item.vector, f"items[{i}].vector")
        else:
            kind: Modality = "text" if item.text is not None else "image"
            contents.append((kind, item.text if kind == "text" else item.image))
            labels.append(f"items[{i}].{kind}")
            positions.append(i)
    truncated_ids = []
    if contents:
        embedded, truncated = await _embed_contents(pool, collection, settings, contents, labels)
        rows = collection.prepare_vectors(embedded)
        for row, position, cut in zip(rows, positions, truncated):
            vectors[position] = row
            if cut:
                truncated_ids.append(body.items[position].id)
    stored = [
        StoredItem(
            id=item.id,
            modality=_item_modality(item),
            vector=vectors[i],
            payload=item.payload,
            content=item.text if item.text is not None else item.image,
        )
        for i, item in enumerate(body.items)
    ]
    with _reembed_conflicts():
        seq = await anyio.to_thread.run_sync(collection.upsert, stored, limits)
    return UpsertResponse(upserted=len({item.id for item in body.items}), seq=seq, truncated=truncated_ids)


def _payload_limits(settings: Settings) -> PayloadLimits:
    return PayloadLimits(
        max_fields=settings.max_payload_fields,
        max_bytes=settings.max_payload_bytes,
        max_key_chars=settings.max_payload_key_chars,
        max_collection_fields=settings.max_collection_fields,
    )


def _item_modality(item: ItemIn) -> str:
    if item.vector is not None:
        return item.modality or "vector"
    return "text" if item.text is not None else "image"


def _item_out(item: StoredItem, with_vector: bool) -> ItemOut:
    return ItemOut(
        id=item.id,
        modality=item.modality,
        payload=item.payload,
        content=item.content,
        vector=item.vector.tolist() if with_vector else None,
    )


def _item_dict(item: StoredItem, with_vector: bool) -> dict[str, Any]:
    """`_item_out` as a dict for orjson."""
    vector = item.vector.tolist() if with_vector else None  # the same numbers, as text too, as a single GET
    return {
        "id": item.id,
        "modality": item.modality,
        "payload": item.payload,
        "content": item.content,
        "vector": vector,
    }


# `:path`: an id may hold '/' (sent as %2F or plainly); '.' and '..' segments are refused at write time.
@router.get("/v1/collections/{name}/items/{item_id:path}", response_model=ItemOut)
async def get_item(name: str, item_id: str, state: StateDep, with_vector: bool = False) -> ItemOut:
    collection = await _collection(state, name)
    return _item_out(await anyio.to_thread.run_sync(collection.get, item_id), with_vector)


def _parse_filter(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"filter is not valid JSON: {exc}", code="invalid_filter", param="filter") from None
    except RecursionError:
        raise ApiError(400, "filter is nested too deeply", code="invalid_filter", param="filter") from None
    return parsed


@router.get("/v1/collections/{name}/items", response_model=ItemPage)
async def list_items(
    name: str,
    state: StateDep,
    cursor: str | None = None,
    limit: Annotated[int, QueryParam(ge=1, le=1000)] = 100,
    filter: Annotated[str | None, QueryParam(description="JSON filter, as in search")] = None,
    with_vector: bool = False,
) -> Response:
    """Items in id order; pass `next_cursor` back as `cursor` for the next page."""
    collection = await _collection(state, name)
    parsed = _parse_filter(filter)

    def page_body() -> bytes:
        # In this thread and with orjson, as search does: a page of 1000 items with 64 KiB payloads
        # and 4096-dimension vectors is ~95 MB of JSON, which through pydantic on the event loop
        # stalled every other request for about a second (16x that at 65536 dimensions).
        items = collection.page(cursor, limit + 1, parsed)
        more = len(items) > limit
        items = items[:limit]
        return orjson.dumps(
            {
                "items": [_item_dict(i, with_vector) for i in items],
                "next_cursor": items[-1].id if more and items else None,
            }
        )

    return Response(await anyio.to_thread.run_sync(page_body), media_type="application/json")


@router.post("/v1/collections/{name}/items/delete", response_model=DeleteResponse, dependencies=JSON)
async def delete_items(name: str, body: DeleteRequest, state: StateDep, settings: SettingsDep) -> DeleteResponse:
    if body.ids is not None and len(body.ids) > settings.max_inputs_per_request:
        raise ApiError(
            400,
            f"{len(body.ids)} ids in one request; at most {settings.max_inputs_per_request} "
            "(DUET_MAX_INPUTS_PER_REQUEST): delete in batches, or by filter",
            code="too_many_items",
            param="ids",
        )
    collection = await _collection(state, name)
    with _reembed_conflicts():
        seq, ids = await anyio.to_thread.run_sync(lambda: collection.delete(ids=body.ids, filter=body.filter))
    return DeleteResponse(deleted=len(ids), ids=ids, seq=seq)


# -- search --------------------------------------------------------------------------


async def _query_vectors(
    queries: list[Query], collection: Collection, pool: ModelPool, settings: Settings
) -> tuple[np.ndarray, list[str], list[str | None]]:
    """(vectors, modality of each query, id each query excludes)."""
    rows: list[np.ndarray | None] = [None] * len(queries)
    modalities: list[str] = ["vector"] * len(queries)
    exclude: list[str | None] = [None] * len(queries)
    contents, labels, positions = [], [], []
    for i, query in enumerate(queries):
        if query.vector is not None:
            rows[i] = _vector(collection, query.vector, f"queries[{i}].vector")
        elif query.id is not None:
            item = await anyio.to_thread.run_sync(collection.get, query.id)
            rows[i], modalities[i], exclude[i] = item.vector, item.modality, item.id
        else:
            kind: Modality = "text" if query.text is not None else "image"
            contents.append((kind, query.text if kind == "text" else query.image))
            labels.append(f"queries[{i}].{kind}")
            positions.append(i)
            modalities[i] = kind
    if contents:
        embedded, _ = await _embed_contents(pool, collection, settings, contents, labels)
        for row, position in zip(collection.prepare_vectors(embedded), positions):
            rows[position] = row
    return np.stack(rows), modalities, exclude


@router.post(
    "/v1/collections/{name}/search",
    response_model=SearchResponse,
    dependencies=JSON,
    openapi_extra=body_schema(SearchRequest),
)
async def search(name: str, request: Request, state: StateDep, pool: PoolDep, settings: SettingsDep) -> Response:
    """Nearest neighbours of a text, an image, a vector or a stored item, across modalities."""
    body = await parse_body(request, SearchRequest)
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
    collection = await _collection(state, name)
    await _check_model(pool, collection, body.model)
    vectors, modalities, exclude = await _query_vectors(queries, collection, pool, settings)
    started = time.perf_counter()
    hits = await anyio.to_thread.run_sync(
        lambda: collection.search(
            vectors,
            body.k,
            query_modalities=modalities,
            filter=body.filter,
            modality=body.modality,
            nprobe=body.nprobe,
            exclude=exclude,
        )
    )
    state.metrics.index_search_latency.observe(time.perf_counter() - started)
    # orjson straight from the hits: a batch of 256 queries x k hits through pydantic models
    # costs more than the FAISS search it reports.
    results = [[h.__dict__ for h in row] for row in hits]
    return Response(
        orjson.dumps(
            {
                "results": results[0] if body.query is not None else results,
                "model": collection.config.model,
                "collection": collection.name,
            }
        ),
        media_type="application/json",
        headers=await _untrained_warning(pool, collection),
    )


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


async def _untrained_warning(pool: ModelPool, collection: Collection) -> dict[str, str]:
    """`X-Duet-Warning` when the collection's pinned version is untrained, as embeddings responses say."""
    if collection.config.model is None:
        return {}
    info = await pool.resolve(collection.config.model)
    return {} if info.manifest.trained else {"X-Duet-Warning": f"{info.ref} is untrained"}
