"""Issue 14's losses through the whole `run_training` path on tiny models: each reaches the
trainer from a config, reads its data kind (graded scores, lists of positives) and trains."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import PAIRS
from trainer.config import parse_config
from trainer.run import run_training


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(next(folder.rglob("model.safetensors"))))


def _changed(before, after) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture()
def workspace(tmp_path):
    pairs = [{"anchor": a, "positive": p} for a, p in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairs * 3))
    graded = [{"anchor": a, "positive": p, "score": 5.0 - i % 4} for i, (a, p) in enumerate(PAIRS)]
    (tmp_path / "graded.jsonl").write_text("\n".join(json.dumps(r) for r in graded * 3))
    # Several captions per "image": the second sentence of a pair and a variation of it.
    multi = [
        {"anchor": a, "positive": [p, p.lower().rstrip(".") + " here."][: 1 + i % 2]} for i, (a, p) in enumerate(PAIRS)
    ]
    (tmp_path / "multi.jsonl").write_text("\n".join(json.dumps(r) for r in multi * 3))
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in pairs))
    return tmp_path


@pytest.mark.parametrize(
    ("loss", "train"),
    [
        ({"name": "hn_nce", "beta": 1.0}, {"path": "pairs.jsonl"}),
        ({"name": "cwcl"}, {"path": "pairs.jsonl"}),
        ({"name": "cwcl"}, {"path": "graded.jsonl", "kind": "graded", "score_max": 5}),
        ({"name": "multi_positive"}, {"path": "multi.jsonl", "kind": "multi_positive"}),
        ({"name": "moco", "queue_size": 16, "momentum": 0.9}, {"path": "pairs.jsonl"}),
        ({"name": "moco", "queue_size": 16, "cached": True, "mini_batch_size": 3}, {"path": "pairs.jsonl"}),
    ],
    ids=["hn_nce", "cwcl-pairs", "cwcl-graded", "multi_positive", "moco", "moco-cached"],
)
def test_each_new_loss_trains_from_a_config(workspace, tiny_model_dir, loss, train):
    cfg = parse_config(
        {
            "base_model": str(tiny_model_dir),
            "train": [train],
            "eval": [{"path": "dev.jsonl", "name": "dev"}],
            "loss": loss,
            "batch_size": 6,
            "max_steps": 4,
            "learning_rate": 1e-3,
            "output": {"name": "tiny-tuned"},
        },
        workspace,
    )
    result = run_training(cfg, base_dir=workspace, run_dir=workspace / "run", registry=None)
    assert "dev/a_to_b/mrr@10" in result.after
    assert _changed(_weights(tiny_model_dir), _weights(workspace / "run" / "model"))


@pytest.mark.slow  # ~60 s on 2 cores: builds the shapes set and a dual encoder
def test_moco_with_a_frozen_text_tower_and_gradcache_trains_the_image_tower_only(tmp_path, minilm_path):
    """LiT + MoCo + GradCache together: the momentum copy shares the frozen tower, the image tower learns."""
    from sentence_transformers import SentenceTransformer

    from encoders.dual import ImageTowerConfig, build_dual_encoder
    from trainer.synthetic import SyntheticSpec, generate

    generate(tmp_path / "shapes", SyntheticSpec(n_train=48, n_test=18, seed=1))
    build_dual_encoder(minilm_path, ImageTowerConfig(image_size=32, patch_size=8, width=32, layers=1, heads=2)).save(
        str(tmp_path / "dual")
    )
    cfg = parse_config(
        {
            "base_model": str(tmp_path / "dual"),
            "train": [{"path": "shapes/train.jsonl", "anchor": "text", "positive": "image"}],
            "freeze": ["text"],
            "loss": {"name": "moco", "queue_size": 32, "cached": True, "mini_batch_size": 4},
            "batch_size": 8,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "output": {"name": "dual-moco"},
        },
        tmp_path,
    )
    run_training(cfg, base_dir=tmp_path, run_dir=tmp_path / "run", registry=None)
    before = SentenceTransformer(str(tmp_path / "dual"), device="cpu")
    after = SentenceTransformer(str(tmp_path / "run" / "model"), device="cpu")
    text = ["a small red circle on the left"]
    assert torch.allclose(torch.tensor(before.encode(text)), torch.tensor(after.encode(text)), atol=1e-6)
    from PIL import Image

    image = [Image.new("RGB", (32, 32), "red")]
    assert not torch.allclose(torch.tensor(before.encode(image)), torch.tensor(after.encode(image)), atol=1e-4)
