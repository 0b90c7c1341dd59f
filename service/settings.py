"""All service configuration, in one typed place.

Every field can be set from the environment with the `DUET_` prefix (`DUET_DATA_DIR`,
`DUET_MAX_BATCH_TOKENS`, ...). Settings are built by `create_app()` or the CLI, never at
import time, so tests can construct as many differently-configured apps as they need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common import layout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUET_", extra="ignore", populate_by_name=True)

    # Where all state lives.
    data_dir: Path = Field(default=Path("./duet-data"), description="Root folder for all state.")
    registry_uri: str | None = Field(
        default=None,
        description="MLflow tracking/registry URI (e.g. http://mlflow:5000). Default: SQLite under data_dir.",
    )
    artifact_uri: str | None = Field(
        default=None, description="Artifact store for new versions (e.g. s3://bucket/duet). Default: data_dir."
    )

    # HTTP.
    host: str = Field(default="127.0.0.1", description="Bind address (0.0.0.0 in containers).")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, gt=0, description="Larger request bodies get 413.")
    max_inputs_per_request: int = Field(default=2048, gt=0, description="Most items in one embeddings request.")
    max_input_chars: int = Field(
        default=200_000,
        gt=0,
        description="Longest single text accepted; text under it but over the model's token limit is "
        "truncated and reported, text over it is refused.",
    )

    # Models.
    default_model: str = Field(default="minilm", description="Model used when a request names none.")
    preload_models: list[str] = Field(default_factory=lambda: ["minilm"], description="Loaded and warmed at start.")
    register_default_models: bool = Field(default=True, description="Register minilm + minilm-dual on first start.")
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="'auto' is bf16 (or fp16) on CUDA and fp32 on the CPU."
    )
    model_memory_budget_mb: int = Field(
        default=4096, gt=0, description="Parameters of all loaded models together; least recently used unload."
    )
    alias_refresh_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How often the alias watcher polls the registry for moved aliases (at least every 0.5 s); a "
        "moved alias is swapped to the new version once it is loaded, warmed and its contract checked.",
    )
    warmup: bool = Field(default=True, description="One forward pass per modality at load, so first requests are fast.")

    # Batching.
    max_batch_tokens: int = Field(
        default=16384, gt=0, description="Padded tokens in one forward pass (models that run padded)."
    )
    max_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Most inputs in one padded forward pass. Default: 16 on the CPU (bench/serve.py, MiniLM on 2 "
        "cores, padded: 64-input requests 0.74x -> 0.97x and 1-input requests 0.53x -> 0.69x of raw encode, against "
        "64), 256 on CUDA. Packed models are bounded by DUET_PACK_TOKENS, and by this only when it is set.",
    )
    max_batch_images: int = Field(default=64, gt=0, description="Most images in one forward pass.")
    inference_workers: int | None = Field(
        default=None,
        gt=0,
        description="Forward passes run at once per loaded model (threads sharing its weights). Default: one per "
        "usable CPU core on the CPU (cgroup quota counted), each with cores / workers torch threads; 1 on CUDA.",
    )
    text_packing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Run text batches unpadded: the batch's texts concatenated into packs with attention kept "
        "inside each text. 'auto': on the CPU, for models laid out as Transformer + mean/CLS pooling whose packed "
        "vectors match their padded ones at load (others stay padded); 'on': on CUDA too; 'off': always padded. "
        "bench/RESULTS.md (serve) has the measurements.",
    )
    pack_tokens: int = Field(
        default=256,
        gt=0,
        description="Tokens in one packed forward pass (a longer text runs alone); for packed models this, not "
        "max_batch_tokens, bounds a batch. Attention spans the whole pack, so large packs waste work.",
    )
    max_queue_items: int = Field(default=8192, gt=0, description="Pending inputs per model before 429.")
    max_queue_wait_ms: int = Field(
        default=2000,
        ge=0,
        description="Admission control: a request is refused with 429 + Retry-After when the work ahead of it "
        "(inputs being prepared, queued or running) divided by the measured throughput would make it wait "
        "longer than this. Checked before tokens are counted or images decoded. 0: only DUET_MAX_QUEUE_ITEMS.",
    )

    # Images.
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Declared width x height above this is refused."
    )
    max_image_side: int = Field(
        default=1024,
        gt=0,
        description="Decoded images are shrunk at once to the model's input size (its shorter edge), and their "
        "longer edge to this.",
    )
    max_image_memory_bytes: int = Field(
        default=1024 * 1024 * 1024,
        gt=0,
        description="Memory that images being decoded or waiting for the model may hold at once, all requests "
        "together, counted from their headers before any pixel is decoded: a request that needs more than this "
        "gets 413, one that does not fit now 429 + Retry-After.",
    )
    allow_remote_images: bool = Field(default=False, description="Fetch http(s) image URLs (an SSRF risk).")
    remote_image_timeout_seconds: float = Field(default=5.0, gt=0, description="Timeout of a remote image fetch.")
    remote_image_max_bytes: int = Field(default=10 * 1024 * 1024, gt=0, description="Largest remote image fetched.")

    # Collections.
    snapshot_interval_seconds: float = Field(
        default=30.0, gt=0, description="How often changed FAISS indexes are snapshotted (the store is always durable)."
    )
    max_search_k: int = Field(default=1000, gt=0, description="Largest k a search may ask for.")
    max_search_queries: int = Field(default=256, gt=0, description="Most queries in one batched search.")
    max_payload_fields: int = Field(default=64, gt=0, description="Most top-level fields in one item's payload.")
    max_payload_bytes: int = Field(default=64 * 1024, gt=0, description="Largest item payload, as compact JSON.")
    max_payload_key_chars: int = Field(default=128, gt=0, description="Longest key anywhere in a payload.")
    max_collection_fields: int = Field(
        default=256,
        gt=0,
        description="Most distinct filterable payload fields per collection (every upsert reads and writes the list).",
    )
    faiss_gpu: bool = Field(default=True, description="Clone indexes to the GPU for search when FAISS has GPU support.")
    collections_backend: Literal["faiss", "milvus"] = Field(
        default="faiss",
        description="Where collections live. 'faiss': a SQLite store + FAISS index per collection under data_dir, "
        "one server process per data dir (the data-dir lock). 'milvus': a Milvus server (or milvus-lite) that "
        "API replicas share; needs `pip install 'duet[milvus]'`, and the data-dir lock is not taken.",
    )
    milvus_uri: str | None = Field(
        default=None,
        description="With the milvus backend: a file path runs milvus-lite embedded in this process (one process "
        "only); http://host:19530 is a Milvus server. Default: milvus.db in data_dir.",
    )
    milvus_token: SecretStr | None = Field(
        default=None, description="Milvus credentials: 'user:password' or an API key. Never logged."
    )
    milvus_db_name: str | None = Field(default=None, description="Milvus database to use. Default: the server's.")
    milvus_prefix: str = Field(
        default="duet",
        pattern=r"^[A-Za-z][A-Za-z0-9]{0,39}$",  # index.milvus.names.PREFIX_PATTERN (a test keeps them equal)
        description="Milvus collection names are {prefix}_{name}_g{generation}, alias {prefix}_{name}; 1-40 letters "
        "or digits, starting with a letter (no '_': it separates the prefix from the name). Services sharing a "
        "Milvus need the same prefix to share collections, different ones to keep apart.",
    )
    milvus_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Timeout of each Milvus call; a call past it (or Milvus down) answers 503 + Retry-After.",
    )

    # Jobs.
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DUET_REDIS_URL", "REDIS_URL", "redis_url"),
        description="Redis for job records and the queue, shared with `duet worker`s (REDIS_URL or "
        "DUET_REDIS_URL). Unset: jobs live in SQLite under data_dir and run in a local worker process.",
    )
    redis_prefix: str = Field(default="duet", description="Prefix of Duet's Redis keys.")
    local_worker: bool = Field(
        default=True, description="Without Redis, `duet serve` runs jobs in a local worker process it supervises."
    )
    job_heartbeat_seconds: float = Field(default=5.0, gt=0, description="How often a worker reports a running job.")
    job_heartbeat_timeout_seconds: float = Field(
        default=60.0, gt=0, description="A running job with no heartbeat for this long is failed (resumable)."
    )
    job_cancel_grace_seconds: float = Field(
        default=120.0, gt=0, description="How long a cancelled job may take to reach a step boundary before a kill."
    )
    max_dataset_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="Largest dataset upload.")
    max_dataset_files: int = Field(default=10_000, gt=0, description="Most entries in an uploaded .zip.")
    max_dataset_unpacked_bytes: int = Field(
        default=1024 * 1024 * 1024,
        gt=0,
        description="Most bytes an uploaded .zip may unpack to, counted while unpacking (headers can lie).",
    )
    dataset_storage_per_key_bytes: int = Field(
        default=4 * 1024 * 1024 * 1024,
        gt=0,
        description="Disk the datasets of one API key may use, archives and what they unpack to together "
        "(with auth off: all uploads together).",
    )
    job_max_batch_size: int = Field(default=4096, gt=0, description="Largest batch_size a job config may ask for.")
    job_max_epochs: float = Field(default=100.0, gt=0, description="Most epochs a job config may ask for.")
    job_max_steps: int = Field(default=1_000_000, gt=0, description="Largest max_steps a job config may ask for.")
    job_max_dataloader_workers: int = Field(
        default=8, ge=0, description="Most dataloader_workers (processes per job) a job config may ask for."
    )
    job_max_seq_length: int = Field(default=8192, gt=0, description="Largest max_seq_length a job config may ask for.")
    job_max_config_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Largest job config, as compact JSON: the record keeps it and every job listing returns it.",
    )
    jobs_allow_local_paths: bool = Field(
        default=False,
        description="Let job configs name files and models by server-side path (outside uploaded datasets). "
        "Off by default: API users should not read the server's files.",
    )

    # Auth and limits. No keys configured: auth is off and limits apply per client address.
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML/JSON list of API keys: {name, key_sha256 (or hash), salt, scopes, rate_limit_per_second, "
        "rate_limit_burst, concurrency_limit}; `duet keys create` prints an entry. Any key configured turns auth on.",
    )
    api_keys: list[dict[str, Any]] | None = Field(
        default=None, description="Keys as JSON (same entries as the file), added to the file's."
    )
    auth_public_health: bool = Field(default=True, description="/health and /ready answer without a key.")
    auth_public_metrics: bool = Field(default=False, description="/metrics answers without a key (else any key).")
    rate_limit_per_second: float = Field(
        default=0.0, ge=0, description="Default requests per second per key (or client address); 0 = no limit."
    )
    rate_limit_burst: int = Field(
        default=0, ge=0, description="Default token-bucket size (requests at once after idle); 0 = a second's worth."
    )
    concurrency_limit: int = Field(
        default=0, ge=0, description="Default requests in flight at once per key (or client address); 0 = no limit."
    )
    limit_lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="With Redis: a concurrency slot held by a replica that died is freed after this long.",
    )

    log_level: str = Field(default="info", description="debug, info, warning or error.")
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto", description="'json': one JSON object per line; 'auto': text on a terminal, else JSON."
    )

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue_items < self.max_inputs_per_request:
            raise ValueError(
                f"DUET_MAX_QUEUE_ITEMS ({self.max_queue_items}) must be at least DUET_MAX_INPUTS_PER_REQUEST "
                f"({self.max_inputs_per_request}), or a full-size request could never be queued"
            )
        if self.job_heartbeat_timeout_seconds <= 2 * self.job_heartbeat_seconds:
            raise ValueError(
                f"DUET_JOB_HEARTBEAT_TIMEOUT_SECONDS ({self.job_heartbeat_timeout_seconds}) must be more than twice "
                f"DUET_JOB_HEARTBEAT_SECONDS ({self.job_heartbeat_seconds}), or a slow heartbeat fails a healthy job"
            )
        return self

    @property
    def registry_dir(self) -> Path:
        return layout.registry_dir(self.data_dir)

    @property
    def collections_dir(self) -> Path:
        return layout.collections_dir(self.data_dir)

    @property
    def holds_data_dir_lock(self) -> bool:
        """Whether a server takes the data-dir lock (`common.lifetime.hold_data_dir`). The lock exists
        because the faiss backend's collection files (store + index under data_dir/collections) have
        exactly one writer: two processes would each replay and write them. With the milvus backend
        the collections live in Milvus, which serialises writers itself, so API replicas may share one
        data dir (registry, datasets, checkpoints) and none of them takes the lock."""
        return self.collections_backend == "faiss"

    def missing_backend_package(self) -> str | None:
        """One line naming what to install when the chosen collections backend's package is absent."""
        if self.collections_backend == "milvus" and importlib.util.find_spec("pymilvus") is None:
            return (
                "DUET_COLLECTIONS_BACKEND=milvus needs pymilvus, which is not installed: "
                "pip install 'duet[milvus]' (or set DUET_COLLECTIONS_BACKEND=faiss)"
            )
        return None

    @property
    def milvus_uri_or_default(self) -> str:
        """`milvus_uri`, or milvus-lite's file under the data dir when it is unset."""
        return self.milvus_uri or str(layout.milvus_lite_file(self.data_dir))

    @property
    def datasets_dir(self) -> Path:
        return layout.datasets_dir(self.data_dir)

    @property
    def jobs_db(self) -> Path:
        return layout.jobs_db(self.data_dir)
