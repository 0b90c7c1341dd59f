"""`create_app()`: builds the FastAPI app. It only wires; the parts live in their modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.auth.keys import KeyRing
from service.auth.middleware import AuthMiddleware
from service.body import include_body_schemas
from service.errors import install_error_handlers
from service.limits import build_limiter
from service.middleware import BodyLimitMiddleware, HeadMiddleware, RequestIdMiddleware
from service.openapi import install_openapi
from service.routes import collections, embeddings, health, jobs, models, pages
from service.settings import Settings
from service.state import ServiceState


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    keys = KeyRing.from_settings(settings)  # a bad key entry stops start-up here, with its name
    limiter = build_limiter(settings, lambda: _metrics_of(app))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = await ServiceState.start(settings)
        app.state.duet = state
        await limiter.start()
        try:
            yield
        finally:
            await limiter.close()
            await state.close()

    app = FastAPI(
        title="Duet",
        summary="Contrastive text+image embeddings: OpenAI-compatible serving with a model registry.",
        version="0.1.0",
        lifespan=lifespan,
    )
    # Outermost last: request id -> metrics -> HEAD as GET -> auth and limits -> body limit -> routes.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        larger={"/v1/datasets": settings.max_dataset_bytes},
    )
    app.add_middleware(
        AuthMiddleware,
        router=app.router,
        keys=keys,
        limiter=limiter,
        settings=settings,
        metrics_getter=lambda: _metrics_of(app),
    )
    app.add_middleware(HeadMiddleware)
    app.add_middleware(RequestIdMiddleware, metrics_getter=lambda: _metrics_of(app))
    install_error_handlers(app)
    for module in (embeddings, models, collections, jobs, health, pages):
        app.include_router(module.router)
    include_body_schemas(app)
    install_openapi(app)
    return app


def _metrics_of(app: FastAPI):
    state = getattr(app.state, "duet", None)
    return state.metrics if state is not None else None
