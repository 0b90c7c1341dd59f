"""Fine-tuning jobs over HTTP: submit, list, watch (server-sent events), cancel, resume;
and dataset uploads for them.

Configs are validated here, before anything is queued, with every problem listed (the
trainer's own validation plus what an API caller may reference: uploaded datasets, and
registry models that exist). While the job store is unreachable (Redis away) these
routes answer 503 with Retry-After; embeddings and search do not depend on it.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import PurePosixPath
from typing import Annotated, Any, TypeVar

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from common.logs import current_request_id
from jobs.datasets import (
    ANONYMOUS,
    DatasetLimits,
    DatasetStore,
    DatasetTooLargeError,
    EmptyDatasetError,
    check_filename,
)
from jobs.records import (
    JobNotFoundError,
    JobRecord,
    JobState,
    StoreUnavailableError,
    new_job_id,
)
from jobs.sse import encode_event
from jobs.store import JobStore
from registry.errors import ManifestError
from service.deps import StateDep, require_json
from service.errors import ApiError
from service.schemas import RequestBody
from service.settings import Settings
from service.state import ServiceState
from trainer.config import AUTO_MAX_EPOCHS, ConfigError, TrainConfig, parse_config

router = APIRouter(tags=["jobs"])
JSON = [Depends(require_json)]
T = TypeVar("T")

KEEPALIVE_SECONDS = 15.0
MAX_EVENT_ID = 2**63 - 1  # event ids are SQLite INTEGERs: a larger position cannot be bound


class _AsTrainConfig:
    """Documents a job's `config` as `trainer.config.TrainConfig`, every field of it with its
    bounds and help text (in /openapi.json and /docs), while the body takes it as the JSON object
    it is. `validate` parses it with the trainer's own `parse_config`, which lists every problem at
    once and is joined by what only the API checks (its datasets, registry models, DUET_JOB_MAX_*)
    in one 422 `invalid_training_config`; the job record keeps the config as it was sent. Parsed
    as the body's model instead, a config's shape errors would come alone and first, as a 400
    `invalid_request_body` that names none of the other problems."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(TrainConfig.__pydantic_core_schema__)


TrainConfigBody = Annotated[dict[str, Any], _AsTrainConfig]


class JobCreate(RequestBody):
    config: TrainConfigBody = Field(description="A training config: the schema `duet train` reads from a file.")
    idempotency_key: str | None = Field(
        default=None, min_length=1, max_length=200, description="A retried POST with the same key returns that job."
    )


class JobList(BaseModel):
    object: str = "list"
    data: list[JobRecord]


async def call(store: JobStore, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store call in a thread; its errors (not found, state conflict, store away) are answered by
    service/errors.py's table (404 / 409 / 503 + Retry-After)."""
    return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))


def _store(state: ServiceState) -> JobStore:
    if state.jobs is None:
        raise ApiError(503, "the job system is still starting; retry shortly", code="jobs_starting")
    return state.jobs.store


# -- validation ----------------------------------------------------------------------------------


def reference_problems(config: dict[str, Any], state: ServiceState, allow_local: bool) -> list[str]:
    """What a config may point at from the API, beyond its datasets (which `parse_config`
    confines to the datasets folder): for the base model, a registry reference that resolves,
    or a hub id. Server-side paths only with DUET_JOBS_ALLOW_LOCAL_PATHS. The same for the old
    model of `compatible_with`."""
    problems = []
    base = config.get("base_model")
    if isinstance(base, str) and base:
        problems += _base_model_problems(base, state, allow_local)
    compat = config.get("compatible_with")
    old = compat.get("model") if isinstance(compat, dict) else compat
    if isinstance(old, str) and old:
        problems += _base_model_problems(old, state, allow_local, field="compatible_with.model")
    return problems


def _base_model_problems(base: str, state: ServiceState, allow_local: bool, field: str = "base_model") -> list[str]:
    from registry.names import parse_model_ref

    # By its shape only: whether a folder of that name exists here is not the caller's to learn.
    looks_local = base.startswith(("/", ".", "~")) or ".." in PurePosixPath(base).parts or "\\" in base
    if looks_local and not allow_local:
        return [f"{field}: {base[:200]!r} is a server path; name a registry model (e.g. 'minilm@production')"]
    try:
        parsed = parse_model_ref(base)
    except ValueError:
        return []  # a hub id such as 'org/model': the training process loads it
    if not state.registry.has_model(parsed.name):
        return []
    try:
        state.registry.resolve(parsed)
    except (LookupError, ManifestError) as exc:
        return [f"{field}: {exc}"]
    return []


def _epochs_at_most(config: TrainConfig) -> float:
    """The most epochs a config can train: "auto" chooses at most auto_recipe.MAX_EPOCHS."""
    return float(AUTO_MAX_EPOCHS) if config.epochs == "auto" else float(config.epochs)


def limit_problems(config: TrainConfig, settings: Settings) -> list[str]:
    """What this service lets one job ask for (DUET_JOB_MAX_*), beyond the trainer's own bounds."""
    limits = [
        ("batch_size", config.batch_size, settings.job_max_batch_size, "DUET_JOB_MAX_BATCH_SIZE"),
        (
            "epochs (auto chooses up to)" if config.epochs == "auto" else "epochs",
            _epochs_at_most(config),
            settings.job_max_epochs,
            "DUET_JOB_MAX_EPOCHS",
        ),
        ("max_steps", config.max_steps, settings.job_max_steps, "DUET_JOB_MAX_STEPS"),
        (
            "dataloader_workers",
            config.dataloader_workers,
            settings.job_max_dataloader_workers,
            "DUET_JOB_MAX_DATALOADER_WORKERS",
        ),
        ("max_seq_length", config.max_seq_length, settings.job_max_seq_length, "DUET_JOB_MAX_SEQ_LENGTH"),
    ]
    return [
        f"{name}: {value:g} is more than this service allows ({limit:g}, {setting})"
        for name, value, limit, setting in limits
        if value is not None and value > limit
    ]


def validate(body: JobCreate, state: ServiceState, owner: str = ANONYMOUS) -> None:
    """`owner`: the caller's key; its config may name only datasets that key uploaded (another
    key's dataset reads as missing, in the same words, so ids cannot be probed)."""
    settings = state.settings
    size = len(json.dumps(body.config, separators=(",", ":")))
    if size > settings.job_max_config_bytes:  # the record keeps it, and GET /v1/jobs returns up to 500 of them
        raise ApiError(
            413,
            f"the job config is {size} bytes as JSON; at most {settings.job_max_config_bytes} are allowed "
            "(DUET_JOB_MAX_CONFIG_BYTES)",
            code="job_config_too_large",
            param="config",
        )
    allow_local = settings.jobs_allow_local_paths
    problems = reference_problems(body.config, state, allow_local)
    visible = None if allow_local else partial(dataset_store(settings).visible, owner=owner)
    try:
        config = parse_config(body.config, base_dir=settings.datasets_dir, confined=not allow_local, visible=visible)
        problems += limit_problems(config, settings)
    except ConfigError as exc:
        problems = exc.problems + problems
    if problems:
        raise ConfigError(problems)  # with the API's own problems: 422 invalid_training_config (service/errors.py)


# -- routes --------------------------------------------------------------------------------------


@router.post("/v1/jobs", status_code=201, response_model=JobRecord, dependencies=JSON)
async def create_job(
    body: JobCreate,
    state: StateDep,
    request: Request,
    idempotency_key: str | None = Header(default=None, max_length=200),
) -> JSONResponse:
    """Validate a training config and queue it. With an idempotency key (header
    `Idempotency-Key` or body field) a retried POST returns the job it created: 200."""
    store = _store(state)
    key = body.idempotency_key or idempotency_key
    await anyio.to_thread.run_sync(validate, body, state, _owner(request))
    # The middleware's id (the client's X-Request-ID, cleaned, or a new one): the worker and the
    # training process log with it, so one id finds the request and everything the job did.
    record = JobRecord(id=new_job_id(), config=body.config, idempotency_key=key, request_id=current_request_id())
    saved, created = await call(store, store.create, record)
    if created:
        state.metrics.job_submissions.inc()
    return JSONResponse(saved.model_dump(mode="json"), status_code=201 if created else 200)


@router.get("/v1/jobs", response_model=JobList)
async def list_jobs(
    state: StateDep,
    limit: int = Query(default=50, ge=1, le=500),
    job_state: JobState | None = Query(default=None, alias="state"),
) -> JobList:
    store = _store(state)
    return JobList(data=await call(store, store.list, limit, job_state))


@router.get("/v1/jobs/{job_id}", response_model=JobRecord)
async def get_job(job_id: str, state: StateDep) -> JobRecord:
    store = _store(state)
    return await call(store, store.get, job_id)


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobRecord)
async def cancel_job(job_id: str, state: StateDep) -> JobRecord:
    """Queued: cancelled now. Running: stops at its next step (after a checkpoint)."""
    store = _store(state)
    record = await call(store, store.request_cancel, job_id)
    state.metrics.job_cancels.inc()
    return record


@router.post("/v1/jobs/{job_id}/resume", response_model=JobRecord)
async def resume_job(job_id: str, state: StateDep) -> JobRecord:
    """Queue a failed or cancelled job again; it continues from its last checkpoint."""
    store = _store(state)
    record = await call(store, store.resume, job_id)
    state.metrics.job_resumes.inc()
    return record


@router.get(
    "/v1/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-sent events."}},
)
async def job_events(
    job_id: str,
    state: StateDep,
    after: int | None = Query(
        default=None, ge=0, le=MAX_EVENT_ID, description="Replay events after this id (default: all)."
    ),
    last_event_id: str | None = Header(default=None),
) -> StreamingResponse:
    """Progress, stage, evaluation, log and state events as server-sent events; the stream
    ends after the `end` event (its data is the final job). Reconnects resume after
    `Last-Event-ID`. While the store is unreachable the stream stays open and waits."""
    store = _store(state)
    await call(store, store.get, job_id)  # 404 before the stream starts
    start = after if after is not None else _event_id(last_event_id)
    return StreamingResponse(
        _stream(store, job_id, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event_id(header: str | None) -> int:
    """The event id a reconnecting client last saw: ASCII digits (`isdigit` also takes '\u00b2',
    which `int` refuses), anything past the ids SQLite can hold meaning 'after every event'."""
    value = (header or "").strip()
    if not (value.isascii() and value.isdigit()):
        return 0
    return MAX_EVENT_ID if len(value) > 19 else min(int(value), MAX_EVENT_ID)  # int() refuses 4300+ digits


async def _end_before(store: JobStore, job_id: str, after: int) -> bytes | None:
    """The `end` event again, if the job has ended and has no event after `after`: the client is
    past its end (an EventSource reconnecting after it), nothing more will come, and the stream
    would have sent keep-alives forever."""
    try:
        record = await anyio.to_thread.run_sync(store.get, job_id)
    except (StoreUnavailableError, JobNotFoundError):
        return None  # the loop's next wait reports either
    if not record.state.terminal or record.events > after:
        return None
    return encode_event(record.events, "end", record.model_dump(mode="json"))


async def _stream(store: JobStore, job_id: str, after: int) -> AsyncIterator[bytes]:
    yield b"retry: 3000\n\n"
    if end := await _end_before(store, job_id, after):
        yield end
        return
    while True:
        try:
            events = await anyio.to_thread.run_sync(store.wait_events, job_id, after, KEEPALIVE_SECONDS)
        except StoreUnavailableError:
            yield b": job store unreachable; waiting\n\n"
            await anyio.sleep(2)
            continue
        except JobNotFoundError:
            yield encode_event(None, "error", {"message": f"job {job_id} no longer exists"})
            return
        if not events:
            if end := await _end_before(store, job_id, after):
                yield end
                return
            yield f": keep-alive {time.time():.0f}\n\n".encode()
            continue
        for event in events:
            after = event.seq
            if event.type != "end":
                yield encode_event(event.seq, event.type, event.data)
                continue
            try:
                final = await anyio.to_thread.run_sync(store.get, job_id)
            except (StoreUnavailableError, JobNotFoundError):
                yield encode_event(event.seq, "end", {"id": job_id})
                return
            if final.events > event.seq:  # the end of an earlier attempt: the job was resumed since
                yield encode_event(
                    event.seq, "attempt_end", {"message": "an earlier attempt ended; the job was resumed"}
                )
                continue
            yield encode_event(event.seq, "end", final.model_dump(mode="json"))
            return


# -- datasets ------------------------------------------------------------------------------------


@router.post("/v1/datasets", status_code=201)
async def upload_dataset(
    request: Request,
    state: StateDep,
    filename: str = Query(description="Name to keep, e.g. sts-train.csv or shapes.zip (a data file plus its images)."),
) -> JSONResponse:
    """Upload a dataset as the raw request body (`curl --data-binary @file`). It is stored by
    content hash; the answer's `path` is what a job config's dataset `path` names. What is wrong
    with an upload (`DatasetError`s) is answered by service/errors.py's table."""
    settings = state.settings
    name = check_filename(filename)
    datasets = dataset_store(settings)
    owner = _owner(request)
    temp, digest = await anyio.to_thread.run_sync(datasets.begin)
    size = 0
    try:
        with temp.open("wb") as sink:
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_dataset_bytes:
                    raise DatasetTooLargeError(
                        f"dataset is larger than {settings.max_dataset_bytes} bytes (DUET_MAX_DATASET_BYTES)"
                    )
                digest.update(chunk)
                await anyio.to_thread.run_sync(sink.write, chunk)
        if size == 0:
            raise EmptyDatasetError("the upload is empty; send the file as the request body")
        info = await anyio.to_thread.run_sync(datasets.commit, temp, digest.hexdigest(), size, name, owner)
    finally:
        temp.unlink(missing_ok=True)
    return JSONResponse(info.to_dict(), status_code=201)


def dataset_store(settings: Settings) -> DatasetStore:
    limits = DatasetLimits(
        max_bytes=settings.max_dataset_bytes,
        max_files=settings.max_dataset_files,
        max_unpacked_bytes=settings.max_dataset_unpacked_bytes,
        storage_per_owner=settings.dataset_storage_per_key_bytes,
    )
    return DatasetStore(settings.datasets_dir, limits)


def _owner(request: Request) -> str:
    """The caller's key name (set by the auth middleware); with auth off, everyone's one owner."""
    return request.scope.get("duet.key") or ANONYMOUS


@router.get("/v1/datasets")
async def list_datasets(state: StateDep, request: Request) -> dict[str, Any]:
    """The datasets the caller's key uploaded."""
    datasets = dataset_store(state.settings)
    found = await anyio.to_thread.run_sync(datasets.list, _owner(request))
    return {"object": "list", "data": [d.to_dict() for d in found]}
