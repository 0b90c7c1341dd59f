"""Search benchmark: Duet collections (in process and over HTTP) against raw FAISS.

Why it exists: the spec sets targets for collection search relative to calling FAISS directly
(>= 0.9x raw throughput for 256-query batched searches, < 5 ms of API overhead per single
query) and for memory (an exact collection's server should hold <= 1.3x the raw vector
bytes). This script measures those, plus the recall and speed-up of the approximate indexes
(IVF at several nprobe, HNSW) against exact search, and upsert throughput in process and over
HTTP. It prints the tables and writes them to bench/RESULTS.md, replacing only the section
between `<!-- search:start -->` and `<!-- search:end -->` (other benchmarks own the rest).

How to run (from the repository root):

    python bench/search.py                     # full run: 100k and 1M vectors (most of an hour on 2 cores)
    python bench/search.py --quick             # smoke run: 20k vectors, short timing budgets
    python bench/search.py --sizes 100000      # one size only
    python bench/search.py --backend faiss,milvus [--n 100000]   # backends over HTTP: bench/search_backends.py

With `--backend`, this runs bench/search_backends.py instead (its own options; `--help` there):
the faiss and milvus collections backends side by side through a real `duet serve`, with
milvus on a `milvus-lite server`, including a 2-replica run. Without it, the modes below.

What it does, per size N (384-d unit vectors drawn around 1000 Gaussian cluster centres,
deterministic seed; 1024 held-out queries from the same distribution):
1. Raw FAISS in this process, one index at a time: `IndexFlatIP` (also the exact ground
   truth), `IVF{nlist},Flat` with nlist = 4*sqrt(N) at several nprobe, and `HNSW32`
   (efSearch 128, the collection default). Batched (256 queries per call) and single-query
   timings, recall@10 against the exact top 10.
2. Collections built in process with `CollectionManager` (upserts of 20k items, timed), each
   kind in its own data dir so a server can later load exactly one: flat, ivf (same nlist),
   hnsw. The same searches through `Collection.search` (this isolates the collection layer:
   SQLite lookups of the hits, payload decoding). The manager is closed (snapshots written).
3. `duet serve` on each data dir in turn (DUET_PRELOAD_MODELS='[]' and
   DUET_REGISTER_DEFAULT_MODELS=false: vector-only, no model is imported), queried over HTTP
   with a keep-alive httpx client and request bodies serialised before the clock starts:
   batched throughput and latency, single-query latency, recall; the server's VmRSS/VmHWM
   from /proc after loading, compared with the same server started on an empty data dir.
Once per run, on the empty server: upsert throughput over HTTP (20k vectors, 1000 per
request) against the same upserts in process.

The targets compare like with like under the same load: on a small shared machine the load
from other processes drifts over minutes, so each Duet call (in process, or over HTTP) is
alternated with a raw FAISS call on the very same index (the collection's in-memory index;
for HTTP, the server's snapshot loaded into this process before the server starts), and the
ratios and overheads come from those pairs. Step 1's own-index timings are reported as well.
Others edit the tree while benchmarks run, so every server start checks that index/, service/
and duet/ still hash to what this process imported, and that the server loaded the snapshot
(a rebuild from the store would be a different index); either failing fails that size.

Every wait is bounded, servers are always stopped (SIGTERM, then SIGKILL), and the temporary
data dirs are removed (unless --keep). At most one server runs at a time, and the big arrays
of one phase are freed before the next, so about two copies of the vectors are resident at
once (plus what the code under test itself copies, e.g. while writing a snapshot).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import gc
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import Budget, LoadSampler, ServerProcess, code_state, duet_serve, machine_summary  # noqa: E402
from bench.results import write_section  # noqa: E402
from index.collection import Collection  # noqa: E402
from index.config import CollectionConfig  # noqa: E402
from index.engine import FaissIndex, IndexSpec  # noqa: E402
from index.items import StoredItem  # noqa: E402
from index.layout import SNAPSHOT_FILE  # noqa: E402
from index.manager import CollectionManager  # noqa: E402


def code_fingerprint() -> str:
    """Hash of the code under test; others edit the tree, and servers must run what this process imported."""
    digest = hashlib.sha256()
    for path in sorted([*REPO.glob("index/*.py"), *REPO.glob("service/**/*.py"), *REPO.glob("duet/*.py")]):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


CODE_AT_IMPORT = code_fingerprint()

DEFAULT_RESULTS = REPO / "bench" / "RESULTS.md"
CODE_DIRS = ("index", "service", "duet")  # what a vector-only `duet serve` runs
DIM = 384
K = 10
CLUSTERS = 1000
GEN_CHUNK = 10_000
N_QUERIES = 1024
BATCH = 256
UPSERT_CHUNK = 20_000
HTTP_UPSERT_N = 20_000
HTTP_UPSERT_BATCH = 1000
NPROBES = (4, 16, 64)
HNSW_M = 32
EF_SEARCH = 128
KINDS = ("flat", "ivf", "hnsw")
TARGET_BATCH_RATIO = 0.9
TARGET_SINGLE_OVERHEAD_MS = 5.0
TARGET_MEMORY_RATIO = 1.3


FULL = Budget(batch_min=4, batch_max=60, batch_s=15.0, single_min=30, single_max=500, single_s=10.0)
QUICK = Budget(batch_min=2, batch_max=12, batch_s=2.0, single_min=10, single_max=100, single_s=1.5)


# -- workload --------------------------------------------------------------------------------


def _centres(seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0])
    centres = rng.standard_normal((CLUSTERS, DIM), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _draw(centres: np.ndarray, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n unit vectors: a random centre plus noise of about unit norm (within-cluster cos ~0.5)."""
    labels = rng.integers(0, CLUSTERS, size=n)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    x *= np.float32(1.0 / math.sqrt(DIM))
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int32)


def make_vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per 10k chunk, so the first m vectors are the same for every n >= m."""
    centres = _centres(seed)
    vectors = np.empty((n, DIM), dtype=np.float32)
    labels = np.empty(n, dtype=np.int32)
    for chunk, start in enumerate(range(0, n, GEN_CHUNK)):
        stop = min(n, start + GEN_CHUNK)
        vectors[start:stop], labels[start:stop] = _draw(centres, np.random.default_rng([seed, 1, chunk]), stop - start)
    return vectors, labels


def make_queries(seed: int) -> np.ndarray:
    return _draw(_centres(seed), np.random.default_rng([seed, 2]), N_QUERIES)[0]


def ivf_nlist(n: int) -> int:
    """4*sqrt(N), capped so the collection has the 39*nlist vectors it needs to train."""
    return max(16, min(int(4 * math.sqrt(n)), n // 40))


# -- timing ----------------------------------------------------------------------------------


@dataclass
class Timing:
    queries_per_call: int
    latencies: list[float]

    @property
    def calls(self) -> int:
        return len(self.latencies)

    @property
    def qps(self) -> float:
        return self.queries_per_call * len(self.latencies) / sum(self.latencies)

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000)


def measure(
    call: Callable[[Any], Any], inputs: Sequence[Any], per_call: int, lo: int, hi: int, budget_s: float
) -> Timing:
    """Warm up once, then call over `inputs` round-robin: >= lo calls, then until hi or budget."""
    call(inputs[0])
    latencies: list[float] = []
    started = time.perf_counter()
    while len(latencies) < hi and (len(latencies) < lo or time.perf_counter() - started < budget_s):
        arg = inputs[len(latencies) % len(inputs)]
        t0 = time.perf_counter()
        call(arg)
        latencies.append(time.perf_counter() - t0)
    return Timing(per_call, latencies)


def measure_pair(
    batched: Callable[[Any], Any],
    single: Callable[[Any], Any],
    batch_inputs: Sequence[Any],
    single_inputs: Sequence[Any],
    budget: Budget,
) -> tuple[Timing, Timing]:
    b = measure(batched, batch_inputs, BATCH, budget.batch_min, budget.batch_max, budget.batch_s)
    s = measure(single, single_inputs, 1, budget.single_min, budget.single_max, budget.single_s)
    return b, s


@dataclass
class Paired:
    """Raw FAISS and a Duet path on the same index, timed alternately under the same background load."""

    batch_raw: Timing
    batch_svc: Timing
    single_raw: Timing
    single_svc: Timing

    @property
    def batch_ratio(self) -> float:
        return self.batch_svc.qps / self.batch_raw.qps

    @property
    def single_overhead_ms(self) -> float:
        return self.single_svc.pct_ms(50) - self.single_raw.pct_ms(50)


def measure_alternating(
    raw: Callable[[Any], Any],
    svc: Callable[[Any], Any],
    inputs: Sequence[tuple[Any, Any]],
    per_call: int,
    lo: int,
    hi: int,
    budget_s: float,
) -> tuple[Timing, Timing]:
    """Like `measure`, for two paths: each round runs both on the same input, the order flipping each round."""
    raw(inputs[0][0])
    svc(inputs[0][1])
    times: tuple[list[float], list[float]] = ([], [])
    started = time.perf_counter()
    while len(times[0]) < hi and (len(times[0]) < lo or time.perf_counter() - started < budget_s):
        i = len(times[0])
        pair = inputs[i % len(inputs)]
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            (raw, svc)[side](pair[side])
            times[side].append(time.perf_counter() - t0)
    return Timing(per_call, times[0]), Timing(per_call, times[1])


def measure_paired(
    raw: Callable[[Any], Any],
    svc: Callable[[Any], Any],
    batch_inputs: Sequence[tuple[Any, Any]],
    single_inputs: Sequence[tuple[Any, Any]],
    budget: Budget,
) -> Paired:
    b = measure_alternating(raw, svc, batch_inputs, BATCH, budget.batch_min, budget.batch_max, budget.batch_s)
    s = measure_alternating(raw, svc, single_inputs, 1, budget.single_min, budget.single_max, budget.single_s)
    return Paired(b[0], b[1], s[0], s[1])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(set(f[:K].tolist()) & set(t[:K].tolist())) for f, t in zip(found, truth))
    return hits / (K * len(truth))


def batches(queries: np.ndarray) -> list[np.ndarray]:
    return [queries[i : i + BATCH] for i in range(0, len(queries), BATCH)]


def singles(queries: np.ndarray) -> list[np.ndarray]:
    return [queries[i : i + 1] for i in range(len(queries))]


# -- results ---------------------------------------------------------------------------------


@dataclass
class SearchRow:
    """One index configuration: raw FAISS (own index), the collection in process, and over HTTP.

    `coll` and `http` pair the Duet path with raw FAISS on the very same index (the collection's
    in-memory index; the server's snapshot loaded into this process), timed alternately.
    """

    label: str  # flat, ivf nprobe=16, hnsw
    kind: str
    nprobe: int | None = None
    raw_recall: float | None = None
    coll_recall: float | None = None
    http_recall: float | None = None
    raw: tuple[Timing, Timing] | None = None
    coll: Paired | None = None
    http: Paired | None = None


@dataclass
class BuildRow:
    kind: str
    factory: str = ""
    raw_build_s: float | None = None
    upsert_s: float | None = None
    close_s: float | None = None
    count: int | None = None


@dataclass
class MemoryRow:
    kind: str
    startup_s: float
    rss_mib: float
    hwm_mib: float
    rss_after_mib: float | None = None


@dataclass
class SizeResult:
    n: int
    nlist: int
    builds: dict[str, BuildRow] = field(default_factory=dict)
    rows: list[SearchRow] = field(default_factory=list)
    memory: dict[str, MemoryRow] = field(default_factory=dict)

    def row(self, kind: str, nprobe: int | None = None) -> SearchRow:
        for r in self.rows:
            if r.kind == kind and r.nprobe == nprobe:
                return r
        label = f"ivf nprobe={nprobe}" if kind == "ivf" else kind
        self.rows.append(SearchRow(label, kind, nprobe))
        return self.rows[-1]


@dataclass
class RunResult:
    empty_rss_mib: float = 0.0
    empty_hwm_mib: float = 0.0
    health_p50_ms: float = 0.0
    http_upsert_vps: float = 0.0
    http_upsert_p50_ms: float = 0.0
    inproc_upsert_vps: float = 0.0
    sizes: list[SizeResult] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    status: str = "complete"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def proc_status(pid: int | str = "self") -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


# -- raw FAISS -------------------------------------------------------------------------------


def raw_pair(index: Any, queries: np.ndarray, budget: Budget) -> tuple[Timing, Timing]:
    search = raw_searcher(index, None)  # keeps the nprobe already set
    return measure_pair(search, search, batches(queries), singles(queries), budget)


def raw_searcher(index: Any, nprobe: int | None) -> Callable[[np.ndarray], Any]:
    """Plain `index.search`, with the nprobe / efSearch a collection would use (IDMap2 unwrapped to set them)."""
    base = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if nprobe is not None:
        faiss.extract_index_ivf(base).nprobe = nprobe
    if isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = EF_SEARCH
    return lambda queries: index.search(queries, K)


def run_raw(res: SizeResult, vectors: np.ndarray, queries: np.ndarray, budget: Budget, seed: int) -> np.ndarray:
    """Raw FAISS indexes one at a time; returns the exact top-K (row numbers) per query."""
    flat = faiss.IndexFlatIP(DIM)
    t0 = time.perf_counter()
    flat.add(vectors)
    res.builds["flat"] = BuildRow("flat", raw_build_s=time.perf_counter() - t0)
    truth = flat.search(queries, K)[1]
    row = res.row("flat")
    row.raw_recall = 1.0
    row.raw = raw_pair(flat, queries, budget)
    log(f"raw flat: {row.raw[0].qps:.0f} q/s batched, single p50 {row.raw[1].pct_ms(50):.2f} ms")
    del flat
    gc.collect()

    ivf = faiss.index_factory(DIM, f"IVF{res.nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng([seed, 3])
    sample_n = min(len(vectors), 64 * res.nlist)
    t0 = time.perf_counter()
    ivf.train(vectors[np.sort(rng.choice(len(vectors), sample_n, replace=False))])
    ivf.add(vectors)
    res.builds["ivf"] = BuildRow("ivf", raw_build_s=time.perf_counter() - t0)
    for nprobe in NPROBES:
        row = res.row("ivf", nprobe)
        row.raw_recall = recall_at_k(raw_searcher(ivf, nprobe)(queries)[1], truth)
        row.raw = raw_pair(ivf, queries, budget)
        log(f"raw ivf nprobe={nprobe}: recall {row.raw_recall:.3f}, {row.raw[0].qps:.0f} q/s batched")
    del ivf
    gc.collect()

    hnsw = faiss.index_factory(DIM, f"HNSW{HNSW_M}", faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    hnsw.add(vectors)
    res.builds["hnsw"] = BuildRow("hnsw", raw_build_s=time.perf_counter() - t0)
    row = res.row("hnsw")
    row.raw_recall = recall_at_k(raw_searcher(hnsw, None)(queries)[1], truth)
    row.raw = raw_pair(hnsw, queries, budget)
    log(
        f"raw hnsw: recall {row.raw_recall:.3f}, {row.raw[0].qps:.0f} q/s batched "
        f"({res.builds['hnsw'].raw_build_s:.0f} s build)"
    )
    del hnsw
    gc.collect()
    return truth


# -- collections in process ------------------------------------------------------------------


def collection_config(kind: str, nlist: int) -> CollectionConfig:
    spec = IndexSpec(kind=kind, nlist=nlist if kind == "ivf" else None, hnsw_m=HNSW_M, ef_search=EF_SEARCH)
    return CollectionConfig(name=kind, dim=DIM, metric="cosine", index=spec, modalities=("vector",))


def upsert_chunks(collection: Collection, vectors: np.ndarray, labels: np.ndarray, chunk: int, prefix: str) -> None:
    """What the upsert route does after parsing: normalise, build StoredItems, upsert."""
    for start in range(0, len(vectors), chunk):
        prepared = collection.prepare_vectors(vectors[start : start + chunk])
        items = [
            StoredItem(
                id=f"{prefix}{start + j}",
                modality="vector",
                vector=prepared[j],
                payload={"cluster": int(labels[start + j])},
            )
            for j in range(len(prepared))
        ]
        collection.upsert(items)


def hit_rows(results: list[list[Any]]) -> np.ndarray:
    return np.array([[int(h.id[1:]) for h in row] + [-1] * (K - len(row)) for row in results])


def collection_searcher(collection: Collection, nprobe: int | None) -> Callable[[np.ndarray], list[list[Any]]]:
    """What the search route does after parsing: normalise the queries, then search."""

    def search(queries: np.ndarray) -> list[list[Any]]:
        return collection.search(collection.prepare_vectors(queries), K, nprobe=nprobe)

    return search


def build_collection(
    res: SizeResult,
    kind: str,
    vectors: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    budget: Budget,
    work: Path,
) -> None:
    """Upsert all vectors into a fresh collection (own data dir), search it in process, close it."""
    manager = CollectionManager(work / f"n{res.n}-{kind}" / "collections")
    collection = manager.create(collection_config(kind, res.nlist))
    t0 = time.perf_counter()
    upsert_chunks(collection, vectors, labels, UPSERT_CHUNK, "v")
    build = res.builds[kind]
    build.upsert_s = time.perf_counter() - t0
    build.factory = collection.index.factory
    build.count = collection.store.count()
    log(f"collection {kind}: {res.n / build.upsert_s:.0f} vectors/s upsert -> {build.factory}")
    for nprobe in NPROBES if kind == "ivf" else (None,):
        row = res.row(kind, nprobe)
        search = collection_searcher(collection, nprobe)
        row.coll_recall = recall_at_k(hit_rows([h for b in batches(queries) for h in search(b)]), truth)
        raw = raw_searcher(collection.index.index, nprobe)
        pairs = lambda xs: [(x, x) for x in xs]  # noqa: E731
        row.coll = measure_paired(raw, search, pairs(batches(queries)), pairs(singles(queries)), budget)
        log(
            f"collection {row.label}: recall {row.coll_recall:.3f}, batched {row.coll.batch_svc.qps:.0f} q/s "
            f"(raw {row.coll.batch_raw.qps:.0f}), single p50 {row.coll.single_svc.pct_ms(50):.2f} ms "
            f"(raw {row.coll.single_raw.pct_ms(50):.2f})"
        )
    t0 = time.perf_counter()
    manager.close()
    build.close_s = time.perf_counter() - t0


def run_collections(
    res: SizeResult,
    vectors: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    budget: Budget,
    work: Path,
) -> None:
    for kind in KINDS:
        build_collection(res, kind, vectors, labels, queries, truth, budget, work)
        gc.collect()


# -- the server ------------------------------------------------------------------------------


def duet_server(data_dir: Path, log_path: Path) -> ServerProcess:
    """`duet serve`, vector-only (no model imported), on a free port; refused if the code under test has
    changed since this process imported it (the server would not run what the in-process phases ran)."""
    if (now := code_fingerprint()) != CODE_AT_IMPORT:
        raise RuntimeError(
            f"the code under test changed during the run (index/, service/, duet/: {CODE_AT_IMPORT} -> {now}); "
            "a server would not run what the in-process phases ran. Rerun when the tree is quiet"
        )
    env = {"DUET_PRELOAD_MODELS": "[]", "DUET_REGISTER_DEFAULT_MODELS": "false"}
    return duet_serve(data_dir, log_path, env, args=["--log-level", "warning"])


def snapshot_rebuilds(server: ServerProcess) -> list[str]:
    """Warnings the server logged about unusable snapshots (it then rebuilt from the store)."""
    return [line for line in server.log_text().splitlines() if "snapshot unusable" in line]


def post(client: httpx.Client, url: str, body: bytes) -> bytes:
    response = client.post(url, content=body, headers={"content-type": "application/json"})
    if response.status_code >= 300:
        raise RuntimeError(f"POST {url} -> {response.status_code}: {response.text[:300]}")
    return response.content


def poster(client: httpx.Client, url: str) -> Callable[[bytes], bytes]:
    return lambda body: post(client, url, body)


# --fast-wire: query vectors as base64 float32 (as /v1/embeddings emits them) and hits without payload or
# content (`"include": []`), the API's cheapest request and answer; default: JSON floats, full hits.
FAST_WIRE = False


def wire_vector(vector: np.ndarray) -> list[float] | str:
    if FAST_WIRE:
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return list(vector.tolist())


def search_bodies(queries: np.ndarray, nprobe: int | None) -> tuple[list[bytes], list[bytes]]:
    """Pre-serialised batched (256 per request) and single-query request bodies."""
    extra: dict[str, Any] = {"k": K} if nprobe is None else {"k": K, "nprobe": nprobe}
    if FAST_WIRE:
        extra["include"] = []
    batched = [
        json.dumps({"queries": [{"vector": wire_vector(v)} for v in b], **extra}).encode() for b in batches(queries)
    ]
    single = [json.dumps({"query": {"vector": wire_vector(v)}, **extra}).encode() for v in queries]
    return batched, single


def http_ids(content: bytes) -> list[list[int]]:
    return [[int(hit["id"][1:]) for hit in row] for row in json.loads(content)["results"]]


def load_snapshot_index(res: SizeResult, kind: str, work: Path) -> Any:
    """The FAISS index of a collection's snapshot, loaded into this process (the raw twin of the server's)."""
    path = work / f"n{res.n}-{kind}" / "collections" / kind / SNAPSHOT_FILE
    return FaissIndex.read_snapshot(path, collection_config(kind, res.nlist).index).index


def http_kind(
    res: SizeResult,
    kind: str,
    queries: np.ndarray,
    truth: np.ndarray,
    budget: Budget,
    server: ServerProcess,
    raw_index: Any,
) -> None:
    """Recall, then batched and single-query searches over HTTP alternated with raw FAISS on the same index."""
    url = f"{server.base}/v1/collections/{kind}/search"
    with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client:
        info = client.get(f"{server.base}/v1/collections/{kind}").json()
        if info["count"] != res.n:
            raise RuntimeError(f"collection {kind} holds {info['count']} items, expected {res.n}")
        send = poster(client, url)
        for nprobe in NPROBES if kind == "ivf" else (None,):
            row = res.row(kind, nprobe)
            batched, single = search_bodies(queries, nprobe)
            found = [ids for body in batched for ids in http_ids(send(body))]
            row.http_recall = recall_at_k(np.array([f + [-1] * (K - len(f)) for f in found]), truth)
            raw = raw_searcher(raw_index, nprobe)
            batch_pairs = list(zip(batches(queries), batched))
            row.http = measure_paired(raw, send, batch_pairs, list(zip(singles(queries), single)), budget)
            log(
                f"http {row.label}: recall {row.http_recall:.3f}, batched {row.http.batch_svc.qps:.0f} q/s "
                f"(raw {row.http.batch_raw.qps:.0f}), single p50 {row.http.single_svc.pct_ms(50):.2f} ms "
                f"(raw {row.http.single_raw.pct_ms(50):.2f})"
            )


def run_http(
    res: SizeResult, queries: np.ndarray, truth: np.ndarray, budget: Budget, work: Path, ready_timeout: float
) -> None:
    """One server per collection; its raw twin is loaded first, so the two load-time peaks never overlap."""
    for kind in KINDS:
        raw_index = load_snapshot_index(res, kind, work)
        gc.collect()
        with duet_server(work / f"n{res.n}-{kind}", work / f"server-n{res.n}-{kind}.log") as server:
            startup = server.wait_ready(ready_timeout)
            if rebuilt := snapshot_rebuilds(server):
                raise RuntimeError(f"server {kind} did not load the snapshot this process wrote: {rebuilt[0]}")
            time.sleep(1.0)
            rss, hwm = proc_status(server.pid)
            memory = res.memory[kind] = MemoryRow(kind, startup, rss, hwm)
            log(f"server {kind}: ready in {startup:.1f} s, VmRSS {rss:.0f} MiB, VmHWM {hwm:.0f} MiB")
            http_kind(res, kind, queries, truth, budget, server, raw_index)
            memory.rss_after_mib = proc_status(server.pid)[0]
        del raw_index
        gc.collect()


def run_empty_server(
    run: RunResult, vectors: np.ndarray, labels: np.ndarray, budget: Budget, work: Path, ready_timeout: float
) -> None:
    """Baseline RSS, the HTTP floor (GET /health), and HTTP upserts into a fresh collection."""
    data_dir = work / "empty"
    with duet_server(data_dir, work / "server-empty.log") as server:
        server.wait_ready(ready_timeout)
        time.sleep(1.0)
        run.empty_rss_mib, run.empty_hwm_mib = proc_status(server.pid)
        log(f"empty server: VmRSS {run.empty_rss_mib:.0f} MiB")
        with httpx.Client(timeout=httpx.Timeout(600, connect=10)) as client:
            health = measure(
                lambda _: client.get(f"{server.base}/health"),
                [None],
                1,
                budget.single_min,
                budget.single_max,
                budget.single_s,
            )
            run.health_p50_ms = health.pct_ms(50)
            body = {"name": "upsert_http", "dimension": DIM, "index": "flat"}
            post(client, f"{server.base}/v1/collections", json.dumps(body).encode())
            bodies = [
                json.dumps(
                    {
                        "items": [
                            {"id": f"h{start + j}", "vector": v, "payload": {"cluster": int(labels[start + j])}}
                            for j, v in enumerate(vectors[start : start + HTTP_UPSERT_BATCH].tolist())
                        ]
                    }
                ).encode()
                for start in range(0, len(vectors), HTTP_UPSERT_BATCH)
            ]
            url = f"{server.base}/v1/collections/upsert_http/items"
            latencies = []
            for body in bodies:
                t0 = time.perf_counter()
                response = client.put(url, content=body, headers={"content-type": "application/json"})
                latencies.append(time.perf_counter() - t0)
                if response.status_code != 200:
                    raise RuntimeError(f"PUT items -> {response.status_code}: {response.text[:300]}")
            run.http_upsert_vps = len(vectors) / sum(latencies)
            run.http_upsert_p50_ms = float(np.percentile(latencies, 50) * 1000)
            count = client.get(f"{server.base}/v1/collections/upsert_http").json()["count"]
            if count != len(vectors):
                raise RuntimeError(f"HTTP upsert stored {count} items, expected {len(vectors)}")
    log(f"HTTP upsert: {run.http_upsert_vps:.0f} vectors/s ({HTTP_UPSERT_BATCH} per request)")
    manager = CollectionManager(work / "inproc-upsert" / "collections")
    collection = manager.create(
        CollectionConfig(name="upsert", dim=DIM, index=IndexSpec(kind="flat"), modalities=("vector",))
    )
    t0 = time.perf_counter()
    upsert_chunks(collection, vectors, labels, HTTP_UPSERT_BATCH, "h")
    run.inproc_upsert_vps = len(vectors) / (time.perf_counter() - t0)
    manager.close()
    log(f"in-process upsert, same chunks: {run.inproc_upsert_vps:.0f} vectors/s")


# -- one size --------------------------------------------------------------------------------


def run_size(n: int, budget: Budget, seed: int, work: Path, ready_timeout: float) -> SizeResult:
    res = SizeResult(n=n, nlist=ivf_nlist(n))
    log(f"N={n}: generating vectors (nlist={res.nlist})")
    vectors, labels = make_vectors(n, seed)
    queries = make_queries(seed)
    truth = run_raw(res, vectors, queries, budget, seed)
    run_collections(res, vectors, labels, queries, truth, budget, work)
    del vectors, labels
    gc.collect()
    run_http(res, queries, truth, budget, work, ready_timeout)
    for kind in KINDS:
        shutil.rmtree(work / f"n{n}-{kind}", ignore_errors=True)
    return res


# -- report ----------------------------------------------------------------------------------


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def p50_p99(t: Timing, spec: str = ".2f") -> str:
    return f"{t.pct_ms(50):{spec}} / {t.pct_ms(99):{spec}}"


def raw_mib(n: int) -> float:
    return n * DIM * 4 / 2**20


BUILD_HEADER = ["index", "collection factory", "upsert vectors/s", "close s", "raw FAISS build s", "raw vectors/s"]
BATCH_HEADER = ["index", "raw (own index)", "in process: raw / collection", "coll/raw"]
BATCH_HEADER += ["HTTP run: raw / HTTP", f"HTTP/raw (>= {TARGET_BATCH_RATIO})", "HTTP p50 / p99 ms", "HTTP calls"]
SINGLE_HEADER = ["index", "raw (own index) p50 / p99", "in process: raw / collection p50", "collection overhead"]
SINGLE_HEADER += ["HTTP run: raw p50", "HTTP p50 / p99", f"API overhead (< {TARGET_SINGLE_OVERHEAD_MS:.0f} ms)"]
SINGLE_HEADER += ["HTTP calls"]
RECALL_HEADER = ["index", "recall raw (own index)", "recall collection", "recall HTTP", "speed-up raw (batched)"]
RECALL_HEADER += ["speed-up HTTP (batched)", "speed-up raw (single)", "speed-up HTTP (single)"]
MEMORY_HEADER = [
    "collection",
    "ready s",
    "VmRSS",
    "VmHWM",
    "RSS delta",
    f"delta / raw (exact <= {TARGET_MEMORY_RATIO})",
]
MEMORY_HEADER += ["VmHWM delta / raw", "VmRSS after searches"]


def build_table(res: SizeResult) -> str:
    def per_s(seconds: float | None) -> str:
        return fmt(res.n / seconds if seconds else None, ",.0f")

    rows = [
        [b.kind, f"`{b.factory}`", per_s(b.upsert_s), fmt(b.close_s), fmt(b.raw_build_s), per_s(b.raw_build_s)]
        for b in res.builds.values()
    ]
    return table(BUILD_HEADER, rows)


def batch_table(res: SizeResult) -> str:
    rows = []
    for r in res.rows:
        own, coll, http = r.raw[0], r.coll, r.http
        rows.append([r.label, f"{own.qps:,.0f}", f"{coll.batch_raw.qps:,.0f} / {coll.batch_svc.qps:,.0f}"])
        rows[-1] += [f"{coll.batch_ratio:.2f}", f"{http.batch_raw.qps:,.0f} / {http.batch_svc.qps:,.0f}"]
        rows[-1] += [f"{http.batch_ratio:.2f} ({met(http.batch_ratio >= TARGET_BATCH_RATIO)})"]
        rows[-1] += [p50_p99(http.batch_svc, ".1f"), str(http.batch_svc.calls)]
    return table(BATCH_HEADER, rows)


def single_table(res: SizeResult) -> str:
    rows = []
    for r in res.rows:
        own, coll, http = r.raw[1], r.coll, r.http
        overhead = f"{http.single_overhead_ms:.2f} ({met(http.single_overhead_ms < TARGET_SINGLE_OVERHEAD_MS)})"
        rows.append([r.label, p50_p99(own), f"{coll.single_raw.pct_ms(50):.2f} / {coll.single_svc.pct_ms(50):.2f}"])
        rows[-1] += [f"{coll.single_overhead_ms:.2f}", f"{http.single_raw.pct_ms(50):.2f}", p50_p99(http.single_svc)]
        rows[-1] += [overhead, str(http.single_svc.calls)]
    return table(SINGLE_HEADER, rows)


def recall_table(res: SizeResult) -> str:
    flat = res.row("flat")
    rows = []
    for r in res.rows:
        rows.append([r.label, fmt(r.raw_recall, ".3f"), fmt(r.coll_recall, ".3f"), fmt(r.http_recall, ".3f")])
        rows[-1] += [f"{r.raw[0].qps / flat.raw[0].qps:.1f}x"]
        rows[-1] += [f"{r.http.batch_svc.qps / flat.http.batch_svc.qps:.1f}x"]
        rows[-1] += [f"{flat.raw[1].pct_ms(50) / r.raw[1].pct_ms(50):.1f}x"]
        rows[-1] += [f"{flat.http.single_svc.pct_ms(50) / r.http.single_svc.pct_ms(50):.1f}x"]
    return table(RECALL_HEADER, rows)


def memory_table(res: SizeResult, run: RunResult) -> str:
    mib = raw_mib(res.n)
    rows = []
    for m in res.memory.values():
        delta = m.rss_mib - run.empty_rss_mib
        ratio = f"{delta / mib:.2f}" + (f" ({met(delta / mib <= TARGET_MEMORY_RATIO)})" if m.kind == "flat" else "")
        rows.append([m.kind, f"{m.startup_s:.1f}", f"{m.rss_mib:,.0f}", f"{m.hwm_mib:,.0f}", f"{delta:,.0f}", ratio])
        rows[-1] += [f"{(m.hwm_mib - run.empty_rss_mib) / mib:.2f}", fmt(m.rss_after_mib, ",.0f")]
    return table(MEMORY_HEADER, rows)


def size_tables(res: SizeResult, run: RunResult) -> str:
    return "\n\n".join(
        [
            f"### N = {res.n:,} (nlist = {res.nlist}, raw vectors {raw_mib(res.n):,.0f} MiB)",
            "Build: in-process upserts of 20k items (normalise, SQLite commit, index add); close = snapshot write.",
            build_table(res),
            f"Batched search, {BATCH} queries per call / request, queries/s. The target ratio pairs HTTP with raw "
            "FAISS on the same index (the server's snapshot, loaded here), timed alternately.",
            batch_table(res),
            "Single-query search, latency ms; overheads are p50 differences against raw FAISS on the same index, "
            "timed alternately.",
            single_table(res),
            "Recall@10 against exact search, and speed-up over exact (batched q/s; single-query p50).",
            recall_table(res),
            f"Server memory after loading one collection (MiB; empty server VmRSS {run.empty_rss_mib:.0f}).",
            memory_table(res, run),
        ]
    )


def machine() -> str:
    software = [f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)"]
    software += [f"numpy {np.__version__}", f"httpx {httpx.__version__}"]
    return machine_summary(software, memory=True, system=True)


def render(run: RunResult, command: str, code: str, started: datetime.datetime, elapsed_s: float, load: str) -> str:
    head = [
        "## Search: collections vs raw FAISS (`bench/search.py`)",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed_s / 60:.1f} min; run {run.status}",
        f"- Machine: {machine()}",
        f"- Code at start: {code}; fingerprint {CODE_AT_IMPORT} (every server checked against it)",
        f"- Load average (1 min) during the run: {load} (on {os.cpu_count()} cores; other jobs shared them)",
        f"- Data: 384-d unit vectors around {CLUSTERS} Gaussian centres (noise norm ~1), {N_QUERIES} held-out queries, "
        f"k = {K}; IVF nlist = 4*sqrt(N), HNSW M = {HNSW_M}, efSearch = {EF_SEARCH}. Raw baselines: "
        "`IndexFlatIP`, `IVF{nlist},Flat` (trained on min(N, 64*nlist) vectors), `HNSW32`, searched in the benchmark "
        'process. "collection" = `Collection.search` in process (incl. query normalisation and hit lookup); '
        '"HTTP" = `duet serve` (vector-only, no models) via a keep-alive httpx client, bodies pre-serialised.',
        f"- HTTP floor: `GET /health` p50 {run.health_p50_ms:.2f} ms.",
    ]
    parts = ["\n".join(head)]
    parts += [size_tables(res, run) for res in run.sizes]
    parts.append(
        f"### Upsert over HTTP ({HTTP_UPSERT_N:,} vectors, {HTTP_UPSERT_BATCH} per request, fresh flat collection)\n\n"
        + table(
            ["path", "vectors/s", "p50 per request ms"],
            [
                ["HTTP PUT /items", f"{run.http_upsert_vps:,.0f}", f"{run.http_upsert_p50_ms:.0f}"],
                ["in process, same chunks", f"{run.inproc_upsert_vps:,.0f}", "-"],
            ],
        )
    )
    parts.append("### Targets\n\n" + "\n".join(targets(run)))
    if run.failures:
        parts.append("### Failures\n\n" + "\n".join(f"- {f}" for f in run.failures))
    if run.warnings:
        parts.append("### Warnings\n\n" + "\n".join(f"- {w}" for w in run.warnings))
    return "\n\n".join(parts)


def targets(run: RunResult) -> list[str]:
    lines = []
    for res in run.sizes:
        for r in res.rows:
            ratio = r.http.batch_ratio
            lines.append(f"- N={res.n:,} {r.label}: batched HTTP/raw {ratio:.2f} >= {TARGET_BATCH_RATIO}: ")
            lines[-1] += met(ratio >= TARGET_BATCH_RATIO)
        for r in res.rows:
            overhead = r.http.single_overhead_ms
            lines.append(f"- N={res.n:,} {r.label}: single-query API overhead {overhead:.2f} ms < ")
            lines[-1] += f"{TARGET_SINGLE_OVERHEAD_MS:.0f} ms: {met(overhead < TARGET_SINGLE_OVERHEAD_MS)}"
        if "flat" in res.memory:
            ratio = (res.memory["flat"].rss_mib - run.empty_rss_mib) / raw_mib(res.n)
            lines.append(f"- N={res.n:,} exact server RSS delta / raw bytes {ratio:.2f} <= {TARGET_MEMORY_RATIO}: ")
            lines[-1] += met(ratio <= TARGET_MEMORY_RATIO)
    return lines


def write_results(path: Path, section: str) -> None:
    """Replace only our marked section of the results file (see bench/results.py)."""
    write_section("search", section, path)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="comma-separated collection sizes (default 100000,1000000; --quick: 20000)",
    )
    parser.add_argument("--quick", action="store_true", help="20k vectors and short timing budgets")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary data dir (default: TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to become ready")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown file (default: %(default)s)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--fast-wire",
        action="store_true",
        help='HTTP searches send base64 float32 vectors and "include": [] (hits without payload/content)',
    )
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [20_000] if args.quick else [100_000, 1_000_000]
    return args


@dataclass
class Reporter:
    """Renders, prints and (unless --no-write) writes the section; called after every size."""

    command: str
    results: Path | None
    started: datetime.datetime = field(default_factory=lambda: datetime.datetime.now().astimezone())
    t0: float = field(default_factory=time.perf_counter)
    load: LoadSampler = field(default_factory=LoadSampler)
    code: str = field(default_factory=lambda: code_state(CODE_DIRS))

    def __call__(self, run: RunResult, final: bool) -> None:
        if final:
            self.load.stop()
        elapsed = time.perf_counter() - self.t0
        report = render(run, self.command, self.code, self.started, elapsed, self.load.summary())
        if final:
            print("\n" + report + "\n")
        if self.results is not None:
            write_results(self.results, report)
            log(f"wrote {self.results} ({run.status})")


def run_all(run: RunResult, args: argparse.Namespace, budget: Budget, work: Path, report: Reporter) -> None:
    upsert_vectors, upsert_labels = make_vectors(HTTP_UPSERT_N, args.seed)
    run_empty_server(run, upsert_vectors, upsert_labels, budget, work, args.ready_timeout)
    del upsert_vectors, upsert_labels
    for leftover in ("empty", "inproc-upsert"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    for i, n in enumerate(args.sizes):
        try:
            run.sizes.append(run_size(n, budget, args.seed, work, args.ready_timeout))
        except Exception as exc:  # keep the sizes already measured; say what happened
            run.failures.append(f"N={n:,}: {type(exc).__name__}: {exc}")
            log(f"N={n} failed: {exc!r}")
            gc.collect()
        log(f"N={n} done; this process VmHWM {proc_status()[1]:,.0f} MiB")
        if i + 1 < len(args.sizes):
            run.status = f"in progress (N={args.sizes[i + 1]:,} running)"
            report(run, final=False)


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds, so servers are stopped and temp dirs removed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(arg == "--backend" or arg.startswith("--backend=") for arg in argv):
        import search_backends  # the backends over HTTP (bench/search_backends.py)

        return search_backends.main(argv, command=shlex.join(["python", "bench/search.py", *argv]))
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    args = parse_args(argv)
    global FAST_WIRE
    FAST_WIRE = args.fast_wire
    budget = QUICK if args.quick else FULL
    command = shlex.join(["python", "bench/search.py", *argv])
    report = Reporter(command, None if args.no_write else args.results)
    work = Path(tempfile.mkdtemp(prefix="duet-bench-search-", dir=args.workdir))
    log(f"work dir {work}; sizes {args.sizes}")
    run = RunResult()
    try:
        run_all(run, args, budget, work, report)
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    run.status = "complete" if not run.failures else "complete, with failures"
    report(run, final=True)
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
