"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import StateDep
from service.metrics import refresh_gauges

router = APIRouter(tags=["operations"])


@router.get("/health", summary="Liveness: red when a batch worker thread has died")
async def health(state: StateDep) -> JSONResponse:
    dead = state.pool.dead_workers()
    body = {
        "status": "ok" if not dead else "unhealthy",
        "loaded_models": sorted(state.pool.loaded),
        "dead_workers": dead,
    }
    return JSONResponse(body, status_code=200 if not dead else 503)


@router.get("/ready", summary="Readiness: preloaded models are loaded and warmed up")
async def ready(state: StateDep) -> JSONResponse:
    if state.ready and not state.pool.dead_workers():
        return JSONResponse({"status": "ready", "loaded_models": sorted(state.pool.loaded)})
    status = "failed" if state.startup_error else "starting"
    return JSONResponse({"status": status, "error": state.startup_error}, status_code=503)


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(state: StateDep) -> Response:
    pool = state.pool
    for ref, model in pool.loaded.items():
        state.metrics.queue_depth.labels(ref).set(model.batcher.pending)
    await anyio.to_thread.run_sync(refresh_gauges, state.metrics, state)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
