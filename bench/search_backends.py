"""Search benchmark across collection backends: faiss vs milvus, through the HTTP API of `duet serve`.

Why it exists: collections can live in FAISS + SQLite on the server's disk (`faiss`, one writer per
collections folder) or in Milvus (`milvus`, any number of API replicas). README, "Scaling out",
says when to choose which; this measures it. Everything goes through the real HTTP API of a real
`duet serve` process (vector-only: no model is loaded), so the numbers include what a client sees.

How to run (from the repository root; `bench/search.py --backend ...` dispatches here):

    python bench/search.py --backend faiss,milvus              # both, 100k vectors (~10-15 min on 2 cores)
    python bench/search.py --backend faiss,milvus --n 20000    # smaller
    python bench/search.py --backend milvus --quick            # smoke run: 5k vectors, short budgets

What it measures, per backend (same vectors, same queries, in one run):
- upsert throughput: all N vectors (384-d, around 1000 Gaussian centres, as bench/search.py draws
  them) in batches of `--batch` items via `PUT /v1/collections/{name}/items`, one after the other;
  each body is serialised before its clock starts;
- recall@10 of the API's answers against exact search (numpy brute force over the same vectors);
- batched search (256 queries per request) throughput and latency p50/p99, and single-query
  throughput and latency p50/p99, from one keep-alive client;
- concurrent search: `--clients` threads, each its own keep-alive client, single-query searches
  for a fixed time; for milvus once against 1 replica and once split across 2 replicas (two
  `duet serve` processes, own data dirs, on the same Milvus server), the ratio showing what a
  second replica adds. faiss cannot run a second replica on the same collections (one writer).

The milvus backend runs against a real Milvus gRPC server: `milvus-lite server` (milvus-lite is a
single-process Python implementation of Milvus, so on a small machine it, not Duet, sets the
milvus numbers; a Milvus standalone or cluster has another profile). The bench starts it, and every
server, on free ports under a temporary folder, and always stops them (SIGTERM, then SIGKILL).
Ratios are milvus / faiss (or 2 replicas / 1) measured in the same run under the same load; the
load average is recorded, since other processes may share the cores.

Writes the `search-backends` section of bench/RESULTS.md (bench/results.py) unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import Budget, LoadSampler, ServerProcess, code_state, duet_serve, milvus_lite  # noqa: E402
from bench.results import write_section  # noqa: E402
from bench.search import (  # noqa: E402
    BATCH,
    CODE_DIRS,
    DIM,
    N_QUERIES,
    K,
    Timing,
    log,
    machine,
    make_queries,
    make_vectors,
    measure,
    proc_status,
    recall_at_k,
    table,
)

SECTION = "search-backends"
COLLECTION = "bench"
BACKENDS = ("faiss", "milvus")


FULL = Budget(batch_min=4, batch_max=60, batch_s=20.0, single_min=20, single_max=500, single_s=15.0, concurrent_s=20.0)
QUICK = Budget(batch_min=2, batch_max=10, batch_s=3.0, single_min=5, single_max=100, single_s=3.0, concurrent_s=5.0)


# -- processes -------------------------------------------------------------------------------------


def duet_server(
    data_dir: Path, log_path: Path, backend: str, milvus_uri: str | None, milvus_timeout: float = 10.0
) -> ServerProcess:
    """`duet serve`, vector-only (no model imported), on a free port with its own data dir."""
    env = {
        "DUET_PRELOAD_MODELS": "[]",
        "DUET_REGISTER_DEFAULT_MODELS": "false",
        "DUET_FAISS_GPU": "false",
        "DUET_COLLECTIONS_BACKEND": backend,
    }
    if milvus_uri:
        env["DUET_MILVUS_URI"] = milvus_uri
        env["DUET_MILVUS_TIMEOUT_SECONDS"] = str(milvus_timeout)
    return duet_serve(data_dir, log_path, env, args=["--log-level", "info"]).start()


def rss_mib(process: ServerProcess) -> float | None:
    try:
        return proc_status(process.pid)[0]
    except (OSError, KeyError):
        return None


# -- HTTP -----------------------------------------------------------------------------------------


def client(timeout: float = 600) -> httpx.Client:
    return httpx.Client(timeout=httpx.Timeout(timeout, connect=10), limits=httpx.Limits(max_keepalive_connections=4))


def send(http: httpx.Client, method: str, url: str, body: bytes) -> bytes:
    response = http.request(method, url, content=body, headers={"content-type": "application/json"})
    if response.status_code >= 300:
        raise RuntimeError(f"{method} {url} -> {response.status_code}: {response.text[:300]}")
    return response.content


def upsert_body(vectors: np.ndarray, labels: np.ndarray, start: int, stop: int) -> bytes:
    items = [
        {"id": f"v{start + j}", "vector": v, "payload": {"cluster": int(labels[start + j])}}
        for j, v in enumerate(vectors[start:stop].tolist())
    ]
    return json.dumps({"items": items}).encode()


def search_bodies(queries: np.ndarray) -> tuple[list[bytes], list[bytes]]:
    batched = [
        json.dumps({"queries": [{"vector": v} for v in queries[i : i + BATCH].tolist()], "k": K}).encode()
        for i in range(0, len(queries), BATCH)
    ]
    single = [json.dumps({"query": {"vector": v}, "k": K}).encode() for v in queries.tolist()]
    return batched, single


def hit_ids(content: bytes) -> list[list[int]]:
    return [[int(hit["id"][1:]) for hit in row] for row in json.loads(content)["results"]]


# -- results --------------------------------------------------------------------------------------


@dataclass
class Concurrent:
    replicas: int
    clients: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def qps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


@dataclass
class BackendResult:
    backend: str
    ready_s: float = 0.0
    upsert_s: float = 0.0
    upsert_latencies: list[float] = field(default_factory=list)
    count: int = 0
    recall: float = 0.0
    batched: Timing | None = None
    single: Timing | None = None
    concurrent: list[Concurrent] = field(default_factory=list)
    duet_rss_mib: float | None = None
    milvus_rss_mib: float | None = None
    flush_s: float | None = None

    def upsert_vps(self, n: int) -> float:
        return n / self.upsert_s


@dataclass
class Run:
    n: int
    batch: int
    clients: int
    index: str
    milvus_timeout: float
    results: dict[str, BackendResult] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    status: str = "complete"


# -- one backend ----------------------------------------------------------------------------------


def concurrent_search(bases: list[str], bodies: list[bytes], clients: int, seconds: float) -> Concurrent:
    """`clients` threads, client i on replica i % len(bases), single-query searches for `seconds`."""
    stop = threading.Event()
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    barrier = threading.Barrier(clients + 1)

    def work(i: int) -> None:
        url = f"{bases[i % len(bases)]}/v1/collections/{COLLECTION}/search"
        with client(timeout=120) as http:
            send(http, "POST", url, bodies[i % len(bodies)])  # warm the connection
            barrier.wait()
            j = i
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    send(http, "POST", url, bodies[j % len(bodies)])
                except (RuntimeError, httpx.HTTPError):
                    errors[i] += 1
                else:
                    latencies[i].append(time.perf_counter() - t0)
                j += clients

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait(timeout=300)
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for thread in threads:
        thread.join(timeout=300)
    elapsed = time.perf_counter() - t0  # requests in flight at the stop finish and count
    return Concurrent(len(bases), clients, elapsed, [x for xs in latencies for x in xs], sum(errors))


def measure_searches(
    res: BackendResult, base: str, queries: np.ndarray, truth: np.ndarray, budget: Budget, clients: int
) -> None:
    """Recall, batched and single-query timings from one client, then `clients` concurrent ones."""
    search_url = f"{base}/v1/collections/{COLLECTION}/search"
    batched, single = search_bodies(queries)
    with client() as http:
        found = [ids for body in batched for ids in hit_ids(send(http, "POST", search_url, body))]
        res.recall = recall_at_k(np.array([f + [-1] * (K - len(f)) for f in found]), truth)
        log(f"{res.backend}: recall@{K} {res.recall:.4f}")
        post = lambda body: send(http, "POST", search_url, body)  # noqa: E731
        res.batched = measure(post, batched, BATCH, budget.batch_min, budget.batch_max, budget.batch_s)
        log(f"{res.backend}: batched {res.batched.qps:,.0f} q/s, p50 {res.batched.pct_ms(50):.1f} ms")
        res.single = measure(post, single, 1, budget.single_min, budget.single_max, budget.single_s)
        log(f"{res.backend}: single {res.single.qps:,.1f} q/s, p50 {res.single.pct_ms(50):.2f} ms")
    res.concurrent.append(concurrent_search([base], single, clients, budget.concurrent_s))
    log(f"{res.backend}: {clients} clients on 1 replica: {res.concurrent[-1].qps:,.1f} q/s")


def flush(milvus_uri: str, base: str) -> float:
    """Seal milvus-lite's memtable (pymilvus `flush` on the physical collection); seconds it took."""
    from pymilvus import MilvusClient

    with client() as http:
        info = json.loads(http.get(f"{base}/v1/collections/{COLLECTION}").content)
    physical = info["stats"]["index"]["collection"]
    milvus = MilvusClient(uri=milvus_uri)
    try:
        t0 = time.perf_counter()
        milvus.flush(physical, timeout=600)
        return time.perf_counter() - t0
    finally:
        milvus.close()


def run_backend(
    run: Run,
    backend: str,
    vectors: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    budget: Budget,
    work: Path,
    replicas: int,
    ready_timeout: float,
) -> list[BackendResult]:
    """The backend's results: one, or for milvus two (as loaded, and after a flush)."""
    res = BackendResult(backend)
    out = [res]
    processes: list[ServerProcess] = []
    try:
        milvus_uri = None
        if backend == "milvus":
            milvus = milvus_lite(work / "milvus-data", work / "milvus-lite.log").start()
            processes.append(milvus)
            log(f"milvus-lite server listening after {milvus.wait_listening(ready_timeout):.1f} s ({milvus.base})")
            milvus_uri = milvus.base
        duet = duet_server(
            work / f"{backend}-1", work / f"duet-{backend}-1.log", backend, milvus_uri, run.milvus_timeout
        )
        processes.append(duet)
        res.ready_s = duet.wait_ready(ready_timeout)
        log(f"{backend}: duet serve ready in {res.ready_s:.1f} s")
        with client() as http:
            create = {"name": COLLECTION, "dimension": DIM, "index": run.index}
            send(http, "POST", f"{duet.base}/v1/collections", json.dumps(create).encode())
            url = f"{duet.base}/v1/collections/{COLLECTION}/items"
            started = time.perf_counter()
            for start in range(0, run.n, run.batch):
                body = upsert_body(vectors, labels, start, min(run.n, start + run.batch))
                t0 = time.perf_counter()
                send(http, "PUT", url, body)
                res.upsert_latencies.append(time.perf_counter() - t0)
                if start // run.batch % 20 == 19:
                    done = start + run.batch
                    log(f"{backend}: {done:,} upserted, {done / (time.perf_counter() - started):,.0f} vectors/s so far")
            res.upsert_s = sum(res.upsert_latencies)
            res.count = json.loads(http.get(f"{duet.base}/v1/collections/{COLLECTION}").content)["count"]
            if res.count != run.n:
                raise RuntimeError(f"{backend}: the collection holds {res.count} items after {run.n:,} upserts")
            log(f"{backend}: upsert {res.upsert_vps(run.n):,.0f} vectors/s ({run.batch} per request)")
        measure_searches(res, duet.base, queries, truth, budget, run.clients)
        res.duet_rss_mib = rss_mib(duet)
        if backend != "milvus":
            return out

        res.milvus_rss_mib = rss_mib(processes[0])
        # milvus-lite searches its unsealed memtable (the last writes, up to 128 MB) by brute force in
        # Python; sealed segments through their index. Milvus seals segments itself (by size and age).
        flushed = BackendResult(
            "milvus, flushed",
            ready_s=res.ready_s,
            upsert_s=res.upsert_s,
            upsert_latencies=res.upsert_latencies,
            count=res.count,
        )
        out.append(flushed)
        flushed.flush_s = flush(milvus_uri, duet.base)
        log(f"milvus: flushed in {flushed.flush_s:.1f} s")
        measure_searches(flushed, duet.base, queries, truth, budget, run.clients)
        bases = [duet.base]
        for r in range(2, replicas + 1):
            more = duet_server(
                work / f"{backend}-{r}", work / f"duet-{backend}-{r}.log", backend, milvus_uri, run.milvus_timeout
            )
            processes.append(more)
            more.wait_ready(ready_timeout)
            with client() as http:  # the second replica sees the first one's collection, no copy
                count = json.loads(http.get(f"{more.base}/v1/collections/{COLLECTION}").content)["count"]
            if count != run.n:
                raise RuntimeError(f"replica {r} sees {count} items, expected {run.n:,}")
            bases.append(more.base)
        if len(bases) > 1:
            _, single = search_bodies(queries)
            flushed.concurrent.append(concurrent_search(bases, single, run.clients, budget.concurrent_s))
            log(f"milvus: {run.clients} clients on {len(bases)} replicas: {flushed.concurrent[-1].qps:,.1f} q/s")
        flushed.duet_rss_mib = rss_mib(duet)
        flushed.milvus_rss_mib = rss_mib(processes[0])
        for process in processes:
            process.check_alive()
    except Exception as exc:  # name the processes that died: a refused connection says nothing
        dead = [
            f"{p.log_path.name}: exit {p.proc and p.proc.returncode}\n{p.log_tail(8)}"
            for p in processes
            if not p.running()
        ]
        if dead:
            raise RuntimeError(f"{exc!r}; exited: " + "; ".join(dead)) from exc
        raise
    finally:
        for process in reversed(processes):
            process.stop(grace=30)
    return out


# -- report ---------------------------------------------------------------------------------------


def ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def report(run: Run, command: str, started: datetime.datetime, elapsed_s: float, load: str, code: str) -> str:
    backends = [b for b in (*BACKENDS, "milvus, flushed") if b in run.results]
    base = run.results.get("faiss")
    compared = [b for b in backends if b != "faiss"] if base is not None else []
    head = [
        "## Search by collections backend: faiss vs milvus over HTTP (`bench/search_backends.py`)",
        f"- Command: `{command}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M %Z').strip()}, {elapsed_s / 60:.1f} min; run {run.status}",
        f"- Machine: {machine()}; milvus-lite {milvus_lite_version()}, pymilvus {pymilvus_version()}",
        f"- Code at start: {code} (each server runs the tree as it is when it starts)",
        f"- Load average (1 min) during the run: {load} (on {os.cpu_count()} cores; other jobs shared them)",
        f"- Data: N = {run.n:,} 384-d unit vectors around 1000 Gaussian centres, {N_QUERIES} held-out queries, "
        f"k = {K}, index `{run.index}`, metric cosine. Each backend: a fresh `duet serve` (vector-only, no "
        "model), upserts via `PUT /v1/collections/bench/items` "
        f"({run.batch} items per request, sequential), searches via `POST .../search` from a keep-alive httpx "
        "client, bodies serialised before the clock starts. Recall@10 against numpy brute force over the same "
        "vectors.",
        "- milvus = Duet's milvus backend on a `milvus-lite server` started by the bench (a real Milvus gRPC "
        "server, but a single-process Python implementation sharing these cores with Duet and the clients): "
        "its figures are a floor for Milvus, not what Milvus standalone or a cluster does. The replica figures "
        "show what a second Duet replica adds in front of one such server. DUET_MILVUS_TIMEOUT_SECONDS="
        f"{run.milvus_timeout:g} (with the default 10 s, an upsert that met milvus-lite's memtable flush at "
        "~80k vectors got 503 in a first run).",
        "- milvus-lite keeps the latest writes (up to 128 MB) in an unsealed memtable that it searches by "
        "brute force in Python, and searches sealed segments through their index; Milvus seals segments "
        "itself. So milvus is measured twice: as loaded, and after the bench calls pymilvus `flush` on the "
        "collection (outside Duet; "
        + (
            f"{run.results['milvus, flushed'].flush_s:.1f} s"
            if "milvus, flushed" in run.results and run.results["milvus, flushed"].flush_s is not None
            else "not run"
        )
        + "). The replica run is on the flushed collection.",
    ]
    rows = []

    def line(name: str, fn, spec: str) -> None:
        values = [fn(run.results[b]) for b in backends]
        row = [name, *[("-" if v is None else format(v, spec)) for v in values]]
        row += [ratio(fn(run.results[b]), fn(base)) for b in compared]
        rows.append(row)

    line("upsert vectors/s", lambda r: r.upsert_vps(run.n), ",.0f")
    line("upsert p50 ms per request", lambda r: float(np.percentile(r.upsert_latencies, 50) * 1000), ",.0f")
    line("upsert p99 ms per request", lambda r: float(np.percentile(r.upsert_latencies, 99) * 1000), ",.0f")
    line(f"recall@{K}", lambda r: r.recall, ".4f")
    line(f"batched search q/s ({BATCH} per request)", lambda r: r.batched.qps, ",.0f")
    line("batched p50 ms per request", lambda r: r.batched.pct_ms(50), ",.1f")
    line("batched p99 ms per request", lambda r: r.batched.pct_ms(99), ",.1f")
    line("single-query q/s (1 client)", lambda r: r.single.qps, ",.1f")
    line("single-query p50 ms", lambda r: r.single.pct_ms(50), ",.2f")
    line("single-query p99 ms", lambda r: r.single.pct_ms(99), ",.2f")
    line(f"single-query q/s ({run.clients} clients, 1 replica)", lambda r: r.concurrent[0].qps, ",.1f")
    line(f"single-query p50 ms ({run.clients} clients, 1 replica)", lambda r: r.concurrent[0].pct_ms(50), ",.1f")
    line(f"single-query p99 ms ({run.clients} clients, 1 replica)", lambda r: r.concurrent[0].pct_ms(99), ",.1f")
    line("duet serve VmRSS MiB after searches", lambda r: r.duet_rss_mib, ",.0f")
    line("milvus-lite server VmRSS MiB", lambda r: r.milvus_rss_mib, ",.0f")
    line("duet serve ready s (empty)", lambda r: r.ready_s, ".1f")
    header = ["", *backends] + [f"{b} / faiss" for b in compared]
    parts = ["\n".join(head), table(header, rows)]

    milvus = run.results.get("milvus, flushed")
    if milvus is not None and len(milvus.concurrent) > 1:
        one = milvus.concurrent[0]
        rep_rows = [
            [
                str(c.replicas),
                str(c.clients),
                f"{c.qps:,.1f}",
                f"{c.pct_ms(50):,.1f} / {c.pct_ms(99):,.1f}",
                str(len(c.latencies)),
                str(c.errors),
                ratio(c.qps, one.qps),
            ]
            for c in milvus.concurrent
        ]
        parts.append(
            f"Replicas (milvus backend, flushed, one milvus-lite server): {run.clients} concurrent clients doing "
            "single-query "
            "searches, split evenly across the replicas (client i on replica i mod R), for "
            f"{one.seconds:.0f} s each.\n\n"
            + table(["replicas", "clients", "q/s", "p50 / p99 ms", "requests", "errors", "vs 1 replica"], rep_rows)
        )
    if run.failures:
        parts.append("### Failures\n\n" + "\n".join(f"- {f}" for f in run.failures))
    return "\n\n".join(parts)


def milvus_lite_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("milvus-lite")
    except PackageNotFoundError:
        return "not installed"


def pymilvus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pymilvus")
    except PackageNotFoundError:
        return "not installed"


# -- main -----------------------------------------------------------------------------------------


def exact_top_k(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """The exact top K rows per query (cosine: the vectors are unit-norm), in chunks of vectors."""
    best_s = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), K), -1, dtype=np.int64)
    for start in range(0, len(vectors), 50_000):
        sims = queries @ vectors[start : start + 50_000].T
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.arange(start, start + sims.shape[1])[None, :].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend",
        default="faiss,milvus",
        help="comma-separated: faiss, milvus or both (default faiss,milvus; ratios need both)",
    )
    parser.add_argument("--n", type=int, default=None, help="vectors (default 100000; --quick: 5000)")
    parser.add_argument("--batch", type=int, default=1000, help="items per upsert request (default 1000)")
    parser.add_argument("--index", default="flat", help="collection index kind (default flat: exact)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent search clients (default 4)")
    parser.add_argument("--replicas", type=int, default=2, help="milvus: replicas of the concurrent run (default 2)")
    parser.add_argument(
        "--milvus-timeout",
        type=float,
        default=60.0,
        help="DUET_MILVUS_TIMEOUT_SECONDS of the milvus servers (default 60: milvus-lite stalls writes for "
        "seconds while it flushes a full memtable, past the service's default of 10)",
    )
    parser.add_argument("--quick", action="store_true", help="5k vectors and short timing budgets")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data dirs, logs)")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown or not args.backends:
        parser.error(f"--backend: choose from {', '.join(BACKENDS)} (got {args.backend!r})")
    if args.n is None:
        args.n = 5_000 if args.quick else 100_000
    return args


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds: servers stopped, temp folder removed


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    command = command or shlex.join(["python", "bench/search_backends.py", *(sys.argv[1:] if argv is None else argv)])
    started, t0, load, code = (
        datetime.datetime.now().astimezone(),
        time.perf_counter(),
        LoadSampler(),
        code_state(CODE_DIRS),
    )
    run = Run(n=args.n, batch=args.batch, clients=args.clients, index=args.index, milvus_timeout=args.milvus_timeout)
    work = Path(tempfile.mkdtemp(prefix="duet-bench-backends-", dir=args.workdir))
    log(f"work dir {work}; N = {args.n:,}; backends {args.backends}")
    vectors, labels = make_vectors(args.n, args.seed)
    queries = make_queries(args.seed)
    truth = exact_top_k(vectors, queries)
    try:
        for backend in args.backends:
            try:
                for res in run_backend(
                    run, backend, vectors, labels, queries, truth, budget, work, args.replicas, args.ready_timeout
                ):
                    run.results[res.backend] = res
            except Exception as exc:  # keep the other backend's figures; say what happened
                run.failures.append(f"{backend}: {type(exc).__name__}: {exc}")
                log(f"{backend} failed: {exc!r}")
            gc.collect()
    finally:
        load.stop()
        if args.keep or run.failures:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    run.status = "complete" if not run.failures else "complete, with failures"
    text = report(run, command, started, time.perf_counter() - t0, load.summary(), code)
    print("\n" + text + "\n")
    if not args.no_write and run.results:
        write_section(SECTION, text, args.results)
        log(f"wrote {args.results}")
    return 1 if run.failures else 0


if __name__ == "__main__":
    sys.exit(main())
