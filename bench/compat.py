"""Backward-compatible training (issue 14): can the new version's queries search the old version's
gallery? One table: rows {without the compat objective, with the compat loss, with a learned map
(+ loss), shapes only}, columns old/old, new/new, new/old; target new/old >= old/old and within 2
points of new/new.

Tasks (`python bench/compat.py`, both by default; about 10 minutes on a quiet 2-core machine):

* shapes: v1 = a short LiT run (frozen text tower, 40 steps) of a MiniLM dual encoder on 300
  synthetic shapes; v2 = 150 steps on all 1000 with both towers free (so its text queries move too),
  continued from v1 (`--shapes-v2-from v1`, the default: the upgrade a user runs). With
  `--shapes-v2-from scratch` (or both) v2 starts instead from the MiniLM text tower and a fresh image
  tower of another seed: BCT's setting, where nothing but the objective ties v2's space to v1's.
  Metrics: text->image recall@1 and MRR@10 on held-out colour-shape combinations, new text queries
  against v1's images.
* sts: v1 = all-MiniLM-L6-v2 (bundled); v2 = v1 fine-tuned on STS-B train as examples/sts.yaml
  (graded pairs, cosine loss, batch 16, learning rate 2e-5, 10% warm-up; 360 steps = one epoch by
  default). Metrics: Spearman x100 of cos(new(s1), old(s2)) on STS-B dev, and recall@1 of s1 -> s2
  over the dev pairs scoring >= 4 (a gallery test: new-model queries against old-model vectors).
  No map variant here (budget: each STS-B run is the bench's longest).

Every run goes through `trainer.run.run_training` in this process, against an embedded registry in
a temporary folder (v1 is a registry version, so v2's manifest records the claim). The "without"
row's cross-model numbers are measured after its run with the same function the trainer uses.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STS = REPO.parent / "shared" / "data" / "stsbenchmark"
sys.path.insert(0, str(REPO))

# (label, compatible_with beyond the model, tasks it runs on): the map variant runs on shapes only,
# to keep the bench within 15 minutes with a full STS-B epoch per run
VARIANTS: list[tuple[str, dict[str, Any] | None, tuple[str, ...]]] = [
    ("without compat objective", None, ("shapes", "sts")),
    ("with compat loss", {"weight": 1.0}, ("shapes", "sts")),
    ("with map (+loss)", {"weight": 1.0, "map": True}, ("shapes",)),
]
TAGS = ("old-old", "new-new", "new-old")


def shapes_task(
    work: Path, registry: Any, steps_v1: int, steps_v2: int, lr_v2: float, starts: list[str], only: str
) -> tuple[list[dict[str, Any]], list[str]]:
    from encoders.defaults import bundled_minilm_path
    from encoders.dual import ImageTowerConfig, build_dual_encoder
    from trainer.synthetic import SyntheticSpec, generate

    generate(work / "shapes", SyntheticSpec(n_train=1000, n_test=150, seed=1))
    build_dual_encoder(bundled_minilm_path(), ImageTowerConfig()).save(str(work / "dual"))
    pairs = {"path": "shapes/train.jsonl", "anchor": "text", "positive": "image"}
    test = {
        **pairs,
        "path": "shapes/test.jsonl",
        "name": "shapes",
        "same_content": ["colour", "shape", "size", "position"],
    }

    def config(base: str, limit: int | None, steps: int, lr: float, freeze: list[str], compat: Any) -> dict[str, Any]:
        return {
            "base_model": base,
            "train": [{**pairs, **({"limit": limit} if limit else {})}],
            "eval": [test],
            "loss": {"temperature": 0.05},
            "freeze": freeze,
            "batch_size": 32,
            "max_steps": steps,
            "learning_rate": lr,
            "warmup_ratio": 0.05,
            "seed": 0,
            "checkpoint_every_steps": 100_000,
            "output": {"name": "shapes"},
            **({"compatible_with": compat} if compat else {}),
        }

    v1 = config(str(work / "dual"), 300, steps_v1, 1e-3, ["text"], None)
    metrics = ["shapes/text_to_image/recall@1", "shapes/text_to_image/mrr@10"]
    bases = {"v1": "shapes/1"}
    if "scratch" in starts:
        # BCT's setting: a fresh image tower of another seed, so nothing but the objective ties
        # v2's space to v1's
        build_dual_encoder(bundled_minilm_path(), ImageTowerConfig(seed=1)).save(str(work / "dual-fresh"))
        bases["scratch"] = str(work / "dual-fresh")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for start in starts:
        task = f"shapes, v2 from {start}"
        v2 = [
            (label, config(bases[start], None, steps_v2, lr_v2, [], c))
            for label, c in _variants("shapes/1", only, "shapes")
        ]
        got = run_variants(work, registry, task, v1 if not notes else None, v2, metrics, "shapes/1")
        rows += got[0]
        notes += got[1]
    return rows, notes


def sts_task(work: Path, registry: Any, steps: int, only: str) -> tuple[list[dict[str, Any]], list[str]]:
    from encoders.defaults import bundled_minilm_path

    with (STS / "sts-dev.csv").open(encoding="utf-8", newline="") as handle:
        rows = [r for r in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE) if len(r) >= 7]
    close = [{"anchor": r[5], "positive": r[6]} for r in rows if float(r[4]) >= 4.0]
    (work / "sts-dev-close.jsonl").write_text("\n".join(json.dumps(p) for p in close))

    def config(compat: Any) -> dict[str, Any]:
        return {
            "base_model": "minilm/1",
            # the rows the steps see (batch 16): the old model embeds no more than training reads
            "train": [{"path": str(STS / "sts-train.csv"), "kind": "graded", "format": "sts", "limit": 16 * steps}],
            "eval": [
                {"path": str(STS / "sts-dev.csv"), "kind": "graded", "format": "sts", "name": "sts-dev"},
                {"path": "sts-dev-close.jsonl", "name": "sts-dev-close"},
            ],
            "loss": {"name": "cosine"},
            "batch_size": 16,
            "max_steps": steps,
            "learning_rate": 2e-5,
            "seed": 42,
            "checkpoint_every_steps": 100_000,
            "output": {"name": "minilm"},
            **({"compatible_with": compat} if compat else {}),
        }

    v1 = {"register": bundled_minilm_path()}
    metrics = ["sts-dev/spearman", "sts-dev-close/a_to_b/recall@1"]
    v2s = [(label, config(c)) for label, c in _variants("minilm/1", only, "sts")]
    return run_variants(work, registry, "sts", v1, v2s, metrics, "minilm/1")


def _variants(ref: str, only: str, task: str) -> list[tuple[str, dict[str, Any] | None]]:
    return [
        (label, None if extra is None else {"model": ref, **extra})
        for label, extra, tasks in VARIANTS
        if task in tasks and only in label
    ]


def run_variants(
    work: Path,
    registry: Any,
    task: str,
    v1: dict[str, Any] | None,
    v2s: list[tuple[str, dict[str, Any]]],
    metrics: list[str],
    old_ref: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Makes v1 (a run, or a registered folder; None: there already), then each v2; returns one
    table row per v2 and metric, and the notes (seconds per run)."""
    from trainer.config import parse_config
    from trainer.run import run_training

    notes = []
    if v1 is None:
        pass
    elif "register" in v1:
        register_folder(registry, v1["register"], "minilm")
    else:
        started = time.monotonic()
        result = run_training(parse_config(v1, work), base_dir=work, run_dir=work / f"{task}-v1", registry=registry)
        notes.append(f"{task} v1: {time.monotonic() - started:.0f} s, {_fmt(result.after, metrics[0])} new/new")
    rows = []
    for label, body in v2s:
        config = parse_config(body, work)
        started = time.monotonic()
        run_dir = work / f"{task.replace(' ', '-').replace(',', '')}-{len(rows)}"
        result = run_training(config, base_dir=work, run_dir=run_dir, registry=registry)
        seconds = time.monotonic() - started
        cross = result.after if config.compatible_with else measure_without(work, registry, result, config, old_ref)
        claim = result.version.manifest.compatible_with if result.version else []
        notes.append(f"{task} / {label}: {seconds:.0f} s; manifest claims {[c.ref for c in claim] or 'nothing'}")
        for metric in metrics:
            name, rest = metric.split("/", 1)
            values = {tag: cross[f"{name}/{tag}/{rest}"] for tag in TAGS}
            rows.append({"task": task, "metric": metric, "variant": label, **values})
    return rows, notes


def register_folder(registry: Any, folder: Path, name: str) -> None:
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Lineage, Manifest

    contract = describe(load_sentence_transformer(folder))
    manifest = Manifest(contract=contract, trained=True, lineage=Lineage(base_model=str(folder)))
    registry.register(name, folder, manifest)


def measure_without(work: Path, registry: Any, result: Any, config: Any, old_ref: str) -> dict[str, float]:
    """The cross-model numbers of a v2 trained without the objective, measured as the trainer
    measures them (no map: its vectors meet v1's as they are)."""
    from sentence_transformers import SentenceTransformer

    from trainer.compat import cross_model_metrics, old_eval_sides
    from trainer.data import load_data
    from trainer.run import encoder_fn, eval_set

    sets = [eval_set(load_data(spec, work)) for spec in config.eval]
    old = SentenceTransformer(str(registry.resolve(old_ref).path), device="cpu")
    new = SentenceTransformer(str(result.version.path), device="cpu")
    return cross_model_metrics(encoder_fn(new), old_eval_sides(encoder_fn(old), sets), sets, None)


def _fmt(values: dict[str, float], metric: str) -> str:
    return f"{_scale(metric) * values[metric]:.2f}"


def _scale(metric: str) -> float:
    return 1.0 if "spearman" in metric else 100.0  # the evaluation reports Spearman x100 already


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| task | metric (x100) | variant | old/old | new/new | new/old | new/old >= old/old "
        "| new/new - new/old <= 2 |",
        "|---|---|---|---:|---:|---:|:-:|:-:|",
    ]
    for row in rows:
        s = _scale(row["metric"])
        old, new, cross = (s * row[t] for t in ("old-old", "new-new", "new-old"))
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['variant']} | {old:.2f} | {new:.2f} | {cross:.2f} | "
            f"{'yes' if cross >= old - 1e-9 else 'no'} | {'yes' if new - cross <= 2 else 'no'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", help="shapes and/or sts (default: both)")
    parser.add_argument("--shapes-v1-steps", type=int, default=40)
    parser.add_argument("--shapes-v2-steps", type=int, default=150)
    parser.add_argument("--shapes-v2-lr", type=float, default=3e-4, help="both towers of v2 (text moves: drift)")
    parser.add_argument(
        "--shapes-v2-from",
        nargs="+",
        choices=["v1", "scratch"],
        default=["v1"],
        help="v2 continued from v1, and/or from a fresh image tower (BCT's setting)",
    )
    parser.add_argument("--sts-steps", type=int, default=360, help="360 x batch 16: one STS-B train epoch")
    parser.add_argument("--only", default="", help="run only the variants whose label contains this")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    if set(args.tasks) - {"shapes", "sts"}:
        parser.error(f"unknown tasks {sorted(set(args.tasks) - {'shapes', 'sts'})}: choose shapes and/or sts")
    from registry.store import ModelRegistry

    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for task in args.tasks or ["shapes", "sts"]:
        with tempfile.TemporaryDirectory(prefix=f"duet-bench-compat-{task}-") as folder:
            work = Path(folder)
            registry = ModelRegistry.embedded(work / "registry")
            if task == "shapes":
                got = shapes_task(
                    work,
                    registry,
                    args.shapes_v1_steps,
                    args.shapes_v2_steps,
                    args.shapes_v2_lr,
                    args.shapes_v2_from,
                    args.only,
                )
            else:
                got = sts_task(work, registry, args.sts_steps, args.only)
        rows += got[0]
        notes += got[1]
        print(table(rows), "\n" + "\n".join(notes), flush=True)
    command = "python bench/compat.py " + " ".join(sys.argv[1:])
    body = "\n".join(
        [
            "## Backward-compatible training (issue 14): new queries against the old gallery",
            "",
            f"`{command.strip()}` at {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{time.monotonic() - started:.0f} s in all; shared 2-core machine, other jobs running.",
            "",
            table(rows),
            "",
            *[f"- {note}" for note in notes],
        ]
    )
    if not args.no_write:
        from bench.results import write_section

        write_section("compat", body)
    print(body)


if __name__ == "__main__":
    main()
