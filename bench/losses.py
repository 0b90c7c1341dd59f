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

Every run goes through `trainer.run.run_training` in this process, one after the other. The
tables, the unit tests that pin each loss's maths (a hand-computed case, and the equivalence with
InfoNCE where the loss reduces to it) and the pytest run of their files go into the `losses`
section of bench/RESULTS.md (`--no-write`: print only).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STS = REPO.parent / "shared" / "data" / "stsbenchmark"
sys.path.insert(0, str(REPO))

STS_RUNS: list[tuple[str, dict[str, Any], str]] = [
    ("infonce", {"name": "infonce"}, "pairs"),
    ("hn_nce beta=0.5", {"name": "hn_nce", "beta": 0.5}, "pairs"),
    ("cwcl (reference: positive)", {"name": "cwcl"}, "pairs"),
    ("cwcl (reference: positive), target_temperature=0.05", {"name": "cwcl", "cwcl_target_temperature": 0.05}, "pairs"),
    ("cwcl (graded scores, all pairs)", {"name": "cwcl"}, "graded"),
    ("moco queue=512 m=0.99 filter=0.9", {"name": "moco", "queue_size": 512, "momentum": 0.99}, "pairs"),
]
# The unit tests that check each loss against a hand computation or an equivalence (by file).
LOSS_TESTS: dict[str, list[str]] = {
    "infonce (baseline)": [
        "tests/unit/test_losses.py::test_info_nce_hand_computed_pairs",
        "tests/unit/test_losses.py::test_info_nce_hand_computed_with_hard_negative",
        "tests/unit/test_losses.py::test_info_nce_matches_numpy_reference",
    ],
    "hn_nce": [
        "tests/unit/test_losses_weighted.py::test_hard_negative_nce_hand_computed",
        "tests/unit/test_losses_weighted.py::test_hard_negative_nce_with_beta_zero_is_info_nce",
        "tests/unit/test_losses_weighted.py::test_hard_negative_nce_matches_loop_reference",
        "tests/unit/test_losses_weighted.py::test_hard_negative_nce_rank_split",
    ],
    "cwcl": [
        "tests/unit/test_losses_weighted.py::test_similarity_targets_hand_computed",
        "tests/unit/test_losses_weighted.py::test_graded_targets_hand_computed",
        "tests/unit/test_losses_weighted.py::test_soft_target_loss_hand_computed",
        "tests/unit/test_losses_weighted.py::test_one_hot_targets_are_info_nce",
        "tests/unit/test_losses_weighted.py::test_soft_target_loss_matches_loop_reference",
        "tests/unit/test_losses_weighted.py::test_soft_target_loss_rank_split",
        "tests/unit/test_losses_weighted.py::test_cwcl_module_uses_scores_when_labelled_and_the_reference_view_otherwise",
    ],
    "moco": [
        "tests/unit/test_losses_momentum.py::test_hand_computed_with_queue_filter_and_hardest",
        "tests/unit/test_losses_momentum.py::test_without_queue_or_filter_it_is_one_directional_info_nce",
        "tests/unit/test_losses_momentum.py::test_rank_split_mean_equals_union_loss",
        "tests/unit/test_losses_momentum.py::test_key_queue_is_a_fifo_of_the_last_entries",
        "tests/unit/test_losses_momentum.py::test_cached_equals_plain_loss_gradients_and_queues",
    ],
    "multi_positive": [
        "tests/unit/test_losses_weighted.py::test_multi_positive_hand_computed",
        "tests/unit/test_losses_weighted.py::test_padding_slots_change_nothing",
        "tests/unit/test_losses_weighted.py::test_one_positive_per_anchor_is_info_nce",
        "tests/unit/test_losses_weighted.py::test_multi_positive_matches_loop_reference",
        "tests/unit/test_losses_weighted.py::test_multi_positive_rank_split",
    ],
}
TEST_FILES = sorted({test.split("::")[0] for tests in LOSS_TESTS.values() for test in tests})

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


def run_task(task: str, work: Path, steps: int, only: str = "") -> list[str]:
    """Runs the task's losses one after the other; returns its markdown lines (also printed)."""
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
    lines = [
        f"### {task}: {steps} steps, batch 32; {', '.join(metrics)} (x100)",
        "",
        "| loss | data | before | after | after - infonce's after | run s (incl. both evaluations) |",
        "|---|---|---|---|---|---|",
    ]
    print("\n" + "\n".join(lines), flush=True)
    baseline: dict[str, float] | None = None
    for label, loss, kind in [run for run in runs if only in run[0]]:
        config = parse_config(make(base, loss, data[kind], steps), work)
        started = time.monotonic()
        result = run_training(config, base_dir=work, run_dir=work / f"run-{task}-{len(label)}-{kind}", registry=None)
        seconds = time.monotonic() - started

        if label == "infonce":
            baseline = result.after

        def fmt(values: dict[str, float]) -> str:
            return " / ".join(f"{scale * values[m]:.2f}" for m in metrics)

        delta = (
            "-" if baseline is None else " / ".join(f"{scale * (result.after[m] - baseline[m]):+.2f}" for m in metrics)
        )
        line = f"| {label} | {kind} | {fmt(result.before)} | {fmt(result.after)} | {delta} | {seconds:.0f} |"
        lines.append(line)
        print(line, flush=True)
    return lines


def unit_tests() -> list[str]:
    """The tests that pin each loss, checked to exist, and one pytest run of their files."""
    lines = ["### Unit tests of each loss's maths", ""]
    for loss, tests in LOSS_TESTS.items():
        for test in tests:
            path, name = test.split("::")
            if not re.search(rf"^def {name}\(", (REPO / path).read_text(encoding="utf-8"), re.MULTILINE):
                raise SystemExit(f"{test} is listed in bench/losses.py but not defined: update LOSS_TESTS")
        lines.append(f"- {loss}: " + ", ".join(f"`{t.split('::')[1]}`" for t in tests))
    command = [sys.executable, "-m", "pytest", "-q", *TEST_FILES]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    lines += ["", f"`{shlex.join(['python', *command[1:]])}`: {summary} (exit {done.returncode})"]
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # checked below, not with choices=: argparse (3.11) refuses an empty nargs="*" list against choices
    parser.add_argument("tasks", nargs="*", help="sts and/or shapes (default: both)")
    parser.add_argument("--steps", type=int, default=30, help="steps per run (default 30)")
    parser.add_argument("--only", default="", help="run only the variants whose label contains this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    if set(args.tasks) - {"sts", "shapes"}:
        parser.error(f"unknown tasks {sorted(set(args.tasks) - {'sts', 'shapes'})}: choose sts and/or shapes")
    started = time.monotonic()
    lines: list[str] = []
    for task in args.tasks or ["sts", "shapes"]:
        with tempfile.TemporaryDirectory(prefix=f"duet-bench-losses-{task}-") as work:
            lines += [*run_task(task, Path(work), args.steps, args.only), ""]
    lines += unit_tests()
    if args.no_write:
        return
    from bench.results import write_section

    header = [
        "## Losses (issue 14): each new loss against plain InfoNCE, same budget (`bench/losses.py`)",
        "",
        f"`{shlex.join(['python', 'bench/losses.py', *sys.argv[1:]])}` at {datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC, {time.monotonic() - started:.0f} s in all; shared 2-core machine. Same model, data order, steps, "
        "batch and learning rate per task; budgets this small say whether a loss trains and which way it moves "
        "the metric, not which loss is best.",
        "",
    ]
    write_section("losses", "\n".join(header + lines))


if __name__ == "__main__":
    main()
