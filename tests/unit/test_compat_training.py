"""Backward-compatible training end to end on a tiny BERT: v2 trained `compatible_with` v1 is
registered with the claim, its map file loads, and the cross-model numbers are in the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from encoders.encoder import describe, load_sentence_transformer
from registry.compat import load_map, map_queries, query_compat
from registry.manifest import Lineage, Manifest
from tests.helpers import embedded_registry
from trainer.config import ConfigError, parse_config
from trainer.run import run_training

WORDS = [
    *("red", "green", "blue", "small", "large", "round", "square"),
    *("bright", "dark", "heavy", "light", "quick", "slow"),
]


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    """A registry whose `tiny` v1 is the tiny BERT, and pair data to train and evaluate on."""
    registry = embedded_registry(tmp_path / "registry")
    manifest = Manifest(
        contract=describe(load_sentence_transformer(tiny_model_dir)), trained=False, lineage=Lineage(base_model="t")
    )
    v1 = registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
    rng = np.random.default_rng(0)
    rows = []
    for i in range(48):
        words = list(rng.choice(WORDS, size=3, replace=False))
        rows.append({"anchor": f"{' '.join(words)} {i}", "positive": f"item {i}: {' and '.join(words)}"})
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return registry, v1, tmp_path


def config(folder, **compat):
    return parse_config(
        {
            "base_model": "tiny/1",
            "train": [{"path": "pairs.jsonl"}],
            "eval": [{"path": "pairs.jsonl", "name": "dev", "limit": 24}],
            "loss": {"temperature": 0.1},
            "batch_size": 8,
            "max_steps": 6,
            "learning_rate": 1e-3,
            "checkpoint_every_steps": 3,
            "output": {"name": "tiny"},
            "compatible_with": compat or "tiny@production",
        },
        folder,
    )


def test_v2_is_registered_compatible_with_v1_and_its_map_loads(setup):
    registry, v1, folder = setup
    result = run_training(
        config(folder, model="tiny@production", map=True), base_dir=folder, run_dir=folder / "run", registry=registry
    )
    assert result.version is not None and result.version.version == 2
    [claim] = result.version.manifest.compatible_with
    assert claim.ref == "tiny/1" and claim.weights_sha256 == v1.manifest.lineage.weights_sha256
    assert claim.map_file == "compat_map.npy"
    mapping = load_map(result.version.path, claim)
    assert mapping is not None and mapping.shape == (32, 32) and mapping.dtype == np.float32
    assert not np.allclose(mapping, np.eye(32))  # trained away from its identity start
    assert map_queries(np.ones((2, 32), np.float32), mapping).shape == (2, 32)
    for tag in ("new-old", "old-old", "new-new"):
        assert f"dev/{tag}/a_to_b/recall@1" in claim.metrics
        assert f"dev/{tag}/a_to_b/recall@1" in result.after and f"dev/{tag}/a_to_b/recall@1" in result.before
    # v1 against itself before training: the base is v1, so new/old is old/old exactly
    assert result.before["dev/new-old/a_to_b/mrr@10"] == pytest.approx(result.before["dev/old-old/a_to_b/mrr@10"])
    assert "dev/new-old/a_to_b/recall@1" in result.report
    assert query_compat("tiny/2", result.version.manifest, "tiny/1", v1.manifest.lineage.weights_sha256).allowed
    assert json.loads((folder / "run" / "compat.json").read_text())["ref"] == "tiny/1"


def test_a_path_is_measured_but_not_claimed(setup, tiny_model_dir):
    registry, _, folder = setup
    result = run_training(
        config(folder, model=str(tiny_model_dir)), base_dir=folder, run_dir=folder / "run", registry=registry
    )
    assert result.version is not None and result.version.manifest.compatible_with == []
    assert "dev/new-old/a_to_b/recall@1" in result.after
    assert not (result.version.path / "compat_map.npy").exists()


def test_a_dimension_mismatch_without_map_says_to_set_it(setup, tmp_path, minilm_path):
    registry, _, folder = setup
    with pytest.raises(ConfigError, match="set compatible_with.map: true"):
        run_training(config(folder, model=str(minilm_path)), base_dir=folder, run_dir=folder / "run", registry=registry)


def test_graded_data_trains_compatible_with_its_own_loss(setup):
    registry, _, folder = setup
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    graded = [{**row, "score": (i % 6) / 5} for i, row in enumerate(rows)]
    (folder / "graded.jsonl").write_text("\n".join(json.dumps(r) for r in graded))
    body = config(folder).model_dump(mode="json", exclude_defaults=True)
    data = {"path": "graded.jsonl", "kind": "graded", "name": "graded"}
    body.update(train=[data], eval=[{**data, "name": "dev"}], loss={"name": "cosine"})
    result = run_training(parse_config(body, folder), base_dir=folder, run_dir=folder / "run", registry=registry)
    assert result.version is not None and result.version.manifest.compatible_with[0].ref == "tiny/1"
    assert {"dev/new-old/spearman", "dev/old-old/spearman", "dev/new-new/spearman"} <= set(result.after)
