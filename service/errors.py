"""Every error the API returns, in one shape, mapped from domain errors in one place.

Shape (OpenAI's, so its clients show the message):
    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": "..."}}

Routes raise `ApiError` for what they check themselves, and let domain errors (registry, encoders,
collections, model pool, batcher, image memory budget, jobs and dataset uploads) propagate: each
is answered by its row in `_DOMAIN_ERRORS`, the one place that says which status, code, message,
param and headers it gets. Nothing else catches broadly, and an unexpected exception becomes a
500 that names no internals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.logs import current_request_id
from encoders.errors import EncoderError, ImageDecodeError, ModelLoadError, UnsupportedModalityError
from index.errors import (
    BackendUnavailableError,
    CollectionBusyError,
    CollectionError,
    CollectionExistsError,
    CollectionNotFoundError,
    CollectionUnavailableError,
    FilterError,
    InvalidCollectionError,
    InvalidVectorError,
    ItemNotFoundError,
    PayloadError,
    ReembedRefusedError,
)
from jobs.datasets import DatasetError, DatasetNameError, DatasetTooLargeError, EmptyDatasetError
from jobs.records import InvalidTransitionError, JobNotFoundError, StoreUnavailableError
from registry.errors import (
    IncompatibleVersionError,
    IntegrityError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    RegistryError,
    VersionNotFoundError,
)
from service.auth.route_policy import app_routes
from service.batching import QueueFullError, WorkerStoppedError
from service.limits import ImageMemoryFullError, ImagesTooLargeError
from service.model_pool.errors import ModelMemoryBudgetError, ModelMemoryBusyError
from trainer.config import ConfigError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with its HTTP status; raised by routes and service components."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status in (401, 403):
        return "authentication_error"
    return "invalid_request_error" if status < 500 else "server_error"


def error_response(
    status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": _error_type(status), "code": code, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


def _retry_after(exc: Exception) -> dict[str, str]:
    """`Retry-After` from the error's `retry_after` seconds (whole seconds, at least 1)."""
    seconds = getattr(exc, "retry_after", 1)
    return {"Retry-After": str(max(1, math.ceil(float(seconds))))}


class DomainMapping(NamedTuple):
    """How one domain error class answers: status, code, and the headers it carries (if any)."""

    cls: type[Exception]
    status: int
    code: str | Callable[[Exception], str]  # a hook where the error says which limit it hit
    headers: Callable[[Exception], dict[str, str]] | None = None
    message: Callable[[Exception], str] | None = None  # the answer's message; default: str(exc)
    param: str | None = None  # OpenAI's `param`: the request field to fix


def _queue_full_message(exc: Exception) -> str:
    full = cast(QueueFullError, exc)
    return f"{full.model} is at capacity ({full}); retry after {full.retry_after}s"


def _config_message(exc: Exception) -> str:
    """Every problem on one line (ConfigError's own text is the CLI's, one problem a line)."""
    return "invalid training config: " + "; ".join(cast(ConfigError, exc).problems)


def _dataset_code(exc: Exception) -> str:
    return cast(DatasetTooLargeError, exc).code  # which limit: size, file count or storage


# Domain error -> (status, code[, headers, message, param]). Order matters: the first matching class wins.
_DOMAIN_ERRORS: list[DomainMapping] = [
    DomainMapping(InvalidNameError, 400, "invalid_model_reference"),
    DomainMapping(ModelNotFoundError, 404, "model_not_found"),
    DomainMapping(VersionNotFoundError, 404, "model_version_not_found"),
    DomainMapping(IntegrityError, 500, "model_integrity_error"),
    DomainMapping(IncompatibleVersionError, 409, "alias_move_refused"),
    DomainMapping(ManifestError, 409, "model_manifest_unreadable"),
    DomainMapping(RegistryError, 500, "registry_error"),
    DomainMapping(UnsupportedModalityError, 400, "unsupported_modality"),
    DomainMapping(ImageDecodeError, 400, "invalid_image"),
    DomainMapping(ModelLoadError, 503, "model_load_failed"),
    DomainMapping(EncoderError, 500, "encoder_error"),
    DomainMapping(CollectionNotFoundError, 404, "collection_not_found"),
    DomainMapping(CollectionExistsError, 409, "collection_exists"),
    DomainMapping(CollectionBusyError, 409, "collection_busy"),
    DomainMapping(CollectionUnavailableError, 503, "collection_unavailable"),
    DomainMapping(BackendUnavailableError, 503, "collection_backend_unavailable", _retry_after),
    DomainMapping(ReembedRefusedError, 409, "reembed_refused"),
    DomainMapping(ItemNotFoundError, 404, "item_not_found"),
    DomainMapping(InvalidVectorError, 400, "invalid_vector"),
    DomainMapping(FilterError, 400, "invalid_filter"),
    DomainMapping(PayloadError, 400, "invalid_payload"),
    DomainMapping(InvalidCollectionError, 400, "invalid_collection_request"),
    DomainMapping(CollectionError, 500, "index_error"),
    DomainMapping(JobNotFoundError, 404, "job_not_found"),
    DomainMapping(InvalidTransitionError, 409, "job_state_conflict"),
    DomainMapping(
        StoreUnavailableError,
        503,
        "job_store_unavailable",
        lambda exc: {"Retry-After": "5"},
        lambda exc: f"{exc}; jobs are unavailable until it is back",
    ),
    DomainMapping(ModelMemoryBudgetError, 507, "model_memory_budget"),
    DomainMapping(ModelMemoryBusyError, 503, "model_memory_busy", _retry_after),
    DomainMapping(QueueFullError, 429, "queue_full", _retry_after, _queue_full_message),
    DomainMapping(
        WorkerStoppedError,
        503,
        "worker_dead",
        message=lambda exc: f"{exc}; the service needs a restart (see /health)",
    ),
    DomainMapping(ImagesTooLargeError, 413, "images_too_large", param="input"),
    DomainMapping(ImageMemoryFullError, 429, "image_memory_full", _retry_after),
    DomainMapping(DatasetNameError, 400, "invalid_dataset_name", param="filename"),
    DomainMapping(EmptyDatasetError, 400, "empty_dataset"),
    DomainMapping(DatasetTooLargeError, 413, _dataset_code),
    DomainMapping(DatasetError, 400, "invalid_dataset"),
    DomainMapping(ConfigError, 422, "invalid_training_config", message=_config_message, param="config"),
]


def _mapping(exc: BaseException) -> DomainMapping | None:
    for mapping in _DOMAIN_ERRORS:
        if isinstance(exc, mapping.cls):
            return mapping
    return None


def _code(mapping: DomainMapping, exc: Exception) -> str:
    return mapping.code if isinstance(mapping.code, str) else mapping.code(exc)


def domain_status(exc: BaseException) -> tuple[int, str]:
    mapping = _mapping(exc)
    if mapping is None or not isinstance(exc, Exception):
        return 500, "internal_error"
    return mapping.status, _code(mapping, exc)


def domain_error(exc: Exception) -> ApiError:
    """A domain error as the API answers it: its row of `_DOMAIN_ERRORS` rendered (a 500
    `internal_error` for a class the table does not know)."""
    mapping = _mapping(exc)
    if mapping is None:
        return ApiError(500, str(exc), code="internal_error")
    return ApiError(
        mapping.status,
        mapping.message(exc) if mapping.message else str(exc),
        code=_code(mapping, exc),
        param=mapping.param,
        headers=mapping.headers(exc) if mapping.headers else None,
    )


def domain_response(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    """(status, code, message, headers) of a domain error, as the API answers it."""
    error = domain_error(exc)
    return error.status, error.code, error.message, error.headers


def handled_domain_errors() -> list[type[Exception]]:
    """The classes the app installs the table's handler for: every row's class, less those a
    base class already in the list catches (Starlette finds a handler along the error's MRO)."""
    classes = list(dict.fromkeys(mapping.cls for mapping in _DOMAIN_ERRORS))
    return [cls for cls in classes if not any(base is not cls and issubclass(cls, base) for base in classes)]


_LOCATIONS = ("body", "query", "path", "header")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message for up to five problems, and OpenAI's `param`: the first problem's top-level key.

    A body that is not JSON names no parameter; an unknown key is named as OpenAI names it."""
    for err in errors:
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error")
            return "the request body is not valid JSON" + (f" ({detail})" if detail else ""), None
    parts = []
    for err in errors[:5]:
        loc = [str(p) for p in err.get("loc", ())]
        location = ".".join(loc[1:] if loc and loc[0] in _LOCATIONS else loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown parameter '{location}'")
        else:
            parts.append(f"{location or 'body'}: {err.get('msg', 'invalid')}")
    first = [str(p) for p in errors[0].get("loc", ())] if errors else []
    keys = first[1:] if first and first[0] in _LOCATIONS else first
    param = keys[0] if keys else None
    if errors and errors[0].get("type") == "extra_forbidden":
        param = ".".join(keys)  # the unknown key itself, by its path when nested
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, param


def allowed_methods(app: Any, path: str) -> list[str]:
    """Every method any route of `path` answers (Starlette's 405 names only the first route's),
    with HEAD wherever GET is (see `HeadMiddleware`)."""
    methods: set[str] = set()
    for route in app_routes(app.router.routes):
        if route.regex.match(path):
            methods |= route.methods
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _count(request: Request, code: str) -> None:
    state = getattr(request.app.state, "duet", None)
    if state is not None:
        state.metrics.errors.labels(code).inc()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        _count(request, exc.code)
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
        error = domain_error(exc)
        if error.status >= 500:
            logger.error("%s: %s", error.code, exc)
        _count(request, error.code)
        return error_response(error.status, error.message, error.code, error.param, error.headers)

    for cls in handled_domain_errors():
        app.add_exception_handler(cls, _domain_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        _count(request, "invalid_request_body")
        # 400, as OpenAI answers a malformed or misspelled request (its clients raise BadRequestError).
        return error_response(400, message, "invalid_request_body", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        _count(request, code)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope["path"]))
        return error_response(exc.status_code, str(exc.detail), code, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        _count(request, "internal_error")
        # Sent by Starlette's outermost middleware, past the one that adds X-Request-ID to responses.
        request_id = current_request_id()
        return error_response(
            500,
            "internal error; the server log has the details",
            "internal_error",
            headers={"X-Request-ID": request_id} if request_id else None,
        )
