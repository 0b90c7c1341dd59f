"""Evaluation during training on a tiny model: the best evaluation is the result, not the last one;
the curve is recorded (result, report, card, manifest); it survives a resume from a checkpoint.

The training pairs are the dev pairs with their positives rotated by one (anchor i with positive
i + 1), so training teaches the model the wrong matches: dev MRR falls after the first epoch and the
best epoch is not the last one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from registry.store import ModelRegistry
from tests.helpers import PAIRS, free_port, tiny_run_config, write_pairs
from trainer.run import run_training

METRIC = "dev/a_to_b/mrr@10"


@pytest.fixture()
def workspace(tmp_path):
    rotated = [(PAIRS[i][0], PAIRS[(i + 1) % len(PAIRS)][1]) for i in range(len(PAIRS))]
    write_pairs(tmp_path / "train.jsonl", rotated * 4)
    write_pairs(tmp_path / "dev.jsonl", PAIRS)
    return tmp_path


def config(workspace, tiny_model_dir, **overrides):
    # 32 rows at batch 8: 4 steps per epoch
    return tiny_run_config(workspace, tiny_model_dir, {"epochs": 3, "output": {"name": "tiny-best"}, **overrides})


def test_the_best_epoch_is_saved_and_registered_not_the_last(workspace, tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    from trainer.run import eval_set, evaluate_all

    registry = ModelRegistry.embedded(workspace / "registry")
    events = []
    result = run_training(
        config(workspace, tiny_model_dir),
        base_dir=workspace,
        run_dir=workspace / "run",
        registry=registry,
        on_progress=events.append,
    )
    assert result.best_metric == METRIC
    assert [(p["step"], p["epoch"]) for p in result.curve] == [(4, 1.0), (8, 2.0), (12, 3.0)]
    best = next(p for p in result.curve if p["best"])
    last = result.curve[-1]
    assert best is not last and best["metrics"][METRIC] > last["metrics"][METRIC]
    # What the run evaluated after training, and what it registered, is the best epoch's model.
    assert result.after[METRIC] == best["metrics"][METRIC]
    assert result.version is not None
    from trainer.data import load_data

    dev = eval_set(load_data(config(workspace, tiny_model_dir).eval[0], workspace))
    reloaded = evaluate_all(SentenceTransformer(str(result.version.path), device="cpu"), [dev])
    assert reloaded[METRIC] == pytest.approx(best["metrics"][METRIC], abs=1e-6)
    assert reloaded[METRIC] != pytest.approx(last["metrics"][METRIC], abs=1e-6)
    # The curve and the recipe are in the events, the report, the card and the manifest.
    during = [e for e in events if e["event"] == "evaluation" and e["when"] == "during"]
    assert [(e["step"], e["best"]) for e in during] == [(p["step"], p["best"]) for p in result.curve]
    assert any(e["event"] == "recipe" and e["eval_every"] == "epoch" for e in events)
    assert f"kept: step {best['step']}" in result.report and "| 12 | 3 |" in result.report
    assert "Evaluation during training" in (result.version.path / "README.md").read_text()
    resolved = result.version.manifest.lineage.hyperparameters["resolved"]
    assert resolved["eval_every"] == "epoch" and resolved["best_metric"] == METRIC
    assert [p["best"] for p in resolved["curve"]] == [p["best"] for p in result.curve]


def test_auto_resolves_and_is_recorded(workspace, tiny_model_dir):
    result = run_training(
        config(workspace, tiny_model_dir, epochs="auto", learning_rate="auto", max_steps=2),
        base_dir=workspace,
        run_dir=workspace / "run",
        registry=None,
    )
    # 32 rows: auto_epochs gives the most epochs (max_steps still stops the run); MiniLM-size: 2e-5.
    assert result.recipe["epochs"] == 4 and result.recipe["learning_rate"] == pytest.approx(2e-5)
    assert result.recipe["chosen"] == ["epochs", "learning_rate", "eval_every"]
    assert [p["step"] for p in result.curve] == [2]  # the last step is always evaluated
    assert "learning rate 2e-05 (auto)" in (result.run_dir / "model" / "README.md").read_text()
    assert "epochs 4: about 10000 examples seen over 32 training rows" in result.report


def test_the_curve_and_best_survive_a_resume(workspace, tiny_model_dir):
    cfg = config(workspace, tiny_model_dir, eval_every=2, checkpoint_every_steps=4)

    def crash_at_step_7(event):
        if event.get("event") == "progress" and event.get("step") == 7:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, base_dir=workspace, run_dir=workspace / "run", registry=None, on_progress=crash_at_step_7)
    events = []
    resumed = run_training(cfg, base_dir=workspace, run_dir=workspace / "run", registry=None, on_progress=events.append)
    assert any(e.get("stage") == "resuming from checkpoint-4" for e in events)
    during = [e["step"] for e in events if e["event"] == "evaluation" and e["when"] == "during"]
    assert during == [6, 8, 10, 12]  # steps 2 and 4 were not evaluated again: their points came with the checkpoint
    straight = run_training(cfg, base_dir=workspace, run_dir=workspace / "straight", registry=None)
    assert [p["step"] for p in resumed.curve] == [2, 4, 6, 8, 10, 12]  # 2 and 4 from checkpoint-4
    assert [p["best"] for p in resumed.curve] == [p["best"] for p in straight.curve]
    for a, b in zip(resumed.curve, straight.curve):
        assert a["metrics"][METRIC] == pytest.approx(b["metrics"][METRIC], abs=1e-6)
    assert resumed.after[METRIC] == pytest.approx(straight.after[METRIC], abs=1e-6)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_under_ddp_only_rank_0_evaluates_and_the_best_is_registered(workspace, tiny_model_dir):
    """`torchrun --nproc_per_node 2`: rank 0 evaluates each epoch while rank 1 waits at the next
    all-reduce; the registered version records one curve, its best point the one registered."""
    cfg = {
        "base_model": str(tiny_model_dir),
        "train": [{"path": "train.jsonl"}],
        "eval": [{"path": "dev.jsonl", "name": "dev"}],
        "loss": {"name": "infonce"},
        "batch_size": 4,  # 32 rows over 2 ranks: 4 steps per epoch
        "epochs": 2,
        "learning_rate": 1e-3,
        "output": {"name": "tiny-ddp-best"},
        "seed": 7,
    }
    (workspace / "ddp.json").write_text(json.dumps(cfg))
    env = {**os.environ, "DUET_REGISTER_DEFAULT_MODELS": "false", "OMP_NUM_THREADS": "1"}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", str(free_port()), "--no-python", "duet"]
    command += ["train", str(workspace / "ddp.json"), "--data-dir", str(workspace / "data")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    registry = ModelRegistry.embedded(workspace / "data" / "registry")
    [version] = registry.list_versions("tiny-ddp-best")
    resolved = version.manifest.lineage.hyperparameters["resolved"]
    assert [(p["step"], p["epoch"]) for p in resolved["curve"]] == [(4, 1.0), (8, 2.0)]  # rank 0, each epoch
    best = next(p for p in resolved["curve"] if p["best"])
    assert version.manifest.metrics[METRIC] == pytest.approx(best[METRIC], abs=1e-6)
