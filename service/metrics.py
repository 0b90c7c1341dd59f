"""Prometheus metrics, registered on a per-app `CollectorRegistry`.

A private registry (not prometheus_client's global one) keeps two apps in one process,
as tests build them, from colliding, and keeps imports free of side effects.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "duet_requests_total", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_latency = Histogram(
            "duet_request_latency_seconds", "HTTP request latency", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.errors = Counter("duet_errors_total", "Errors returned, by kind (error code)", ["kind"], registry=r)
        self.queue_depth = Gauge("duet_queue_depth", "Inputs waiting for a forward pass", ["model"], registry=r)
        self.batch_size = Histogram(
            "duet_batch_size", "Inputs per forward pass", ["model", "modality"], buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "duet_batch_padded_tokens",
            "Tokens computed per text batch: batch size x longest, or the sum of lengths when packed",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.inference_latency = Histogram(
            "duet_inference_latency_seconds",
            "Forward pass time per batch",
            ["model", "modality"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("duet_inputs_total", "Inputs embedded", ["model", "modality"], registry=r)
        self.truncated = Counter("duet_truncated_inputs_total", "Texts cut to the model's limit", ["model"], registry=r)
        self.models_loaded = Gauge("duet_models_loaded", "Model versions in memory", registry=r)
        self.model_memory = Gauge("duet_model_memory_bytes", "Parameter bytes of loaded models", registry=r)
        self.alias_swaps = Counter(
            "duet_alias_swaps_total", "Alias moves served after the new version was warmed up", ["alias"], registry=r
        )
        self.alias_swap_failures = Counter(
            "duet_alias_swap_failures_total",
            "Alias moves refused (reason: contract = incompatible vectors, load = the version would not load)",
            ["alias", "reason"],
            registry=r,
        )

        # Auth and limits.
        self.rate_limited = Counter(
            "duet_rate_limited_total", "Requests refused with 429 by limit (rate, concurrency)", ["limit"], registry=r
        )
        self.limiter_unavailable = Counter(
            "duet_limiter_unavailable_total",
            "Requests let through unlimited because the limiter's Redis was unreachable (fail open)",
            registry=r,
        )
        # Jobs: counters where the API sees the event; states read from the store at scrape time.
        self.jobs = Gauge("duet_jobs", "Jobs in the store by state (read at scrape time)", ["state"], registry=r)
        self.job_submissions = Counter("duet_job_submissions_total", "Jobs created through the API", registry=r)
        self.job_cancels = Counter("duet_job_cancels_total", "Cancel requests accepted through the API", registry=r)
        self.job_resumes = Counter("duet_job_resumes_total", "Resumes accepted through the API", registry=r)
        # Collections: sizes read at scrape time; search timed around the index call only.
        self.collections = Gauge("duet_collections", "Collections open in this service", registry=r)
        self.collection_items = Gauge("duet_collection_items", "Items per collection", ["collection"], registry=r)
        self.index_search_latency = Histogram(
            "duet_index_search_latency_seconds",
            "Time in the index for one search request (after queries are embedded)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def refresh_gauges(metrics: Metrics, state) -> None:
    """Gauges read from their sources when Prometheus scrapes (in a thread: store and SQLite
    reads), so no request path pays for them. A job store that is away leaves the job gauges
    at their last values rather than failing the scrape."""
    jobs = getattr(state, "jobs", None)
    if jobs is not None:
        try:
            for job_state, count in jobs.store.count_by_state().items():
                metrics.jobs.labels(job_state.value).set(count)
        except Exception as exc:  # noqa: BLE001 - StoreUnavailableError and kin: metrics must still render
            logger.warning("job counts not refreshed: %s", exc)
    try:  # the backend protocol's listing: on the milvus backend a query of a server that may be down
        opened, broken = state.collections.listing()
    except Exception as exc:  # noqa: BLE001 - BackendUnavailableError and kin: metrics must still render
        logger.warning("collection gauges not refreshed: %s", exc)
        return
    metrics.collections.set(len(opened) + len(broken))
    metrics.collection_items.clear()  # dropped collections disappear from the scrape
    for collection in opened:
        try:
            count = collection.count()
        except Exception:  # noqa: BLE001 - dropped since the listing, or unavailable
            continue
        metrics.collection_items.labels(collection.name).set(count)
