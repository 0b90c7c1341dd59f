"""Serving benchmark per inference backend and precision (issue 13): torch, ONNX Runtime and OpenVINO,
fp32 and int8, through Duet's /v1/embeddings, as ratios to raw sentence-transformers fp32 `encode`
measured in the same run; plus each runtime used directly through `SentenceTransformer.encode` (no
server: what the server's own overhead is measured against), and the fidelity table.

How to run (from the repository root; minutes on 2 cores, most of them deriving and gating variants):

    python bench/serve_backends.py            # writes the `serve-backends` section of bench/RESULTS.md
    python bench/serve_backends.py --quick    # smoke run: small workloads, the shipped gate pairs

Method:
- a fresh data dir; minilm/1 registered; each variant made by `duet models optimize` in a subprocess
  (export, then the fidelity gate on STS-B dev: cosine to fp32 and Spearman of each variant);
- raw baselines first, in this process, before the server exists: `SentenceTransformer.encode`
  fp32 (batch 64, all cores), then the same `encode` with the Transformer module's forward pass
  replaced by each variant's runtime (what `SentenceTransformer(..., backend="onnx"|"openvino")`
  does; that path itself needs optimum, whose packages pin transformers below Duet's);
- one `duet serve` subprocess serves every variant (`minilm/1:onnx-int8` ...), measured one after
  the other; the load client is keep-alive HTTP/1.1 on asyncio streams (responses not parsed), 32
  connections, requests of 64 inputs and of 1 input;
- the machine is shared: the 1-minute load average before each measurement is printed beside it;
  the server's admission control is relaxed to 60 s of queue (DUET_MAX_QUEUE_WAIT_MS), so a slow
  backend is measured rather than refused.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STS_DEV = REPO.parent / "shared" / "data" / "stsbenchmark" / "sts-dev.csv"
from bench.harness import DUET_CLI, HOST, ServerProcess, duet_serve  # noqa: E402

SECTION = "serve-backends"
VARIANTS = ("onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8")
CONCURRENCY = 32


@dataclass(frozen=True)
class Scenario:
    label: str
    per_request: int
    inputs: int


def load_texts(path: Path) -> list[str]:
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        columns = line.split("\t")
        if len(columns) >= 7:
            texts.extend(c.strip() for c in columns[5:7] if c.strip())
    random.Random(0).shuffle(texts)
    return texts


def workload(texts: list[str], count: int) -> list[str]:
    return [texts[i % len(texts)] for i in range(count)]


def load_average() -> float:
    return os.getloadavg()[0]


# -- setup: registry and variants -------------------------------------------------------------------


def prepare(data_dir: Path, eval_file: Path | None) -> dict[str, dict]:
    """minilm/1 registered, and every variant derived and gated by the CLI; returns their records."""
    from service.bootstrap import register_default_models
    from service.settings import Settings
    from service.state import open_registry

    registry = open_registry(Settings(data_dir=data_dir))
    register_default_models(registry, data_dir)
    for name in VARIANTS:
        backend, _, precision = name.partition("-")
        command = [*DUET_CLI, "models", "optimize", "minilm/1", "--backend", backend, "--data-dir", str(data_dir)]
        command += ["--int8"] if precision == "int8" else []
        command += ["--eval", str(eval_file)] if eval_file else []
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        stages = [line for line in done.stderr.splitlines() if line.startswith("[")]
        print("\n".join(stages), flush=True)
        print(f"optimize {name}: exit {done.returncode} in {time.perf_counter() - started:.0f}s: {done.stdout.strip()}")
        if done.returncode not in (0, 1):
            raise SystemExit(f"optimize {name} failed:\n{done.stderr[-3000:]}")
    info = registry.resolve("minilm/1")
    return {name: record.model_dump(mode="json") for name, record in registry.list_variants(info).items()} | {
        "_info": {"path": str(info.path)}
    }


# -- raw baselines, in this process -------------------------------------------------------------------


def raw_throughputs(model_path: Path, variant_dirs: dict[str, Path], texts: list[str]) -> dict[str, float]:
    """Inputs/s of `SentenceTransformer.encode(texts, batch_size=64)`: torch fp32, then each runtime."""
    from sentence_transformers import SentenceTransformer

    from encoders.runtime import RuntimeForward
    from encoders.variants import VariantSpec
    from service.model_pool.cpu_policy import usable_cores

    model = SentenceTransformer(str(model_path), device="cpu")
    results = {"torch-fp32": _timed_encode(model, texts)}
    transformer = model[0]
    for name, folder in variant_dirs.items():
        spec = VariantSpec.parse(name)
        runtime = RuntimeForward(
            spec, folder / ("model.onnx" if spec.backend == "onnx" else "openvino_model.xml"), usable_cores()
        )
        transformer.forward = lambda features, runtime=runtime, **_: features | {"token_embeddings": runtime(features)}
        results[name] = _timed_encode(model, texts)
    return results


def _timed_encode(model, texts: list[str]) -> float:
    model.encode(texts[:256], batch_size=64, show_progress_bar=False)  # warm-up
    print(f"  raw encode (load {load_average():.1f}) ...", end=" ", flush=True)
    started = time.perf_counter()
    model.encode(texts, batch_size=64, show_progress_bar=False)
    rate = len(texts) / (time.perf_counter() - started)
    print(f"{rate:.0f} inputs/s")
    return rate


# -- the server and its load ----------------------------------------------------------------------------


def request_bytes(port: int, model: str, texts: list[str]) -> bytes:
    body = json.dumps({"model": model, "input": texts}).encode()
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length"))
    return int(head[0].split(" ")[1]), await reader.readexactly(length)


async def _drive(port: int, requests: list[bytes]) -> tuple[float, int, dict[str, int]]:
    """Seconds, requests answered 200, and the others by status (429s are the server's backpressure)."""
    queue = iter(requests)
    ok, failures = 0, {}

    async def worker() -> None:
        nonlocal ok
        reader, writer = await asyncio.open_connection(HOST, port)
        for request in queue:
            writer.write(request)
            status, body = await _read(reader)
            if status == 200:
                ok += 1
            else:
                key = f"HTTP {status}: {body[:120].decode(errors='replace')}"
                failures[key] = failures.get(key, 0) + 1
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return time.perf_counter() - started, ok, failures


def serve_throughput(port: int, model: str, texts: list[str], scenario: Scenario) -> tuple[float, int]:
    """Inputs/s answered (failed requests count for nothing), and how many requests failed."""
    batches = [texts[i : i + scenario.per_request] for i in range(0, scenario.inputs, scenario.per_request)]
    warm = [request_bytes(port, model, b) for b in batches[:CONCURRENCY]]
    asyncio.run(_drive(port, warm))
    requests = [request_bytes(port, model, b) for b in batches]
    load = load_average()
    seconds, ok, failures = asyncio.run(_drive(port, requests))
    rate = ok * scenario.per_request / seconds
    print(f"  {model:22} {scenario.label:9} {rate:7.0f} inputs/s (load before {load:.1f}) failures: {failures or 0}")
    return rate, sum(failures.values())


def start_server(data_dir: Path, log: Path) -> ServerProcess:
    """`duet serve` through bench/harness.py, ready. Admission control at 60 s, not 2 s: 32 clients x 64
    inputs is ~30 s of queue for torch on this loaded 2-core machine, and 429s would measure the
    refusals, not the backends."""
    env = {"DUET_LOG_LEVEL": "warning", "DUET_MAX_QUEUE_WAIT_MS": "60000"}
    server = duet_serve(data_dir, log, env=env).start()
    try:
        server.wait_ready(300)
    except BaseException:
        server.stop()
        raise
    return server


# -- report ---------------------------------------------------------------------------------------------


def render(records: dict, raw: dict[str, float], served: dict[str, dict[str, float]], scenarios, args) -> str:
    from service.model_pool.cpu_policy import usable_cores

    base = raw["torch-fp32"]
    lines = [
        "## Serving per backend and precision (issue 13)",
        "",
        f"`python bench/serve_backends.py{' --quick' if args.quick else ''}`, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{usable_cores()} cores, shared machine (load averages printed by the run). all-MiniLM-L6-v2; concurrency "
        f"{CONCURRENCY}; ratios are to raw `SentenceTransformer.encode` fp32 (batch 64, torch, all cores) measured in "
        f"the same run: {base:.0f} inputs/s.",
        "",
        "| model | "
        + " | ".join(f"{s.label} inputs/s (x raw fp32)" for s in scenarios)
        + " | runtime via `st.encode` (x raw fp32) | server / direct, 64-input |",
        "|---|" + "---|" * (len(scenarios) + 2),
    ]
    for ref, rates in served.items():
        name = ref.partition(":")[2] or "torch-fp32"
        cells = [f"{rates[s.label]:.0f} ({rates[s.label] / base:.2f}x)" for s in scenarios]
        direct = raw.get(name)
        lines.append(
            f"| `{ref}` | "
            + " | ".join(cells)
            + f" | {direct:.0f} ({direct / base:.2f}x) | {rates[scenarios[0].label] / direct:.2f} |"
        )
    lines += [
        "",
        "Fidelity gate (against the same version in torch fp32; gate: lowest cosine >= 0.99, Spearman drop <= 0.5):",
        "",
        "| variant | cosine min | cosine mean | STS-B Spearman | fp32 Spearman | drop | pairs | gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        f = records.get(name, {}).get("fidelity")
        if f:
            source = f["source"].rsplit("/", 1)[-1]
            verdict = "passed" if f["passed"] else "REFUSED"
            lines.append(
                f"| {name} | {f['cosine_min']:.4f} | {f['cosine_mean']:.4f} | {f['spearman']:.2f} | "
                f"{f['spearman_fp32']:.2f} | {f['spearman_drop']:+.2f} | {f['pairs']} ({source}) | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small workloads and the shipped gate pairs.")
    parser.add_argument("--no-write", action="store_true", help="Print only; leave bench/RESULTS.md alone.")
    args = parser.parse_args()
    scale = 1 if args.quick else 2
    scenarios = [Scenario("64-input", 64, 1024 * scale), Scenario("1-input", 1, 256 * scale)]
    texts = load_texts(STS_DEV)
    with tempfile.TemporaryDirectory(prefix="duet-bench-serve-backends-") as tmp:
        data_dir = Path(tmp) / "data"
        records = prepare(data_dir, None if args.quick else STS_DEV)
        model_path = Path(records.pop("_info")["path"])
        from service.settings import Settings
        from service.state import open_registry

        registry = open_registry(Settings(data_dir=data_dir, register_default_models=False))
        info = registry.resolve("minilm/1")
        passed = {n: registry.get_variant(info, n).path for n, r in records.items() if r["fidelity"]["passed"]}
        raw = raw_throughputs(model_path, passed, workload(texts, scenarios[0].inputs))
        server = start_server(data_dir, Path(tmp) / "serve.log")
        port = server.port
        assert port is not None
        try:
            served, failed = {}, {}
            for ref in ["minilm/1", *(f"minilm/1:{n}" for n in passed)]:
                served[ref] = {}
                for s in scenarios:
                    served[ref][s.label], failed[(ref, s.label)] = serve_throughput(
                        port, ref, workload(texts, s.inputs), s
                    )
        finally:
            server.stop()
    body = render(records, raw, served, scenarios, args)
    failures = [f"{ref} {label}: {n} requests failed" for (ref, label), n in failed.items() if n]
    if failures:
        body += "\nFailed requests (counted as nothing in the rates): " + "; ".join(failures) + "\n"
    print(body)
    if not args.no_write:
        from bench.results import write_section

        write_section(SECTION, body)


if __name__ == "__main__":
    main()
