"""The automatic recipe against the README's STS-B recipe: dev Spearman, wall time, seconds per point.

Why it exists: issue 14 part 5 asks that `epochs: auto` / `learning_rate: auto` with evaluation each
epoch and the best epoch kept reach at least what the README's one-epoch recipe reaches on STS-B
dev, in the same or less time per point gained. Both variants fine-tune all-MiniLM-L6-v2 (the
bundled copy) on all of STS-B train (graded pairs, scores / 5, `loss: cosine`, batch 16, warm-up
0.1, seed 42, checkpoint every 200 steps) through `trainer.run.run_training`, one after the other
in this process, and evaluate on STS-B dev:

* README (`examples/sts.yaml`): `epochs: 1`, `learning_rate: 2e-5`, `eval_every: none` (the run as
  the README describes it: one evaluation, after training).
* auto: `epochs: auto`, `learning_rate: auto`, `eval_every: auto` (what `trainer/auto_recipe.py`
  chooses for 5,749 rows, cosine, batch 16, 22.7M parameters; evaluation each epoch, best kept).

Reported per variant: what it trained with, wall time of the whole `run_training` call and of its
training stage (from the run's own stage events), dev Spearman x100 after training, points gained
over the base model (measured in the same run), and seconds per point gained (wall / points); the
auto run's curve. The ratio auto / README of seconds per point is the figure the issue asks about
(<= 1.0 meets it).

How to run (from the repository root; it trains two models, ~10-15 min on 2 CPU cores):

    flock /tmp/duet-heavy.lock python bench/auto_recipe.py
    python bench/auto_recipe.py --limit 800 --no-write      # a quick look on the first 800 rows

It writes its section of bench/RESULTS.md (between `<!-- auto-recipe:start -->` and
`<!-- auto-recipe:end -->`, `bench/results.py::write_section`) unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import LoadSampler, code_state, machine_summary  # noqa: E402
from bench.results import RESULTS, write_section  # noqa: E402

STS_DIR = REPO.parent / "shared" / "data" / "stsbenchmark"
SECTION = "auto-recipe"
METRIC = "sts-dev/spearman"
VARIANTS: dict[str, dict[str, Any]] = {
    "README (examples/sts.yaml)": {"epochs": 1, "learning_rate": 2e-5, "eval_every": "none"},
    "auto": {"epochs": "auto", "learning_rate": "auto", "eval_every": "auto"},
}


def log(message: str) -> None:
    print(f"[auto-recipe {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sts_config(overrides: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """examples/sts.yaml with the bundled MiniLM and absolute data paths, plus `overrides`."""
    from encoders.defaults import bundled_minilm_path

    train: dict[str, Any] = {"path": str(STS_DIR / "sts-train.csv"), "kind": "graded"}
    if limit:
        train["limit"] = limit
    return {
        "base_model": str(bundled_minilm_path()),
        "train": [train],
        "eval": [{"path": str(STS_DIR / "sts-dev.csv"), "kind": "graded"}],
        "loss": {"name": "cosine"},
        "batch_size": 16,
        "warmup_ratio": 0.1,
        "seed": 42,
        "checkpoint_every_steps": 200,
        "output": {"name": "minilm-sts"},
        **overrides,
    }


def run_variant(overrides: dict[str, Any], work: Path, limit: int | None) -> dict[str, Any]:
    """One training run; its figures and the moments its stages began."""
    from trainer.config import parse_config
    from trainer.run import run_training

    stages: list[tuple[str, float]] = []

    def on_progress(event: dict[str, Any]) -> None:
        if event.get("event") == "stage":
            stages.append((str(event["stage"]), time.monotonic()))

    config = parse_config(sts_config(overrides, limit), STS_DIR)
    start = time.monotonic()
    result = run_training(config, base_dir=STS_DIR, run_dir=work, registry=None, on_progress=on_progress)
    end = time.monotonic()
    began = {name: at for name, at in stages}
    train_start = began.get("training", start)
    train_end = next((at for name, at in stages if at > train_start and name != "training"), end)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "recipe": result.recipe,
        "wall_s": end - start,
        "train_s": train_end - train_start,
        "before": result.before[METRIC],
        "after": result.after[METRIC],
        "curve": [(p["step"], p["epoch"], p["metrics"][METRIC], p["best"]) for p in result.curve],
    }


def render(
    rows: dict[str, dict[str, Any]], argv: list[str], started: str, load: LoadSampler, state: str, limit: int | None
) -> str:
    import sentence_transformers
    import torch
    import transformers

    base = next(iter(rows.values()))["before"]
    software = [f"torch {torch.__version__}", f"sentence-transformers {sentence_transformers.__version__}"]
    software.append(f"transformers {transformers.__version__}")
    lines = [
        "## Automatic recipe vs the README's STS-B recipe (`bench/auto_recipe.py`)",
        f"- Command: `{shlex.join(['python', 'bench/auto_recipe.py', *argv])}`",
        f"- Date: {started}; code: {state}",
        f"- Machine: {machine_summary(software, memory=True)}; torch threads {torch.get_num_threads()}",
        f"- 1-minute load average during the run: min {min(load.samples):.1f}, max {max(load.samples):.1f}",
        "- Model: all-MiniLM-L6-v2 (bundled), fp32 on CPU; STS-B train "
        + (f"(the first {limit} rows only)" if limit else "(all 5,749 pairs)")
        + ", graded, `loss: cosine`, batch 16, warm-up 0.1, seed 42; STS-B dev Spearman x100.",
        f"- Base model (measured in this run): {base:.2f}",
        "",
        "| recipe | epochs | learning rate | eval_every | wall s (run_training) | of which training s "
        "| dev Spearman x100 | points gained | s per point gained |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    per_point: dict[str, float] = {}
    for name, row in rows.items():
        gained = row["after"] - row["before"]
        per_point[name] = row["wall_s"] / gained if gained > 0 else float("inf")
        recipe = row["recipe"]
        chosen = set(recipe.get("chosen", []))

        def shown(key: str, value: Any, chosen: set[str] = chosen) -> str:
            text = "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
            return f"{text} (auto)" if key in chosen else text

        lines.append(
            f"| {name} | {shown('epochs', recipe['epochs'])} | {shown('learning_rate', recipe['learning_rate'])} "
            f"| {shown('eval_every', recipe['eval_every'])} | {row['wall_s']:.0f} | {row['train_s']:.0f} "
            f"| {row['after']:.2f} | {gained:+.2f} | {per_point[name]:.0f} |"
        )
    readme, auto = (per_point[n] for n in VARIANTS)
    ratio = f"**{auto / readme:.2f}x**" if readme != float("inf") else "n/a (the README recipe gained nothing)"
    lines += [
        "",
        f"- Seconds per point gained, auto / README: {ratio} (<= 1.00 meets the issue's ask)",
        f"- Dev Spearman, auto minus README: {rows['auto']['after'] - rows[next(iter(VARIANTS))]['after']:+.2f}",
        "",
        "The auto run's evaluations during training (the best is what it saved):",
        "",
        "| step | epoch | dev Spearman x100 | best |",
        "|---|---|---|---|",
    ]
    for step, epoch, value, best in rows["auto"]["curve"]:
        lines.append(f"| {step} | {epoch:g} | {value:.2f} | {'best' if best else ''} |")
    return "\n".join(lines) + "\n"


def _where_and_what(argv: list[str], i: int) -> bool:
    """Whether argv[i] is --results/--code or its value: where the section goes, not what was measured."""
    options = ("--results", "--code")
    return argv[i].split("=")[0] in options or (i > 0 and argv[i - 1] in options)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="use only the first N training rows")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file to write the section into")
    parser.add_argument("--code", default=None, help="describe the code measured (default: git state of this checkout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    state = args.code or code_state(["trainer", "bench"])
    load = LoadSampler()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="duet-auto-recipe-") as tmp:
        for name, overrides in VARIANTS.items():
            log(f"training: {name} {overrides}")
            rows[name] = run_variant(overrides, Path(tmp) / "run", args.limit)
            log(f"{name}: {rows[name]['after']:.2f} after {rows[name]['wall_s']:.0f} s")
    load.stop()
    shown = [a for i, a in enumerate(argv) if not _where_and_what(argv, i)]  # the command as anyone reruns it
    section = render(rows, shown, started, load, state, args.limit)
    print(section)
    if not args.no_write:
        write_section(SECTION, section, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
