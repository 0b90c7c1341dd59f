"""WiSE-FT (`interpolate`) end to end on a tiny model: the saved weights are the blend, the sweep
is recorded in the report, the result and the manifest, and `auto` keeps to its retention rule."""

from __future__ import annotations

import pytest
import torch

from registry.store import ModelRegistry
from tests.helpers import PAIRS, tiny_run_config, write_pairs
from trainer.run import run_training

OTHER = [
    ("The sun sets over the sea.", "Evening falls on the ocean."),
    ("A cat sleeps on the sofa.", "A pet is resting on a couch."),
    ("The train is late.", "The railway service is delayed."),
    ("She paints a picture.", "An artist is at work."),
]


@pytest.fixture()
def workspace(tmp_path):
    write_pairs(tmp_path / "train.jsonl", PAIRS * 4)
    write_pairs(tmp_path / "dev.jsonl", PAIRS)
    write_pairs(tmp_path / "other.jsonl", OTHER)
    return tmp_path


def config(workspace, tiny_model_dir, **overrides):
    return tiny_run_config(
        workspace,
        tiny_model_dir,
        {"max_steps": 6, "checkpoint_every_steps": 100, "output": {"name": "tiny-wise"}, **overrides},
    )


def _weights(folder):
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(p).items()}


def test_a_fixed_alpha_saves_the_blend_of_base_and_fine_tuned_weights(workspace, tiny_model_dir):
    tuned = run_training(config(workspace, tiny_model_dir), base_dir=workspace, run_dir=workspace / "t", registry=None)
    registry = ModelRegistry.embedded(workspace / "registry")
    events: list[dict] = []
    result = run_training(
        config(workspace, tiny_model_dir, interpolate={"alpha": 0.5}),
        base_dir=workspace,
        run_dir=workspace / "w",
        registry=registry,
        on_progress=events.append,
    )
    base, fine, saved = _weights(tiny_model_dir), _weights(tuned.run_dir / "model"), _weights(result.version.path)
    assert saved.keys() == fine.keys() and base.keys() == fine.keys()
    moved = [k for k in fine if not torch.equal(base[k], fine[k])]
    assert moved  # training changed weights, so the blend is not trivially the base
    for k in fine:
        assert torch.allclose(saved[k], 0.5 * base[k] + 0.5 * fine[k], atol=1e-6), k
    record = result.interpolation
    assert record is not None and record.mode == "fixed" and record.alpha == 0.5
    assert [t.alpha for t in record.trials] == [0.5] and record.base is not None
    assert record.trials[0].target == pytest.approx(result.after["dev/a_to_b/mrr@10"])  # what was saved
    assert result.version.manifest.interpolation == record
    assert "#### Weight interpolation (WiSE-FT, alpha fixed)" in result.report
    assert "#### Weight interpolation" in (result.version.path / "README.md").read_text()
    assert {e["when"] for e in events if e["event"] == "evaluation"} >= {"alpha 0", "alpha 0.5", "after"}


def test_auto_chooses_by_the_retention_rule_and_records_the_sweep(workspace, tiny_model_dir):
    margin = 0.02
    cfg = config(
        workspace,
        tiny_model_dir,
        interpolate={
            "alpha": "auto",
            "alphas": [0.0, 0.5, 1.0],
            "retain": [{"path": "other.jsonl", "name": "general"}],
            "max_retention_drop": margin,
        },
    )
    result = run_training(cfg, base_dir=workspace, run_dir=workspace / "a", registry=None)
    record = result.interpolation
    assert record is not None and record.mode == "auto" and record.metric == "dev/a_to_b/mrr@10"
    assert [t.alpha for t in record.trials] == [0.0, 0.5, 1.0]
    assert record.base == record.trials[0] and set(record.base.retain) == {"general/a_to_b/mrr@10"}
    ok = [t for t in record.trials if all(record.base.retain[k] - v <= margin for k, v in t.retain.items())]
    best = max(ok, key=lambda t: (t.target, -t.alpha))
    assert record.qualified and record.alpha == best.alpha
    assert result.after["dev/a_to_b/mrr@10"] == pytest.approx(best.target)  # the chosen blend is what was saved
    for trial in record.trials:
        assert f"| {trial.alpha:g}" in result.report
    assert "**yes**" in result.report and "max retention drop 0.02" in result.report


def test_auto_without_a_qualifying_alpha_saves_the_base_weights(workspace, tiny_model_dir):
    """A negative margin (refused in a config, set here past validation) fails every alpha tried (0
    is not among them), so the run must give the fine-tuning up and save the base weights, saying so."""
    cfg = config(
        workspace,
        tiny_model_dir,
        interpolate={
            "alpha": "auto",
            "alphas": [0.5, 1.0],
            "retain": [{"path": "other.jsonl", "name": "general"}],
            "max_retention_drop": 0.0,
        },
    )
    cfg = cfg.model_copy(update={"interpolate": cfg.interpolate.model_copy(update={"max_retention_drop": -1.0})})
    result = run_training(cfg, base_dir=workspace, run_dir=workspace / "n", registry=None)
    record = result.interpolation
    assert record is not None and (record.alpha, record.qualified) == (0.0, False)
    saved, base = _weights(result.run_dir / "model"), _weights(tiny_model_dir)
    assert all(torch.equal(saved[k], base[k]) for k in base)
    assert "**Warning:** no alpha kept every retain metric" in result.report
