"""Dependency aliases: routes receive the lifespan's objects through these, never globals.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in its threadpool, a
thread hand-off per dependency per request that profiling showed costing more event-loop
time than the embeddings route itself under many small requests."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from registry.store import ModelRegistry
from service.collections_service import CollectionsService
from service.errors import ApiError
from service.metrics import Metrics
from service.model_pool.pool import ModelPool
from service.quantized_output import CalibrationCache
from service.settings import Settings
from service.state import ServiceState


async def get_state(request: Request) -> ServiceState:
    return request.app.state.duet


StateDep = Annotated[ServiceState, Depends(get_state)]


async def get_pool(state: StateDep) -> ModelPool:
    return state.pool


async def get_registry(state: StateDep) -> ModelRegistry:
    return state.registry


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_metrics(state: StateDep) -> Metrics:
    return state.metrics


async def get_calibrations(state: StateDep) -> CalibrationCache:
    return state.calibrations


async def get_collections(state: StateDep) -> CollectionsService:
    """The collections API's work (backend + pool + registry + settings); cheap, made per request."""
    return CollectionsService(state.collections, state.pool, state.registry, state.settings, state.metrics)


PoolDep = Annotated[ModelPool, Depends(get_pool)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
CollectionsDep = Annotated[CollectionsService, Depends(get_collections)]
CalibrationsDep = Annotated[CalibrationCache, Depends(get_calibrations)]


async def require_json(request: Request) -> None:
    """415 for bodies that are not JSON, before FastAPI tries to parse them."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415,
            f"content type {content_type or '(none)'} is not supported; send JSON with "
            "'Content-Type: application/json'",
            code="unsupported_media_type",
        )
