"""Collections: create/list/drop, upsert/get/page/delete items, cross-modal search, re-embed.

The routes parse a request, call `CollectionsService` (`service/collections_service.py`, which has
the rules: pinned model versions, re-embedding, limits) and render what it returns. Errors of the
collection store go up as they are and are mapped to statuses in `service/errors.py`.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from typing import Annotated, Any

import anyio
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi import Query as QueryParam
from fastapi.responses import Response

from index.items import Hit, StoredItem
from service.body import body_schema, parse_body
from service.collection_schemas import (
    CollectionCreate,
    CollectionInfo,
    CollectionList,
    CompatibleModel,
    DeleteRequest,
    DeleteResponse,
    ItemOut,
    ItemPage,
    ReembedRequest,
    ReembedStatus,
    SearchRequest,
    SearchResponse,
    UnavailableCollection,
    UpsertRequest,
    UpsertResponse,
)
from service.collections_service import CollectionView, Page
from service.deps import CollectionsDep, require_json

router = APIRouter(tags=["collections"])
JSON = [Depends(require_json)]


def _info(view: CollectionView) -> CollectionInfo:
    config, stats = view.config, view.stats
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
        reembed=ReembedStatus(**view.reembed) if view.reembed else None,
        compatible_models=[
            CompatibleModel(model=c.ref, mapped=c.record.map_file is not None, metrics=c.record.metrics)
            for c in view.compatible
        ],
    )


@router.post("/v1/collections", response_model=CollectionInfo, status_code=201, dependencies=JSON)
async def create_collection(body: CollectionCreate, collections: CollectionsDep) -> CollectionInfo:
    """Create a collection pinned to one model version (or a vector-only one)."""
    return _info(await collections.create(body))


@router.get("/v1/collections", response_model=CollectionList)
async def list_collections(collections: CollectionsDep) -> CollectionList:
    """Every collection; ones that cannot be opened are listed apart, with the reason."""
    listing = await collections.listing()
    unavailable = [UnavailableCollection(name=name, error=error) for name, error in sorted(listing.unavailable.items())]
    return CollectionList(data=[_info(view) for view in listing.collections], unavailable=unavailable)


@router.get("/v1/collections/{name}", response_model=CollectionInfo)
async def get_collection(name: str, collections: CollectionsDep) -> CollectionInfo:
    return _info(await collections.info(name))


@router.delete("/v1/collections/{name}")
async def drop_collection(name: str, collections: CollectionsDep) -> dict[str, Any]:
    await collections.drop(name)
    return {"deleted": name}


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
async def reembed_collection(name: str, request: Request, collections: CollectionsDep) -> ReembedStatus:
    """Embed every item again with another model version, in the background; the collection flips to
    the new version when all items are done (searches keep using the old one until then, writes get 409).
    `GET /v1/collections/{name}` shows progress in `reembed`."""
    body = await _reembed_body(request)
    return ReembedStatus(**await collections.reembed(name, body.model))


async def _reembed_body(request: Request) -> ReembedRequest:
    """The body is optional: none (or an empty one) means the default target."""
    if not (await request.body()).strip():
        return ReembedRequest()
    await require_json(request)
    return await parse_body(request, ReembedRequest)


@router.post("/v1/collections/{name}/rebuild", response_model=CollectionInfo)
async def rebuild_collection(name: str, collections: CollectionsDep) -> CollectionInfo:
    """Rebuild the index from the store (retrains IVF, recomputes modality centroids)."""
    return _info(await collections.rebuild(name))


# -- items ---------------------------------------------------------------------------


@router.put(
    "/v1/collections/{name}/items",
    response_model=UpsertResponse,
    dependencies=JSON,
    openapi_extra=body_schema(UpsertRequest),
)
async def upsert_items(name: str, request: Request, collections: CollectionsDep) -> UpsertResponse:
    """Insert or replace items by id. The reply comes after the write is durable."""
    body = await parse_body(request, UpsertRequest)
    done = await collections.upsert(name, body)
    return UpsertResponse(upserted=done.upserted, seq=done.seq, truncated=done.truncated)


def _item_dict(item: StoredItem, with_vector: bool) -> dict[str, Any]:
    """An item as the API shows it (`ItemOut`'s fields), as a dict for orjson."""
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
async def get_item(name: str, item_id: str, collections: CollectionsDep, with_vector: bool = False) -> ItemOut:
    return ItemOut(**_item_dict(await collections.get_item(name, item_id), with_vector))


@router.get("/v1/collections/{name}/items", response_model=ItemPage)
async def list_items(
    name: str,
    collections: CollectionsDep,
    cursor: str | None = None,
    limit: Annotated[int, QueryParam(ge=1, le=1000)] = 100,
    filter: Annotated[str | None, QueryParam(description="JSON filter, as in search")] = None,
    with_vector: bool = False,
) -> Response:
    """Items in id order; pass `next_cursor` back as `cursor` for the next page."""
    page = await collections.page(name, cursor, limit, filter)

    def page_body(page: Page) -> bytes:
        # In a thread and with orjson, as search does: a page of 1000 items with 64 KiB payloads
        # and 4096-dimension vectors is ~95 MB of JSON, which through pydantic on the event loop
        # stalled every other request for about a second (16x that at 65536 dimensions).
        return orjson.dumps(
            {"items": [_item_dict(i, with_vector) for i in page.items], "next_cursor": page.next_cursor}
        )

    return Response(await anyio.to_thread.run_sync(page_body, page), media_type="application/json")


@router.post("/v1/collections/{name}/items/delete", response_model=DeleteResponse, dependencies=JSON)
async def delete_items(name: str, body: DeleteRequest, collections: CollectionsDep) -> DeleteResponse:
    done = await collections.delete(name, body)
    return DeleteResponse(deleted=len(done.ids), ids=done.ids, seq=done.seq)


# -- search --------------------------------------------------------------------------


@router.post(
    "/v1/collections/{name}/search",
    response_model=SearchResponse,
    dependencies=JSON,
    openapi_extra=body_schema(SearchRequest),
)
async def search(name: str, request: Request, collections: CollectionsDep) -> Response:
    """Nearest neighbours of a text, an image, a vector or a stored item, across modalities."""
    body = await parse_body(request, SearchRequest)
    found = await collections.search(name, body)
    # orjson straight from the hits: a batch of 256 queries x k hits through pydantic models
    # costs more than the FAISS search it reports.
    results = hit_dicts(found.hits, found.include)
    return Response(
        orjson.dumps(
            {
                "results": results[0] if body.query is not None else results,
                "model": found.model,
                "collection": found.collection,
                "models": {"query": found.query_model, "gallery": found.model} if found.model else None,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,  # included vectors: float32 arrays, written as JSON numbers
        ),
        media_type="application/json",
        headers={"X-Duet-Warning": found.warning} if found.warning else {},
    )


def hit_dicts(hits: list[list[Hit]], include: AbstractSet[str]) -> list[list[dict[str, Any]]]:
    """Hits as `SearchHit` shows them: id, score, modality, and only the fields the search included (payload
    and content unless it said otherwise), in `SearchHit`'s order."""
    payload, content, vector = "payload" in include, "content" in include, "vector" in include
    if payload and content and not vector:  # the default answer, the common case: one dict per hit, no branches
        return [
            [
                {"id": h.id, "score": h.score, "payload": h.payload, "modality": h.modality, "content": h.content}
                for h in row
            ]
            for row in hits
        ]
    rows = []
    for row in hits:
        dicts = []
        for h in row:
            hit: dict[str, Any] = {"id": h.id, "score": h.score}
            if payload:
                hit["payload"] = h.payload
            hit["modality"] = h.modality
            if content:
                hit["content"] = h.content
            if vector:
                hit["vector"] = h.vector
            dicts.append(hit)
        rows.append(dicts)
    return rows
