"""End-to-end training runs on a tiny model: register, reload, resume, determinism, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from registry.store import ModelRegistry
from tests.helpers import PAIRS, free_port, tiny_run_config, write_pairs
from trainer.config import parse_config
from trainer.run import run_training


@pytest.fixture()
def workspace(tmp_path, tiny_model_dir):
    write_pairs(tmp_path / "train.jsonl", PAIRS * 4)
    write_pairs(tmp_path / "dev.jsonl", PAIRS)
    return tmp_path


def config(workspace, tiny_model_dir, **overrides):
    return tiny_run_config(
        workspace,
        tiny_model_dir,
        {
            "max_steps": 6,
            "checkpoint_every_steps": 2,
            "output": {"name": "tiny-tuned", "promote": {"alias": "production", "metric": "dev/a_to_b/mrr@10"}},
            **overrides,
        },
    )


def test_training_registers_a_version_that_loads_anywhere(workspace, tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    registry = ModelRegistry.embedded(workspace / "registry")
    events = []
    result = run_training(
        config(workspace, tiny_model_dir),
        base_dir=workspace,
        run_dir=workspace / "run",
        registry=registry,
        on_progress=events.append,
    )
    assert {"dev/a_to_b/recall@1", "dev/b_to_a/mrr@10", "dev/alignment", "dev/uniformity"} <= set(result.after)
    assert set(result.before) == set(result.after)
    assert "| metric | before | after | delta |" in result.report
    assert result.version is not None and result.version.ref == "tiny-tuned/1"
    assert result.version.path.is_relative_to(workspace / "registry")  # artifacts stay in the data dir
    manifest = result.version.manifest
    assert manifest.trained and manifest.lineage.base_model == str(tiny_model_dir)
    assert set(manifest.lineage.dataset_hashes) == {"train"}
    assert manifest.lineage.hyperparameters["loss"]["name"] == "infonce"
    assert "baseline/dev/a_to_b/mrr@10" in manifest.metrics
    assert result.promotion is not None and (result.promotion.promoted == ("production" in result.version.aliases))
    progress = [e for e in events if e["event"] == "progress"]
    assert progress[-1]["step"] == 6 and progress[-1]["max_steps"] == 6
    # The registered folder loads with plain sentence-transformers, and has Duet's model card section.
    plain = SentenceTransformer(str(result.version.path), device="cpu")
    assert plain.encode(["hello"]).shape == (1, 32)
    assert "## Duet fine-tuning" in (result.version.path / "README.md").read_text()
    # Loss curves went to the registry's MLflow tracking, on the run the version links to.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry.tracking_uri)
    run_id = client.get_model_version("tiny-tuned", "1").run_id
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]


def test_same_seed_same_weights(workspace, tiny_model_dir):
    weights = []
    for attempt in range(2):
        result = run_training(
            config(workspace, tiny_model_dir, eval=[], output={"name": "tiny-tuned"}),
            base_dir=workspace,
            run_dir=workspace / f"run{attempt}",
            registry=None,
        )
        weights.append(_state(result.run_dir / "model"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def _state(folder):
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_an_interrupted_run_resumes_from_its_last_checkpoint(workspace, tiny_model_dir):
    cfg = config(workspace, tiny_model_dir, eval=[], output={"name": "tiny-tuned"})

    def interrupt_at_step_3(event):
        if event.get("step") == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, base_dir=workspace, run_dir=workspace / "run", registry=None, on_progress=interrupt_at_step_3)
    assert (workspace / "run" / "checkpoints" / "checkpoint-2").is_dir()
    events = []
    run_training(cfg, base_dir=workspace, run_dir=workspace / "run", registry=None, on_progress=events.append)
    assert any(e.get("stage") == "resuming from checkpoint-2" for e in events)
    steps = [e["step"] for e in events if e["event"] == "progress"]
    assert steps[0] == 3 and steps[-1] == 6  # steps 1-2 were not trained again
    # Resumed training ends where an uninterrupted run does.
    straight = run_training(cfg, base_dir=workspace, run_dir=workspace / "straight", registry=None)
    resumed, fresh = _state(workspace / "run" / "model"), _state(straight.run_dir / "model")
    assert all(torch.allclose(resumed[k], fresh[k], atol=1e-6) for k in fresh)


def test_frozen_tower_needs_a_dual_encoder(workspace, tiny_model_dir):
    with pytest.raises(ValueError, match="separate towers"):
        run_training(
            config(workspace, tiny_model_dir, freeze=["text"]),
            base_dir=workspace,
            run_dir=workspace / "r",
            registry=None,
        )


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_cpu_processes_with_negatives_gathered_across_them(workspace, tiny_model_dir):
    """`torchrun --nproc_per_node 2 --no-python duet train CONFIG`: DDP on gloo; rank 0 registers."""
    cfg = {
        "base_model": str(tiny_model_dir),
        "train": [{"path": "train.jsonl"}],
        "loss": {"name": "infonce", "gather_across_devices": True},
        "batch_size": 4,
        "max_steps": 3,
        "output": {"name": "tiny-ddp"},
    }
    (workspace / "ddp.json").write_text(json.dumps(cfg))
    env = {**os.environ, "DUET_REGISTER_DEFAULT_MODELS": "false", "OMP_NUM_THREADS": "1"}
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "--no-python",
        "duet",
        "train",
        str(workspace / "ddp.json"),
        "--data-dir",
        str(workspace / "data"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered tiny-ddp/1" in done.stdout
    registry = ModelRegistry.embedded(workspace / "data" / "registry")
    assert [v.version for v in registry.list_versions("tiny-ddp")] == [1]  # only rank 0 registered
    assert sys.executable  # the same interpreter's duet ran both ranks


def test_dual_encoder_trains_its_image_tower_with_the_text_tower_frozen(tmp_path, minilm_path):
    """A tiny text+image model learns on the synthetic shapes; the frozen text tower stays put."""
    from sentence_transformers import SentenceTransformer

    from encoders.dual import ImageTowerConfig, build_dual_encoder
    from trainer.synthetic import SyntheticSpec, generate

    generate(tmp_path / "shapes", SyntheticSpec(n_train=64, n_test=30, seed=1))
    build_dual_encoder(minilm_path, ImageTowerConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2)).save(
        str(tmp_path / "dual")
    )
    cfg = parse_config(
        {
            "base_model": str(tmp_path / "dual"),
            "train": [{"path": "shapes/train.jsonl", "anchor": "text", "positive": "image"}],
            "eval": [
                {
                    "path": "shapes/test.jsonl",
                    "anchor": "text",
                    "positive": "image",
                    "name": "shapes",
                    "same_content": ["colour", "shape", "size", "position"],
                }
            ],
            "freeze": ["text"],
            "batch_size": 16,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "output": {"name": "dual-tiny"},
        },
        tmp_path,
    )
    result = run_training(cfg, base_dir=tmp_path, run_dir=tmp_path / "run", registry=None)
    assert "shapes/text_to_image/recall@1" in result.after and "shapes/modality_gap" in result.after
    before = SentenceTransformer(str(tmp_path / "dual"), device="cpu")
    after = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    text = ["a small red circle on the left"]
    assert torch.allclose(torch.tensor(before.encode(text)), torch.tensor(after.encode(text)), atol=1e-6)
    from PIL import Image

    image = [Image.new("RGB", (32, 32), "red")]
    assert not torch.allclose(torch.tensor(before.encode(image)), torch.tensor(after.encode(image)), atol=1e-4)


def test_background_data_loading_is_deterministic(workspace, tiny_model_dir):
    """`dataloader_workers` (the default on CUDA) tokenises in worker processes; runs stay
    reproducible. (Not bit-equal to 0 workers: the loader draws its worker seed from the
    global RNG, which shifts the dropout masks.)"""
    weights = []
    for attempt in range(2):
        result = run_training(
            config(workspace, tiny_model_dir, eval=[], output={"name": "tiny-tuned"}, dataloader_workers=2),
            base_dir=workspace,
            run_dir=workspace / f"run-w{attempt}",
            registry=None,
        )
        weights.append(_state(result.run_dir / "model"))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
