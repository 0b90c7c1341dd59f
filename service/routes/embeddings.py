"""POST /v1/embeddings: OpenAI-compatible embeddings for text and images."""

from __future__ import annotations

import base64

import numpy as np
import orjson
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from service.deps import CalibrationsDep, PoolDep, SettingsDep, require_json
from service.embedding import admitted, embed_prepared
from service.errors import ApiError
from service.inputs import PreparedInputs, check_modalities, prepare, split_inputs
from service.quantized_output import (
    needs_ranges,
    quantize_rows,
    render_rows,
    requested_dtype,
    truncate_and_normalize,
)
from service.schemas import EmbeddingRequest, EmbeddingResponse

router = APIRouter(tags=["embeddings"])


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingResponse,
    dependencies=[Depends(require_json)],
    summary="Create embeddings (OpenAI-compatible)",
)
async def create_embeddings(
    body: EmbeddingRequest, pool: PoolDep, settings: SettingsDep, calibrations: CalibrationsDep
) -> Response:
    dtype = requested_dtype(body.output_dtype, body.embedding_types)
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
    ranges = None
    if needs_ranges(dtype):  # before admission: a first request may embed the calibration sample
        ranges = await calibrations.ranges(model, body.dimensions or contract.dimension)
    with admitted(model, len(items)) as admission:  # 429 here, before tokens are counted or images decoded
        prepared = await prepare(items, model.encoder, settings)
        vectors = await embed_prepared(model, prepared, admission)
    if body.dimensions is not None and body.dimensions < contract.dimension:
        vectors = truncate_and_normalize(vectors, body.dimensions)
    headers = {} if model.info.manifest.trained else {"X-Duet-Warning": f"{model.ref} is untrained"}
    truncated = sum(prepared.truncated)
    if truncated:
        pool.metrics.truncated.labels(model.ref).inc(truncated)
    if dtype is None:
        content = _render(vectors, prepared, model.ref, body.encoding_format)
    else:
        rows = render_rows(quantize_rows(vectors, dtype, ranges), body.encoding_format)
        content = _render_rows(rows, prepared, model.ref, {"output_dtype": dtype})
    return Response(content=content, media_type="application/json", headers=headers)


def _render(vectors: np.ndarray, prepared: PreparedInputs, model_ref: str, encoding_format: str) -> bytes:
    """Serialise with orjson straight from numpy: far cheaper than pydantic for large float lists."""
    if encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        embeddings: list = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        embeddings = list(vectors)
    return _render_rows(embeddings, prepared, model_ref)


def _render_rows(embeddings: list, prepared: PreparedInputs, model_ref: str, extra: dict | None = None) -> bytes:
    images = len(prepared.groups["image"].indices) if "image" in prepared.groups else 0
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": embeddings[i], "truncated": prepared.truncated[i]}
            for i in range(prepared.count)
        ],
        "model": model_ref,
        "usage": {"prompt_tokens": prepared.prompt_tokens, "total_tokens": prepared.prompt_tokens, "images": images},
        **(extra or {}),
    }
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
