"""Run prepared inputs through a loaded model's batcher; shared by every route that embeds
(embeddings, collection upserts, collection searches) and by the background re-embed.

The batcher's own errors come through as they are: `QueueFullError` (a live request's 429 +
Retry-After, a re-embed's cue to wait `retry_after` and try again) and `WorkerStoppedError`
(503), answered by service/errors.py's table. Only a failed input is mapped here, because only
here is it known which input of the request it was."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from service.batching import Admission, ItemError
from service.errors import ApiError, domain_status
from service.inputs import PreparedInputs
from service.model_pool.pool import LoadedModel


@contextmanager
def admitted(model: LoadedModel, count: int) -> Iterator[Admission]:
    """Admit a request of `count` inputs to `model`'s batcher before any expensive work (429
    past the wait budget); what it never queued is released when the block ends."""
    with model.batcher.admit(count) as admission:
        yield admission


async def embed_prepared(
    model: LoadedModel, prepared: PreparedInputs, admission: Admission | None = None
) -> np.ndarray:
    """Vectors in input order, one row per prepared input (admitted by `admission`, or here)."""
    vectors = np.empty((prepared.count, model.info.manifest.contract.dimension), dtype=np.float32)
    try:
        for modality, group in prepared.groups.items():
            try:
                rows = await model.batcher.embed(group.payloads, modality, group.costs, admission)
            except ItemError as exc:
                # Stays out of the table: the answer names the failed input (`param`), which only
                # this request's labels know.
                name = prepared.labels[group.indices[exc.index]]
                status, code = domain_status(exc.cause)
                status = status if status != 500 else 422
                raise ApiError(status, f"{name} could not be embedded: {exc.cause}", code=code, param=name) from None
            vectors[group.indices] = rows
    finally:
        prepared.release()  # the decoded images are done with: their memory goes back to the budget
    return vectors
