"""Run prepared inputs through a loaded model's batcher; shared by every route that embeds
(embeddings, collection upserts, collection searches), so all map queue and model errors
to HTTP the same way."""

from __future__ import annotations

import numpy as np

from service.batching import ItemError, QueueFullError, WorkerStoppedError
from service.errors import ApiError, domain_status
from service.inputs import PreparedInputs
from service.model_pool import LoadedModel


async def embed_prepared(model: LoadedModel, prepared: PreparedInputs) -> np.ndarray:
    """Vectors in input order, one row per prepared input."""
    vectors = np.empty((prepared.count, model.info.manifest.contract.dimension), dtype=np.float32)
    for modality, group in prepared.groups.items():
        try:
            rows = await model.batcher.embed(group.payloads, modality, group.costs)
        except QueueFullError as exc:
            raise ApiError(
                429,
                f"{model.ref} is at capacity; retry after {exc.retry_after}s",
                code="queue_full",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except WorkerStoppedError as exc:
            raise ApiError(503, f"{exc}; the service needs a restart (see /health)", code="worker_dead") from None
        except ItemError as exc:
            name = prepared.labels[group.indices[exc.index]]
            status, code = domain_status(exc.cause)
            status = status if status != 500 else 422
            raise ApiError(status, f"{name} could not be embedded: {exc.cause}", code=code, param=name) from None
        vectors[group.indices] = rows
    return vectors
