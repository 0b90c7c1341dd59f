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
"""

from __future__ import annotations

from typing import Any

from index.config import CollectionConfig
from index.engine import IndexSpec

ID_MAX_BYTES = 1024
CONTENT_MAX_BYTES = 65535
MODALITY_MAX = 16
DEFAULT_NLIST = 128
EF_CONSTRUCTION = 128
ITEM_FIELDS = ["id", "vector", "modality", "content", "payload", "written_at"]
ROW_FIELDS = ["id", "modality", "content", "payload"]  # what search hits and listings without vectors need

MILVUS_INDEX = {"flat": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ", "hnsw": "HNSW", "auto": "AUTOINDEX"}


def nlist(spec: IndexSpec) -> int:
    return spec.nlist or DEFAULT_NLIST


def index_type(spec: IndexSpec) -> str:
    return MILVUS_INDEX[spec.kind]


def index_params(spec: IndexSpec) -> dict[str, Any]:
    if spec.kind == "ivf":
        return {"nlist": nlist(spec)}
    if spec.kind == "ivfpq":
        return {"nlist": nlist(spec), "m": spec.pq_m, "nbits": 8}
    if spec.kind == "hnsw":
        return {"M": spec.hnsw_m, "efConstruction": EF_CONSTRUCTION}
    return {}


def search_params(spec: IndexSpec, k: int, nprobe: int | None) -> dict[str, Any]:
    """Per-search parameters: nprobe for IVF kinds, ef (at least k: HNSW returns nothing below it)."""
    params: dict[str, Any] = {}
    if spec.kind in ("ivf", "ivfpq"):
        params["nprobe"] = min(nprobe or spec.nprobe, nlist(spec))
    elif spec.kind == "hnsw":
        params["ef"] = max(spec.ef_search, k)
    return {"metric_type": "IP", "params": params}


def build_index_params(spec: IndexSpec) -> Any:
    from pymilvus import MilvusClient

    index = MilvusClient.prepare_index_params()
    index.add_index("vector", index_type=index_type(spec), metric_type="IP", params=index_params(spec))
    return index


def build_schema(config: CollectionConfig) -> Any:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX_BYTES)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=config.dim)
    schema.add_field("modality", DataType.VARCHAR, max_length=MODALITY_MAX)
    schema.add_field("content", DataType.VARCHAR, max_length=CONTENT_MAX_BYTES, nullable=True)
    schema.add_field("payload", DataType.JSON)
    schema.add_field("written_at", DataType.INT64)
    return schema
