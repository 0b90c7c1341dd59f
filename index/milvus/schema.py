"""The physical Milvus collection behind one generation of a Duet collection, and its index.

Fields: `id` VARCHAR primary key (1024 bytes: 256 characters of up to 4 UTF-8 bytes), `vector`
FLOAT_VECTOR(dim), `modality` VARCHAR, `content` VARCHAR (nullable: the text, or the image as the
service stores it; Milvus's VARCHAR holds at most 65535 bytes, so longer content is refused with a
clear error instead of being cut), `payload` JSON, `written_at` INT64 (ms since the epoch; a
re-embed re-copies rows written after its freeze). Strong consistency everywhere: a write through
one replica is seen by a read through any other at once.

Index kinds: flat -> FLAT, ivf -> IVF_FLAT (nlist), ivfpq -> IVF_PQ (m = pq_m, 8 bits), hnsw -> HNSW
(M = hnsw_m, efConstruction), auto -> AUTOINDEX (the server's choice). Metric IP for both cosine
(vectors normalised by `prepare_vectors`, as the faiss backend does) and dot.

Quantisation maps to what the server offers over the same FLOAT_VECTOR field (so the float vectors
stay in the collection, for rescoring): int8 -> IVF_SQ8 (flat, ivf, auto) or HNSW_SQ with SQ8 (hnsw);
binary -> IVF_RABITQ (one bit per dimension; flat, ivf, auto). A BINARY_VECTOR field is not used:
milvus-lite refuses the type, and RaBitQ is the server's own 1-bit quantiser of float vectors.
Refused with the reason and what to use instead: binary with hnsw, and `recall_target` (the faiss
backend measures it; here `ef_search` is set directly).
"""

from __future__ import annotations

from typing import Any

from index.config import CollectionConfig
from index.engine import IndexSpec
from index.errors import InvalidCollectionError

ID_MAX_BYTES = 1024
CONTENT_MAX_BYTES = 65535
MODALITY_MAX = 16
DEFAULT_NLIST = 128
EF_CONSTRUCTION = 128
ITEM_FIELDS = ["id", "vector", "modality", "content", "payload", "written_at"]
ROW_FIELDS = ["id", "modality", "content", "payload"]  # what search hits and listings without vectors need

MILVUS_INDEX = {"flat": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "hnsw": "HNSW", "auto": "AUTOINDEX"}
QUANTIZED_INDEX = {"int8": "IVF_SQ8", "binary": "IVF_RABITQ"}  # for flat, ivf and auto; int8 hnsw: HNSW_SQ
MAX_LIMIT = 16384  # Milvus's largest search limit (topk)


def nlist(spec: IndexSpec) -> int:
    return spec.nlist or DEFAULT_NLIST


def check_supported(spec: IndexSpec) -> None:
    """Refuse (400) index options this backend cannot honour, naming what to use instead."""
    if spec.quantization == "binary" and spec.kind == "hnsw":
        raise InvalidCollectionError(
            "quantization 'binary' on the milvus backend is IVF_RABITQ (one bit per dimension): use index kind "
            "flat, ivf or auto with it, quantization 'int8' with hnsw (HNSW_SQ), or the faiss backend for binary HNSW"
        )
    if spec.recall_target is not None:
        raise InvalidCollectionError(
            "recall_target is measured by the faiss backend only; on the milvus backend set ef_search instead"
        )


def index_type(spec: IndexSpec) -> str:
    check_supported(spec)
    if spec.quantization != "none":
        return "HNSW_SQ" if spec.kind == "hnsw" else QUANTIZED_INDEX[spec.quantization]
    return MILVUS_INDEX[spec.kind]


def index_params(spec: IndexSpec) -> dict[str, Any]:
    kind = index_type(spec)
    if kind in ("IVF_FLAT", "IVF_SQ8", "IVF_RABITQ"):
        return {"nlist": nlist(spec)}
    if kind == "IVF_PQ":
        return {"nlist": nlist(spec), "m": spec.pq_m, "nbits": 8}
    if kind == "HNSW":
        return {"M": spec.hnsw_m, "efConstruction": EF_CONSTRUCTION}
    if kind == "HNSW_SQ":
        return {"M": spec.hnsw_m, "efConstruction": EF_CONSTRUCTION, "sq_type": "SQ8"}
    return {}


def search_params(spec: IndexSpec, k: int, nprobe: int | None) -> dict[str, Any]:
    """Per-search parameters: nprobe for IVF kinds, ef (at least k: HNSW returns nothing below it)."""
    params: dict[str, Any] = {}
    kind = index_type(spec)
    if kind.startswith("IVF"):
        params["nprobe"] = min(nprobe or spec.nprobe, nlist(spec))
    elif kind.startswith("HNSW"):
        params["ef"] = max(spec.ef_search, k)
    return {"metric_type": "IP", "params": params}


def build_index_params(spec: IndexSpec) -> Any:
    from pymilvus import MilvusClient

    index = MilvusClient.prepare_index_params()
    index.add_index("vector", index_type=index_type(spec), metric_type="IP", params=index_params(spec))
    return index


def build_schema(config: CollectionConfig) -> Any:
    from pymilvus import DataType, MilvusClient

    check_supported(config.index)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=config.dim)
    schema.add_field("modality", DataType.VARCHAR, max_length=MODALITY_MAX)
    schema.add_field("content", DataType.VARCHAR, max_length=CONTENT_MAX_BYTES, nullable=True)
    schema.add_field("payload", DataType.JSON)
    schema.add_field("written_at", DataType.INT64)
    return schema
