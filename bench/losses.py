"""Issue 14's losses against plain InfoNCE with the same budget: one line per run.

Why it exists: each new loss (HN-NCE, CWCL, MoCo queue, multi-positive) must show what it does
on real data next to InfoNCE trained with the same model, data order, steps, batch size and
learning rate. Budgets are tiny (a couple of minutes per run on 2 CPU cores), so the lines say
whether a loss trains and in which direction it moves the metric, not which loss is best.

Tasks (`python bench/losses.py sts shapes`, the default runs both):

* sts: all-MiniLM-L6-v2 (bundled) on STS-B train pairs scoring >= 4 (1406 pairs; CWCL-graded
  on all 5749 pairs, scores / 5), evaluated by Spearman x 100 on STS-B dev. Fixed temperature
  0.05, anchor -> candidates only (what `bench/train.py` compares against MNRL).
* shapes: the untrained image tower of a MiniLM dual encoder aligned LiT-style (`freeze: [text]`)
  on the synthetic shapes, evaluated by text->image recall@1 / MRR@10 on held-out colour-shape
  combinations. Multi-positive rows: each image with the captions of every training image of the
  same description (up to 4).

Every run goes through `trainer.run.run_training` in this process, one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STS = REPO.parent / "shared" / "data" / "stsbenchmark"
sys.path.insert(0, str(REPO))

STS_RUNS: list[tuple[str, dict[str, Any], str]] = [
    ("infonce", {"name": "infonce"}, "pairs"),
    ("hn_nce beta=0.5", {"name": "hn_nce", "beta": 0.5}, "pairs"),
    ("cwcl (reference: positive)", {"name": "cwcl"}, "pairs"),
    ("cwcl (reference: positive), learnable temperature", {"name": "cwcl", "learnable_temperature": True}, "pairs"),
    ("cwcl (reference: positive), target_temperature=0.05", {"name": "cwcl", "cwcl_target_temperature": 0.05}, "pairs"),
    ("cwcl (graded scores, all pairs)", {"name": "cwcl"}, "graded"),
    ("moco queue=512 m=0.99 filter=0.9", {"name": "moco", "queue_size": 512, "momentum": 0.99}, "pairs"),
]
SHAPES_RUNS: list[tuple[str, dict[str, Any], str]] = [
    ("infonce", {"name": "infonce"}, "pairs"),
    ("multi_positive (<= 4 captions per image)", {"name": "multi_positive"}, "multi"),
    ("hn_nce beta=0.5", {"name": "hn_nce", "beta": 0.5}, "pairs"),
    ("moco queue=512 m=0.99 filter=0.9", {"name": "moco", "queue_size": 512, "momentum": 0.99}, "pairs"),
]


def sts_data(work: Path) -> dict[str, dict[str, Any]]:
    rows = [line.rstrip("\n").split("\t") for line in (STS / "sts-train.csv").open(encoding="utf-8")]
    pairs = [{"anchor": r[5], "positive": r[6]} for r in rows if float(r[4]) >= 4.0]
    (work / "sts-pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    return {
        "pairs": {"path": "sts-pairs.jsonl"},
        "graded": {"path": str(STS / "sts-train.csv"), "kind": "graded", "format": "sts"},
    }


def shapes_data(work: Path) -> dict[str, dict[str, Any]]:
    from trainer.synthetic import SyntheticSpec, generate

    generate(work / "shapes", SyntheticSpec(n_train=1000, n_test=150, seed=1))
    rows = [json.loads(line) for line in (work / "shapes" / "train.jsonl").read_text().splitlines()]
    by_content: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for row in rows:
        by_content[(row["colour"], row["shape"], row["size"], row["position"])].append(row["text"])
    multi = []
    for row in rows:
        same = by_content[(row["colour"], row["shape"], row["size"], row["position"])]
        captions = [row["text"]] + [t for t in dict.fromkeys(same) if t != row["text"]]
        multi.append({"image": row["image"], "captions": captions[:4]})
    (work / "shapes" / "multi.jsonl").write_text("\n".join(json.dumps(m) for m in multi))
    pairs = {"path": "shapes/train.jsonl", "anchor": "text", "positive": "image"}
    return {
        "pairs": pairs,
        "multi": {"path": "shapes/multi.jsonl", "kind": "multi_positive", "anchor": "image", "positive": "captions"},
    }


def sts_config(base: str, loss: dict[str, Any], train: dict[str, Any], steps: int) -> dict[str, Any]:
    return {
        "base_model": base,
        "train": [train],
        "eval": [{"path": str(STS / "sts-dev.csv"), "kind": "graded", "format": "sts", "name": "sts-dev"}],
        "loss": {"temperature": 0.05, "learnable_temperature": False, "symmetric": False, **loss},
        "batch_size": 32,
        "max_steps": steps,
        "learning_rate": 2e-5,
        "seed": 42,
        "checkpoint_every_steps": 10_000,
        "output": {"name": "bench-losses"},
    }


def shapes_config(base: str, loss: dict[str, Any], train: dict[str, Any], steps: int) -> dict[str, Any]:
    test = {"path": "shapes/test.jsonl", "anchor": "text", "positive": "image", "name": "shapes"}
    return {
        "base_model": base,
        "train": [train],
        "eval": [{**test, "same_content": ["colour", "shape", "size", "position"]}],
        "loss": {"temperature": 0.05, **loss},
        "freeze": ["text"],
        "batch_size": 32,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.05,
        "seed": 0,
        "checkpoint_every_steps": 10_000,
        "output": {"name": "bench-losses"},
    }


def run_task(task: str, work: Path, steps: int, only: str = "") -> None:
    from encoders.defaults import bundled_minilm_path
    from trainer.config import parse_config
    from trainer.run import run_training

    minilm = bundled_minilm_path()
    if task == "sts":
        data, runs, make, metrics = sts_data(work), STS_RUNS, sts_config, ["sts-dev/spearman"]
        base, scale = str(minilm), 1.0  # the evaluation reports Spearman x 100 already
    else:
        from encoders.dual import ImageTowerConfig, build_dual_encoder

        data, runs, make = shapes_data(work), SHAPES_RUNS, shapes_config
        metrics = ["shapes/text_to_image/recall@1", "shapes/text_to_image/mrr@10"]
        base, scale = str(work / "dual"), 100.0
        build_dual_encoder(minilm, ImageTowerConfig()).save(base)
    print(f"\n{task}: {steps} steps, batch 32; metrics {', '.join(metrics)} (x100)", flush=True)
    print("| loss | data | before | after | run s (incl. both evaluations) |\n|---|---|---|---|---|", flush=True)
    for label, loss, kind in [run for run in runs if only in run[0]]:
        config = parse_config(make(base, loss, data[kind], steps), work)
        started = time.monotonic()
        result = run_training(config, base_dir=work, run_dir=work / f"run-{task}-{len(label)}-{kind}", registry=None)
        seconds = time.monotonic() - started

        def fmt(values: dict[str, float]) -> str:
            return " / ".join(f"{scale * values[m]:.2f}" for m in metrics)

        print(f"| {label} | {kind} | {fmt(result.before)} | {fmt(result.after)} | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", default=["sts", "shapes"], choices=["sts", "shapes"])
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--only", default="", help="run only the variants whose label contains this")
    args = parser.parse_args()
    for task in args.tasks:
        with tempfile.TemporaryDirectory(prefix=f"duet-bench-losses-{task}-") as work:
            run_task(task, Path(work), args.steps, args.only)


if __name__ == "__main__":
    main()
