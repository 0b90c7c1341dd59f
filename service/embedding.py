"""Run prepared inputs through a loaded model's batcher; shared by every route that embeds
(embeddings, collection upserts, collection searches), so all map admission, queue and model
errors to HTTP the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from service.batching import Admission, ItemError, QueueFullError, WorkerStoppedError
from service.errors import ApiError, domain_status
from service.inputs import PreparedInputs
from service.model_pool.pool import LoadedModel


@contextmanager
def admitted(model: LoadedModel, count: int) -> Iterator[Admission]:
    """Admit a request of `count` inputs to `model`'s batcher before any expensive work (429
    past the wait budget); what it never queued is released when the block ends."""
    try:
        admission = model.batcher.admit(count)
    except (QueueFullError, WorkerStoppedError) as exc:
        raise _queue_error(model, exc) from None
    with admission:
        yield admission


async def embed_prepared(
    model: LoadedModel, prepared: PreparedInputs, admission: Admission | None = None
) -> np.ndarray:
    """Vectors in input order, one row per prepared input (admitted by `admission`, or here); a full
    queue is a 429 + Retry-After, a stopped worker a 503."""
    try:
        return await embed_queued(model, prepared, admission)
    except QueueFullError as exc:
        raise _queue_error(model, exc) from None


async def embed_queued(model: LoadedModel, prepared: PreparedInputs, admission: Admission | None = None) -> np.ndarray:
    """`embed_prepared`, but the batcher's `QueueFullError` comes through as it is, for callers that
    wait out a full queue (its `retry_after`) instead of answering 429: a background re-embed."""
    vectors = np.empty((prepared.count, model.info.manifest.contract.dimension), dtype=np.float32)
    try:
        for modality, group in prepared.groups.items():
            try:
                rows = await model.batcher.embed(group.payloads, modality, group.costs, admission)
            except WorkerStoppedError as exc:
                raise _queue_error(model, exc) from None
            except ItemError as exc:
                name = prepared.labels[group.indices[exc.index]]
                status, code = domain_status(exc.cause)
                status = status if status != 500 else 422
                raise ApiError(status, f"{name} could not be embedded: {exc.cause}", code=code, param=name) from None
            vectors[group.indices] = rows
    finally:
        prepared.release()  # the decoded images are done with: their memory goes back to the budget
    return vectors


def _queue_error(model: LoadedModel, exc: QueueFullError | WorkerStoppedError) -> ApiError:
    if isinstance(exc, WorkerStoppedError):
        return ApiError(503, f"{exc}; the service needs a restart (see /health)", code="worker_dead")
    return ApiError(
        429,
        f"{model.ref} is at capacity ({exc}); retry after {exc.retry_after}s",
        code="queue_full",
        headers={"Retry-After": str(exc.retry_after)},
    )
