"""Promote without re-embedding, end to end over HTTP (issue 14's must-show).

Why it exists: backward-compatible training is only worth having if a user can do the whole upgrade
with the service as it runs: train v1, build a collection with it, train v2 with
`compatible_with: <v1>`, promote v2 (refused unless it is compatible with the alias's holder), and
keep searching the v1 collection with v2's queries, no re-embed, at least as well as v1 did.

    python bench/compat_e2e.py              # ~8-10 min on 2 quiet cores
    python bench/compat_e2e.py --no-write   # print only

Steps, all through one fresh `duet serve` (embedded job store, local worker):
1. the synthetic shapes set (`trainer.synthetic`, held-out colour-shape combinations) uploaded as a zip;
2. job v1: `minilm-dual`'s image tower aligned LiT-style (text frozen), a short run, `shapes@production`;
3. collection `gallery` pinned to v1 with the 500 held-out test images; text queries for the held-out
   combinations (several phrasings) -> v1's precision@5 (colour and shape both right);
4. job v2: from v1 with both towers free and more steps, `compatible_with: <v1>`, promoted to
   `production` with `require_compatible: true`;
5. the same queries with `"model": "shapes@production"` (now v2) on the v1 gallery: the response names
   the pair (query v2, gallery v1); precision@5 must be >= v1's; `GET /v1/collections/gallery` lists
   v2 among its compatible versions. For contrast, v2's own precision on a gallery it embedded itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.jobs_e2e import (  # noqa: E402
    on_fresh_server,
    run_job,
    say,
    shapes_collection,
    shapes_datasets,
    shapes_zip,
    upload,
)

TEMPLATES = ("a photo of a {c} {s}", "a {c} {s}", "an image of a {c} {s}")
METRIC = "synthetic-test/text_to_image/recall@1"


def job_config(folder: str, base: str, *, steps: int, lr: float, freeze: list[str], extra: dict[str, Any]) -> dict:
    return {
        "base_model": base,
        **shapes_datasets(folder),
        "loss": {"name": "infonce", "temperature": 0.05},
        "freeze": freeze,
        "batch_size": 64,
        "max_steps": steps,
        "learning_rate": lr,
        "warmup_ratio": 0.05,
        "seed": 0,
        "log_every_steps": 5,
        **extra,
    }


def precision_at_5(api: httpx.Client, work: Path, collection: str, model: str | None) -> tuple[float, dict | None]:
    """Precision@5 (colour and shape both right) of text queries for the held-out combinations,
    one batched search; also the `models` pair the response reports."""
    held_out = [tuple(p) for p in json.loads((work / "synthetic" / "manifest.json").read_text())["held_out"]]
    wanted = [(c, s) for c, s in held_out for _ in TEMPLATES]
    queries = [{"text": t.format(c=c, s=s)} for c, s in held_out for t in TEMPLATES]
    body: dict[str, Any] = {"queries": queries, "k": 5, "include": ["payload"]}
    if model is not None:
        body["model"] = model
    response = api.post(f"/v1/collections/{collection}/search", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"search {collection} with model={model}: {response.status_code} {response.text}")
    found = response.json()
    right = sum(
        1
        for target, hits in zip(wanted, found["results"], strict=True)
        for hit in hits
        if (hit["payload"]["colour"], hit["payload"]["shape"]) == target
    )
    total = sum(len(hits) for hits in found["results"])
    return right / max(total, 1), found.get("models")


def run(api: httpx.Client, work: Path, v1_steps: int, v2_steps: int) -> list[str]:
    checks: list[str] = []
    info = upload(api, shapes_zip(work))
    folder = info["path"].rsplit("/", 1)[0]

    say(f"-- v1: image tower aligned to the frozen text tower, {v1_steps} steps")
    v1_config = job_config(
        folder, "minilm-dual", steps=v1_steps, lr=1e-3, freeze=["text"],
        extra={"output": {"name": "shapes", "aliases": ["production"]}},
    )  # fmt: skip
    final = run_job(api, v1_config, "compat-e2e-v1")
    v1 = (final.get("result") or {}).get("model")
    say(f"job {final['state']}: registered {v1}; {METRIC} {final['metrics']['after'].get(METRIC)}")
    checks.append(f"v1 job succeeded: {final['state'] == 'succeeded'}")

    shapes_collection(api, work, "gallery", v1)
    p_v1, pair = precision_at_5(api, work, "gallery", None)
    say(f"v1 queries on the v1 gallery: precision@5 {p_v1:.3f} (pair {pair})")

    say(f"-- v2: from {v1}, both towers free, {v2_steps} steps, compatible_with {v1}, promoted if compatible")
    v2_config = job_config(
        folder, v1, steps=v2_steps, lr=3e-4, freeze=[],
        extra={
            "compatible_with": v1,
            "output": {
                "name": "shapes",
                "promote": {
                    "alias": "production", "metric": METRIC, "compare_to": "none", "min_value": 0.0,
                    "require_compatible": True,
                },
            },
        },
    )  # fmt: skip
    final = run_job(api, v2_config, "compat-e2e-v2")
    v2 = (final.get("result") or {}).get("model")
    promotion = (final.get("result") or {}).get("promotion") or {}
    after = final["metrics"]["after"]
    cross = {k: round(v, 4) for k, v in after.items() if k.endswith("recall@1") and "synthetic-test" in k}
    say(f"job {final['state']}: registered {v2}; promotion: {promotion.get('reason')}")
    say(f"  v2's run, recall@1 (new/new, new/old, old/old): {cross}")
    checks.append(f"v2 job succeeded: {final['state'] == 'succeeded'}")
    checks.append(f"v2 promoted to shapes@production with require_compatible: {bool(promotion.get('promoted'))}")

    gallery = api.get("/v1/collections/gallery").json()
    compatible = [entry.get("model") for entry in gallery.get("compatible_models") or []]
    say(f"GET /v1/collections/gallery -> model {gallery.get('model')}, compatible_models {compatible}")
    checks.append(f"the v1 gallery lists {v2} as compatible: {v2 in compatible}")

    deadline = time.monotonic() + 60  # the service re-reads aliases every 2 s (DUET_ALIAS_REFRESH_SECONDS)
    while True:
        p_v2_on_v1, pair = precision_at_5(api, work, "gallery", "shapes@production")
        if (pair or {}).get("query") == v2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    say(f"v2 queries (model=shapes@production) on the v1 gallery, no re-embed: precision@5 {p_v2_on_v1:.3f}")
    say(f"  the search reports the pair {pair}")
    checks.append(f"the search reports the pair query {v2} / gallery {v1}: {pair == {'query': v2, 'gallery': v1}}")
    holds = p_v2_on_v1 >= p_v1
    checks.append(f"precision@5 of v2 queries on the v1 gallery >= v1's own ({p_v2_on_v1:.3f} >= {p_v1:.3f}): {holds}")

    shapes_collection(api, work, "gallery-v2", v2)
    p_v2, _ = precision_at_5(api, work, "gallery-v2", None)
    say(f"for contrast, v2 on a gallery re-embedded with v2: precision@5 {p_v2:.3f}")
    write = api.put("/v1/collections/gallery/items", json={"model": v2, "items": [{"id": "t", "text": "a red cross"}]})
    message = write.json().get("error", {}).get("message")
    say(f"PUT /v1/collections/gallery/items with model={v2} -> {write.status_code} {message}")
    checks.append(f"writes to the v1 gallery with v2 are refused (409): {write.status_code == 409}")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--v1-steps", type=int, default=32, help="v1 LiT steps at batch 64 (32 = one epoch)")
    parser.add_argument("--v2-steps", type=int, default=96, help="v2 steps, both towers, at batch 64")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    return on_fresh_server(
        lambda api, work: run(api, work, args.v1_steps, args.v2_steps),
        title="Promote without re-embedding, end to end over HTTP (`bench/compat_e2e.py`)",
        command=f"python bench/compat_e2e.py {' '.join(argv if argv is not None else sys.argv[1:])}",
        section="compat-e2e",
        keep=args.keep,
        write=not args.no_write,
        timeout=300,
    )


if __name__ == "__main__":
    sys.exit(main())
