"""POST /v1/embeddings: OpenAI-compatible embeddings for text and images."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.deps import PoolDep, SettingsDep, require_json
from service.embedding import admitted, embed_prepared
from service.errors import ApiError
from service.inputs import PreparedInputs, check_modalities, prepare, split_inputs
from service.schemas import EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    dependencies=[Depends(require_json)],
    summary="Create embeddings (OpenAI-compatible)",
)
async def create_embeddings(body: EmbeddingRequest, pool: PoolDep, settings: SettingsDep) -> Response:
    items = split_inputs(body.input, body.modality, settings)
    model = await pool.get(body.model)
    contract = model.info.manifest.contract
    check_modalities(items, contract, model.ref)
    if body.dimensions is not None and not 1 <= body.dimensions <= contract.dimension:
        raise ApiError(
            400,
            f"dimensions must be between 1 and {contract.dimension} for {model.ref}, got {body.dimensions}",
            code="invalid_dimensions",
            param="dimensions",
        )
    with admitted(model, len(items)) as admission:  # 429 here, before tokens are counted or images decoded
        prepared = await prepare(items, model.encoder, settings)
        vectors = await embed_prepared(model, prepared, admission)
    if body.dimensions is not None and body.dimensions < contract.dimension:
        vectors = truncate_and_normalize(vectors, body.dimensions)
    headers = {} if model.info.manifest.trained else {"X-Duet-Warning": f"{model.ref} is untrained"}
    truncated = sum(prepared.truncated)
    if truncated:
        pool.metrics.truncated.labels(model.ref).inc(truncated)
    return Response(
        content=_render(vectors, prepared, model.ref, body.encoding_format),
        media_type="application/json",
        headers=headers,
    )


def truncate_and_normalize(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """Matryoshka truncation: keep a prefix, then restore unit length."""
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


def _render(vectors: np.ndarray, prepared: PreparedInputs, model_ref: str, encoding_format: str) -> bytes:
    """Serialise with orjson straight from numpy: far cheaper than pydantic for large float lists."""
    if encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        embeddings: list = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        embeddings = list(vectors)
    images = len(prepared.groups["image"].indices) if "image" in prepared.groups else 0
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embeddings[i], "truncated": prepared.truncated[i]}
            for i in range(prepared.count)
        ],
        "model": model_ref,
        "usage": {"prompt_tokens": prepared.prompt_tokens, "total_tokens": prepared.prompt_tokens, "images": images},
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
