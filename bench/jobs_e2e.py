"""Fine-tuning end to end through HTTP only, as a user of `duet serve` would do it.

Why it exists: issue 5 asks to show the whole loop with nothing but HTTP calls - upload a
dataset, start a job, stream its events, get a better version registered and promoted, and
see the service answer with it. Two tasks:

- `sts`: STS-B train uploaded as a file; a job fine-tunes all-MiniLM-L6-v2 (`minilm`) with
  cosine regression, promoted only if STS-B dev Spearman beats the version in production;
  `/v1/embeddings` then answers as the new version (after the hot swap), and its vectors
  equal plain sentence-transformers on the registered folder.
- `shapes`: the synthetic captioned-shapes set (`duet data synthetic`) uploaded as one zip
  (JSONL + images); a job aligns `minilm-dual`'s image tower (text tower frozen); then a
  collection of the held-out test images is built with the new version over HTTP and text
  queries for colour-shape combinations never seen in training must find them.

    python bench/jobs_e2e.py sts            # ~6 min on 2 quiet cores
    python bench/jobs_e2e.py shapes         # ~15 min on 2 quiet cores (4 epochs)
    python bench/jobs_e2e.py sts --no-write # print only

It starts its own `duet serve` on a fresh data dir (embedded mode: SQLite job store and the
service's local worker) and writes a `jobs-e2e-<task>` section into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import ServerProcess, duet_serve  # noqa: E402
from bench.results import write_section  # noqa: E402

STS_DIR = REPO.parent / "shared" / "data" / "stsbenchmark"
TRANSCRIPT: list[str] = []


def say(line: str) -> None:
    print(line, flush=True)
    TRANSCRIPT.append(line)


def duet_server(data_dir: Path, log_path: Path) -> ServerProcess:
    """`duet serve` on a fresh data dir (embedded job store and local worker: no Redis), aliases
    re-read every 2 s so a promotion reaches /v1/embeddings quickly."""
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DUET_ALIAS_REFRESH_SECONDS": "2"}
    return duet_serve(data_dir, log_path, env)


def upload(api: httpx.Client, path: Path, filename: str | None = None) -> dict[str, Any]:
    with path.open("rb") as handle:
        response = api.post("/v1/datasets", params={"filename": filename or path.name}, content=handle.read())
    response.raise_for_status()
    info = response.json()
    say(f"POST /v1/datasets?filename={info['filename']} -> {response.status_code} {info['path']} ({info['bytes']} B)")
    return info


def run_job(api: httpx.Client, config: dict[str, Any], key: str) -> dict[str, Any]:
    """Submit, then follow the server-sent events to the end, printing what a user would see."""
    from jobs.sse import parse_events

    response = api.post("/v1/jobs", json={"config": config, "idempotency_key": key})
    if response.status_code >= 400:
        raise RuntimeError(f"job refused: {response.text}")
    job = response.json()
    say(f"POST /v1/jobs -> {response.status_code} {job['id']} state={job['state']}")
    counts: Counter[str] = Counter()
    last_print = 0.0
    final: dict[str, Any] = {}
    with api.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=None) as stream:
        for _, kind, data in parse_events(stream.iter_lines()):
            if not kind:
                continue
            counts[kind] += 1
            if kind == "progress":
                if time.monotonic() - last_print > 20 or data.get("step") == data.get("max_steps"):
                    last_print = time.monotonic()
                    say(
                        f"  event progress: step {data['step']}/{data['max_steps']} epoch {data['epoch']:.2f} "
                        f"loss {data['loss'] if data['loss'] is None else round(data['loss'], 4)} "
                        f"eta {data['eta_seconds']:.0f} s"
                    )
            elif kind == "evaluation":
                shown = {k: round(v, 4) for k, v in data["metrics"].items() if _headline(k)}
                say(f"  event evaluation ({data['when']}): {shown}")
            elif kind in ("state", "stage"):
                say(f"  event {kind}: {data.get('state') or data.get('stage')}")
            elif kind == "end":
                final = data
    say(f"  events received: {dict(counts)}")
    return final


def _headline(metric: str) -> bool:
    return metric.endswith(("spearman", "recall@1", "recall@10", "mrr@10", "modality_gap"))


def wait_for_model(api: httpx.Client, model: str, expected: str, text: str, timeout_s: float = 300) -> dict:
    """The alias moved; the service swaps once the new version is warm. Poll until it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = api.post("/v1/embeddings", json={"model": model, "input": [text]})
        response.raise_for_status()
        body = response.json()
        if body["model"] == expected or time.monotonic() > deadline:
            return body
        time.sleep(1)


# -- tasks ---------------------------------------------------------------------------------------


def task_sts(api: httpx.Client, work: Path) -> list[str]:
    checks = []
    train = upload(api, STS_DIR / "sts-train.csv")
    dev = upload(api, STS_DIR / "sts-dev.csv")
    config = {
        "base_model": "minilm",
        "train": [{"path": train["path"], "kind": "graded"}],
        "eval": [{"path": dev["path"], "kind": "graded"}],
        "loss": {"name": "cosine"},
        "batch_size": 16,
        "epochs": 1,
        "learning_rate": 2e-5,
        "warmup_ratio": 0.1,
        "seed": 42,
        "checkpoint_every_steps": 200,
        "log_every_steps": 10,
        "output": {
            "name": "minilm",
            "promote": {"alias": "production", "metric": "sts-dev/spearman", "compare_to": "current"},
        },
    }
    final = run_job(api, config, "e2e-sts")
    before = final["metrics"]["before"].get("sts-dev/spearman")
    after = final["metrics"]["after"].get("sts-dev/spearman")
    current = final["metrics"].get("current", {}).get("sts-dev/spearman")
    model = (final.get("result") or {}).get("model")
    promotion = (final.get("result") or {}).get("promotion") or {}
    say(f"job {final['state']}: registered {model}; dev Spearman base {before} -> new {after} (holder {current})")
    say(f"promotion: {promotion.get('reason')}")
    checks.append(f"job succeeded: {final['state'] == 'succeeded'}")
    checks.append(f"dev Spearman beats the base ({after} > {before}): {after is not None and after > before}")
    checks.append(f"promoted minilm@production: {bool(promotion.get('promoted'))}")
    body = wait_for_model(api, "minilm", model, "A man is playing a guitar.")
    say(f"POST /v1/embeddings model=minilm -> answered by {body['model']}")
    checks.append(f"/v1/embeddings serves {model}: {body['model'] == model}")
    versions = api.get("/v1/models/minilm/versions").json()
    say(f"GET /v1/models/minilm/versions -> {[(v.get('version'), v.get('aliases')) for v in versions.get('data', [])]}")
    return checks


def shapes_zip(work: Path) -> Path:
    from trainer.synthetic import SyntheticSpec, generate

    data = generate(work / "synthetic", SyntheticSpec())
    archive = work / "shapes.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for path in sorted(data.root.rglob("*")):
            if path.is_file():
                zipped.write(path, path.relative_to(data.root).as_posix())
    say(f"generated the synthetic set ({data.n_train} train, {data.n_test} test images; held out: {data.held_out})")
    return archive


def shapes_datasets(folder: str) -> dict[str, Any]:
    """A job's `train` and `eval` for the uploaded shapes set: the eval set holds the held-out
    colour-shape combinations, scored with same-content images counted as right."""
    return {
        "train": [{"path": f"{folder}/train.jsonl", "kind": "pairs", "anchor": "text", "positive": "image"}],
        "eval": [
            {
                "path": f"{folder}/test.jsonl",
                "kind": "pairs",
                "anchor": "text",
                "positive": "image",
                "name": "synthetic-test",
                "same_content": ["colour", "shape", "size", "position"],
            }
        ],
    }


def shapes_collection(api: httpx.Client, work: Path, name: str, model: str) -> None:
    """A collection pinned to `model` holding the shapes set's held-out test images, their
    description as payload."""
    created = api.post("/v1/collections", json={"name": name, "model": model})
    say(f"POST /v1/collections name={name} model={model} -> {created.status_code}")
    created.raise_for_status()
    rows = [json.loads(line) for line in (work / "synthetic" / "test.jsonl").read_text().splitlines()]
    for start in range(0, len(rows), 100):
        items = []
        for i, row in enumerate(rows[start : start + 100], start):
            png = (work / "synthetic" / row["image"]).read_bytes()
            uri = "data:image/png;base64," + base64.b64encode(png).decode()
            payload = {k: row[k] for k in ("colour", "shape", "size", "position")}
            items.append({"id": f"img-{i}", "image": uri, "payload": payload})
        api.put(f"/v1/collections/{name}/items", json={"items": items}).raise_for_status()
    say(f"PUT /v1/collections/{name}/items: {len(rows)} held-out test images, embedded by {model}")


def task_shapes(api: httpx.Client, work: Path, epochs: int) -> list[str]:
    checks = []
    archive = shapes_zip(work)
    info = upload(api, archive)
    folder = info["path"].rsplit("/", 1)[0]
    config = {
        "base_model": "minilm-dual",
        **shapes_datasets(folder),
        "loss": {"name": "infonce", "temperature": 0.05, "learnable_temperature": True},
        "freeze": ["text"],
        "batch_size": 64,
        "epochs": epochs,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.05,
        "seed": 0,
        "log_every_steps": 5,
        "output": {
            "name": "minilm-dual-shapes",
            "promote": {
                "alias": "production",
                "metric": "synthetic-test/text_to_image/recall@1",
                "compare_to": "base",
            },
        },
    }
    final = run_job(api, config, "e2e-shapes")
    metric = "synthetic-test/text_to_image/recall@1"
    before, after = final["metrics"]["before"].get(metric), final["metrics"]["after"].get(metric)
    model = (final.get("result") or {}).get("model")
    say(f"job {final['state']}: registered {model}; text->image recall@1 on unseen combinations {before} -> {after}")
    checks.append(f"job succeeded: {final['state'] == 'succeeded'}")
    checks.append(f"recall@1 rose well above chance ({after} vs chance ~0.016): {after is not None and after > 0.05}")

    body = wait_for_model(api, "minilm-dual-shapes", model, "a red cross")
    say(f"POST /v1/embeddings model=minilm-dual-shapes -> answered by {body['model']}")
    shapes_collection(api, work, "shapes", model)
    hits_ok, total = 0, 0
    for colour, shape in [
        tuple(pair) for pair in json.loads((work / "synthetic" / "manifest.json").read_text())["held_out"]
    ]:
        query = f"a photo of a {colour} {shape}"
        result = api.post("/v1/collections/shapes/search", json={"query": {"text": query}, "k": 5}).json()
        found = [(h["payload"]["colour"], h["payload"]["shape"]) for h in result["results"]]
        good = sum(1 for f in found if f == (colour, shape))
        hits_ok += good
        total += len(found)
        say(f"  search {query!r}: top-5 {found} ({good}/5 right)")
    precision = hits_ok / max(total, 1)
    say(f"colour+shape precision@5 over the held-out combinations: {precision:.2f}")
    checks.append(f"text queries find the unseen combinations (precision@5 {precision:.2f} > 0.5): {precision > 0.5}")
    return checks


def on_fresh_server(
    story: Callable[[httpx.Client, Path], list[str]],
    *,
    title: str,
    command: str,
    section: str,
    keep: bool,
    write: bool,
    timeout: float = 120,
) -> int:
    """Run `story` (api, work dir) -> checks against a fresh `duet serve`, then print the transcript and
    the checks as a RESULTS.md section (written unless `write` is false); 0 when every check holds."""
    work = Path(tempfile.mkdtemp(prefix=f"duet-{section}-"))
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    server = duet_server(work / "data", work / "serve.log").start()
    try:
        server.wait_ready(300, poll=0.5)
        say(f"duet serve on {server.base} (fresh data dir, embedded job store, local worker)")
        with httpx.Client(base_url=server.base, timeout=timeout) as api:
            checks = story(api, work)
    finally:
        server.stop(grace=60)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = (time.perf_counter() - t0) / 60
    report = "\n".join(
        [
            f"## {title}",
            f"- Command: `{command}`",
            f"- Date: {started:%Y-%m-%d %H:%M %Z}, {elapsed:.1f} min; machine: nproc {os.cpu_count()}",
            "",
            "```",
            *TRANSCRIPT,
            "```",
            "",
            "Checks:",
            *[f"- {c}" for c in checks],
        ]
    )
    print("\n" + report)
    if write:
        write_section(section, report)
    return 0 if all(c.endswith("True") for c in checks) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["sts", "shapes"])
    parser.add_argument("--epochs", type=int, default=4, help="shapes: training epochs")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    return on_fresh_server(
        lambda api, work: task_sts(api, work) if args.task == "sts" else task_shapes(api, work, args.epochs),
        title=f"Jobs end to end over HTTP: {args.task} (`bench/jobs_e2e.py`)",
        command=f"python bench/jobs_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        section=f"jobs-e2e-{args.task}",
        keep=args.keep,
        write=not args.no_write,
    )


if __name__ == "__main__":
    sys.exit(main())
