"""Quantised collections (issue 13, part 4): index memory, recall@10 against exact float search, and
search throughput of float, int8 and binary collections, with and without rescoring.

What it does, at N 384-d unit vectors (the issue asks 1M; `--n`, default 200k on a shared 2-core box):
1. Data: 1000 cluster centres, 20 sub-centres around each, points around those (near neighbours at
   cosine ~0.85, as paraphrases are under a sentence encoder; the bulk near 0). Held-out queries from
   the same distribution; the exact top 10 of each (raw `IndexFlatIP`) is the ground truth.
2. One store filled through `Collection.upsert` (timed), copied under each variant, whose index is then
   built from it as a collection opening without a snapshot does (timed): none/flat (exact float),
   int8/flat, binary/flat, binary/hnsw, and none/hnsw with `recall_target` 0.95 (part 5).
3. Per variant: the index's memory, as the RSS a fresh process grows by when it loads the snapshot
   (plus the snapshot's size); recall@10 and throughput through `Collection.search` (what the service
   calls: query normalisation, index search, rescoring from the store, hit rows), batched (256 queries
   per call, queries/s) and single-query (p50 ms), with rescoring on and off.
4. A check on a harder distribution, raw FAISS only (no collections): `bench/search.py`'s vectors
   (centre + noise of norm ~1: within-cluster cosine ~0.5, neighbours barely above the crowd), where
   quantised candidates hold far fewer of the true neighbours.

Targets (issue 13): int8 with rescoring recall@10 >= 0.99 at <= 0.35x the float index's memory;
binary with rescoring recall@10 >= 0.95 at >= 5x exact float's query throughput.

    python bench/quantized_collections.py            # 200k vectors, writes its section of bench/RESULTS.md
    python bench/quantized_collections.py --n 20000 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import LoadSampler, code_state, machine_summary  # noqa: E402
from bench.results import write_section  # noqa: E402
from index.collection import Collection  # noqa: E402
from index.config import CollectionConfig  # noqa: E402
from index.engine import IndexSpec  # noqa: E402
from index.items import StoredItem  # noqa: E402
from index.layout import SNAPSHOT_FILE, STORE_FILE  # noqa: E402
from index.manager import CollectionManager  # noqa: E402

DIM = 384
K = 10
N_QUERIES = 1000
BATCH = 256
CENTRES, SUBS = 1000, 20
UPSERT_BATCH = 10_000
TIME_S = 4.0  # each throughput measurement runs whole query sets until this long has passed
SINGLE = 100  # single-query latencies measured per variant
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("float flat (exact)", {"kind": "flat"}),
    ("int8 flat", {"kind": "flat", "quantization": "int8"}),
    ("binary flat", {"kind": "flat", "quantization": "binary"}),
    ("binary hnsw", {"kind": "hnsw", "quantization": "binary"}),
    ("float hnsw, recall_target 0.95", {"kind": "hnsw", "recall_target": 0.95}),
]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n vectors, N_QUERIES queries): clusters of sub-clusters, deterministic."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, 1, DIM), dtype=np.float32)
    subs = (centres + 0.7 * rng.standard_normal((CENTRES, SUBS, DIM), dtype=np.float32)).reshape(-1, DIM)

    def draw(count: int, rng: np.random.Generator) -> np.ndarray:
        out = np.empty((count, DIM), dtype=np.float32)
        for start in range(0, count, 50_000):
            stop = min(count, start + 50_000)
            points = subs[rng.integers(0, len(subs), stop - start)]
            out[start:stop] = unit(points + 0.5 * rng.standard_normal((stop - start, DIM), dtype=np.float32))
        return out

    return draw(n, np.random.default_rng([seed, 1])), draw(N_QUERIES, np.random.default_rng([seed, 2]))


def exact_top(data: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    index = faiss.IndexFlatIP(DIM)
    index.add(data)
    return index.search(queries, k)[1]


def recall(found: list[list[int]] | np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(map(int, f)) & set(map(int, t))) / len(t) for f, t in zip(found, truth)]))


# -- collections ------------------------------------------------------------------------------------


def fill_store(root: Path, data: np.ndarray) -> tuple[Path, float]:
    """One float collection holding every vector; returns its closed store file and the upsert rate."""
    manager = CollectionManager(root)
    c = manager.create(CollectionConfig(name="source", dim=DIM, index=IndexSpec(kind="flat"), modalities=("vector",)))
    started = time.perf_counter()
    for start in range(0, len(data), UPSERT_BATCH):
        block = data[start : start + UPSERT_BATCH]
        c.upsert([StoredItem(id=f"i{start + i}", modality="vector", vector=v) for i, v in enumerate(block)])
    rate = len(data) / (time.perf_counter() - started)
    manager.close()
    return root / "source" / STORE_FILE, rate


def open_variant(root: Path, name: str, spec: IndexSpec, store: Path) -> tuple[CollectionManager, Collection, float]:
    """A collection of this spec over a copy of the filled store, its index built from the store (as
    when a collection opens without a snapshot), then snapshotted."""
    manager = CollectionManager(root)
    manager.create(CollectionConfig(name=name, dim=DIM, index=spec, modalities=("vector",)))
    manager.close()
    folder = root / name
    for suffix in ("", "-wal", "-shm"):  # SQLite's side files go with their database, or not at all
        target, source = folder / f"{STORE_FILE}{suffix}", Path(f"{store}{suffix}")
        target.unlink(missing_ok=True)
        if source.exists():
            shutil.copyfile(source, target)
    (folder / SNAPSHOT_FILE).unlink()
    manager = CollectionManager(root)
    started = time.perf_counter()
    collection = manager.get(name)
    built = time.perf_counter() - started
    collection.snapshot()
    return manager, collection, built


_RSS_PROBE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from index.engine import FaissIndex, IndexSpec
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
spec = IndexSpec(**json.loads(sys.argv[2]))
before = rss()
index = FaissIndex.read_snapshot(Path(sys.argv[1]), spec)
print(json.dumps({"rss_kib": rss() - before, "ntotal": int(index.index.ntotal)}))
"""


def index_rss_mib(snapshot: Path, spec: IndexSpec) -> float:
    """What loading the index costs a fresh process (FAISS's memory is invisible to Python's allocators)."""
    done = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(snapshot), json.dumps(spec.as_dict()), str(REPO)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return float(json.loads(done.stdout.strip().splitlines()[-1])["rss_kib"]) / 1024


def ids_of(hits: list[list[Any]]) -> list[list[int]]:
    return [[int(h.id[1:]) for h in row] for row in hits]


def batched(collection: Collection, queries: np.ndarray, rescore: bool) -> tuple[float, list[list[int]]]:
    """(queries/s, ids found): whole query sets in BATCH-query calls until TIME_S has passed."""
    found: list[list[int]] = []
    done, started = 0, time.perf_counter()
    while not found or time.perf_counter() - started < TIME_S:
        rows: list[list[int]] = []
        for start in range(0, len(queries), BATCH):
            rows += ids_of(collection.search(queries[start : start + BATCH], K, rescore=rescore))
        found = found or rows
        done += len(queries)
    return done / (time.perf_counter() - started), found


def single_p50_ms(collection: Collection, queries: np.ndarray, rescore: bool) -> float:
    times = []
    for query in queries[:SINGLE]:
        started = time.perf_counter()
        collection.search(query[None, :], K, rescore=rescore)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


@dataclass
class Row:
    variant: str
    factory: str
    rescore: bool | None  # None: nothing to rescore (a float index)
    rss_mib: float
    snapshot_mib: float
    build_s: float
    recall: float
    qps: float
    p50_ms: float
    tuning: dict[str, Any] | None = None


def measure(root: Path, store: Path, queries: np.ndarray, truth: np.ndarray) -> list[Row]:
    rows = []
    for i, (label, options) in enumerate(VARIANTS):
        spec = IndexSpec(**options)
        manager, collection, built = open_variant(root, f"v{i}", spec, store)
        try:
            snapshot = collection.data / SNAPSHOT_FILE
            rss, size = index_rss_mib(snapshot, spec), snapshot.stat().st_size / 2**20
            modes = [True, False] if collection.index.quantized else [None]
            for mode in modes:
                qps, found = batched(collection, queries, rescore=bool(mode))
                p50 = single_p50_ms(collection, queries, rescore=bool(mode))
                tuning = collection.index.tuning
                rows.append(
                    Row(label, collection.index.factory, mode, rss, size, built, recall(found, truth), qps, p50, tuning)
                )
                print(f"  {rows[-1]}", flush=True)
        finally:
            manager.close()
            shutil.rmtree(root / f"v{i}", ignore_errors=True)  # one variant's copy of the store at a time
    return rows


# -- the harder distribution, raw FAISS ---------------------------------------------------------


def harder_distribution(n: int) -> dict[str, float]:
    """recall@10 on bench/search.py's vectors for int8 and binary candidates (k*4 = 72 per query, as the
    collections fetch) rescored exactly in numpy, and unrescored; raw FAISS, no store."""
    from bench.search import make_queries, make_vectors

    data, queries = make_vectors(n, 0)[0], make_queries(0)[:N_QUERIES]
    truth = exact_top(data, queries)
    candidates = (K + 8) * 4
    out = {}
    sq = faiss.index_factory(DIM, "SQ8", faiss.METRIC_INNER_PRODUCT)
    sq.train(data[:65_536])
    sq.add(data)
    binary = faiss.IndexBinaryFlat(DIM)
    binary.add(np.packbits(data > 0, axis=1))
    for name, found in (
        ("int8", sq.search(queries, candidates)[1]),
        ("binary", binary.search(np.packbits(queries > 0, axis=1), candidates)[1]),
    ):
        out[f"{name} raw"] = recall(found[:, :K], truth)
        scores = np.einsum("nd,nmd->nm", queries, data[found])
        out[f"{name} rescored"] = recall(np.take_along_axis(found, np.argsort(-scores, axis=1)[:, :K], 1), truth)
    return out


# -- report -----------------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    upsert_rate: float
    rows: list[Row] = field(default_factory=list)
    harder: dict[str, float] = field(default_factory=dict)


def table(run: Run) -> str:
    base = next(r for r in run.rows if r.variant.startswith("float flat"))
    lines = [
        "| collection | FAISS index | rescore | index RSS MiB | x float | snapshot MiB | build s | recall@10 | "
        "batched q/s | x exact float | single p50 ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run.rows:
        rescore = "-" if r.rescore is None else ("yes" if r.rescore else "no")
        lines.append(
            f"| {r.variant} | `{r.factory}` | {rescore} | {r.rss_mib:.0f} | {r.rss_mib / base.rss_mib:.3f} | "
            f"{r.snapshot_mib:.0f} | {r.build_s:.1f} | {r.recall:.4f} | {r.qps:.0f} | {r.qps / base.qps:.2f} | "
            f"{r.p50_ms:.2f} |"
        )
    return "\n".join(lines)


def verdicts(run: Run) -> list[str]:
    base = next(r for r in run.rows if r.variant.startswith("float flat"))
    out = []
    int8 = next(r for r in run.rows if r.variant == "int8 flat" and r.rescore)
    ok = int8.recall >= 0.99 and int8.rss_mib / base.rss_mib <= 0.35
    out.append(
        f"- int8 + rescoring: recall@10 {int8.recall:.4f} (target >= 0.99) at {int8.rss_mib / base.rss_mib:.3f}x "
        f"the float index's memory (target <= 0.35x): **{'met' if ok else 'missed'}**"
    )
    for r in (r for r in run.rows if r.variant.startswith("binary") and r.rescore):
        ok = r.recall >= 0.95 and r.qps / base.qps >= 5
        out.append(
            f"- {r.variant} + rescoring: recall@10 {r.recall:.4f} (target >= 0.95) at {r.qps / base.qps:.2f}x exact "
            f"float's batched throughput (target >= 5x): **{'met' if ok else 'missed'}**"
        )
    tuned = next((r for r in run.rows if r.tuning), None)
    if tuned and tuned.tuning:
        t = tuned.tuning
        out.append(
            f"- {tuned.variant}: efSearch {t['ef_search']} chosen, recall@{t['k']} measured by the collection with "
            f"{t['sample_queries']} new points among its own vectors (index.recall) {t['recall']:.4f} (reached: "
            f"{t['reached']}); the held-out queries: {tuned.recall:.4f}"
        )
    return out


def render(run: Run, command: str, code: str, started: datetime.datetime, elapsed: float, load: str) -> str:
    software = [f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads)", f"numpy {np.__version__}"]
    harder = ", ".join(f"{k} {v:.3f}" for k, v in run.harder.items())
    return "\n".join(
        [
            "## Quantised collections (`bench/quantized_collections.py`)",
            f"- Command: `{command}`",
            f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed / 60:.1f} min",
            f"- Machine: {machine_summary(software, memory=True, system=True)}",
            f"- Code at start: {code}",
            f"- Load average (1 min) during the run: {load} (on {os.cpu_count()} cores; other jobs shared them)",
            f"- Data: {run.n:,} 384-d unit vectors (the issue asks 1M; this shared 2-core machine ran {run.n:,}), "
            f"{CENTRES} centres x {SUBS} sub-centres, {N_QUERIES} held-out queries, k = {K}; ground truth: exact "
            f"float top 10. Store filled at {run.upsert_rate:.0f} items/s; each index built from it (build s). "
            "Rescoring: k + 8 candidates x oversample 4 from the index, ranked by the stored float vectors.",
            '- "index RSS": what a fresh process grows by loading the snapshot (FAISS memory, incl. the id map); '
            "throughput and latency through `Collection.search` in process (rows looked up, hits built).",
            "",
            table(run),
            "",
            *verdicts(run),
            f"- Harder distribution (bench/search.py's, within-cluster cosine ~0.5), raw FAISS, {run.n:,} vectors, "
            f"recall@10 with 72 candidates: {harder}",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--no-write", action="store_true", help="print, do not write bench/RESULTS.md")
    parser.add_argument("--keep", action="store_true", help="keep the data folder")
    args = parser.parse_args()
    started, load, code = datetime.datetime.now(datetime.timezone.utc), LoadSampler(), code_state(["index", "bench"])
    clock = time.perf_counter()
    data, queries = make_data(args.n)
    truth = exact_top(data, queries)
    root = Path(tempfile.mkdtemp(prefix="duet-quant-"))
    try:
        store, rate = fill_store(root, data)
        print(f"store filled: {rate:.0f} items/s", flush=True)
        run = Run(args.n, rate)
        del data
        run.rows = measure(root, store, queries, truth)
        run.harder = harder_distribution(args.n)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load.stop()
    section = render(run, "python " + " ".join(sys.argv), code, started, time.perf_counter() - clock, load.summary())
    print(section)
    if not args.no_write:
        write_section("quantized_collections", section)


if __name__ == "__main__":
    main()
