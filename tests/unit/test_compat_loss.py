"""Backward-compatible training's parts without a model: the cross-model InfoNCE against a hand
computation, the loss wrapper's bookkeeping (row ids, graded labels, weight 0), the old model's
cache (computed once, read back on resume), the map's start, and the config's checks."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from registry.manifest import Lineage
from trainer.compat import (
    CompatLoss,
    OldCache,
    OldModel,
    build_old_cache,
    check_dimensions,
    cross_model_info_nce,
    initial_map,
    pin_old_model,
    with_row_ids,
)
from trainer.config import CompatSpec, ConfigError, parse_config
from trainer.data import LoadedData


def test_cross_model_info_nce_hand_computed():
    new = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised inside: e1, e2
    old = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # (0.6, 0.8), e2
    scale = 10.0
    # row 0: logits 10 * (0.6, 0) -> target 0; row 1: 10 * (0.8, 1) -> target 1
    row0 = -6.0 + math.log(math.exp(6.0) + math.exp(0.0))
    row1 = -10.0 + math.log(math.exp(8.0) + math.exp(10.0))
    assert cross_model_info_nce(new, old, scale).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


class _Main(nn.Module):
    """A stand-in main loss: records what it was given and returns the mean of its first column
    times the labels' sum (so a test can compute what it returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Linear(2, 2)
        self.seen: list[torch.Tensor | None] = []

    def compute_loss_from_embeddings(self, embeddings, labels=None):
        self.seen.append(labels)
        return embeddings[0].mean() * (1.0 if labels is None else labels.sum()) + embeddings[1].sum()


def _cache(graded: bool) -> OldCache:
    anchors = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    positives = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, -1.0]], np.float32)
    labels = np.array([0.2, 0.9, 0.4] if graded else [np.nan] * 3, np.float32)
    return OldCache(anchors, positives, np.full(3, graded), labels, {"d": 0})


NEW_A = torch.tensor([[1.0, 0.2], [0.3, 1.0]])
NEW_P = torch.tensor([[0.1, 1.0], [1.0, 0.0]])
ROWS = torch.tensor([2, 0])


def test_pairs_contrast_each_new_side_with_the_old_other_side_by_row_id():
    loss = CompatLoss(_Main(), _cache(graded=False), weight=2.0, temperature=0.5)
    old_a, old_p = torch.from_numpy(_cache(False).anchors[[2, 0]]), torch.from_numpy(_cache(False).positives[[2, 0]])
    expected = 2.0 * (cross_model_info_nce(NEW_A, old_p, 2.0) + cross_model_info_nce(NEW_P, old_a, 2.0)) / 2
    assert loss.compat_term(NEW_A, NEW_P, ROWS).item() == pytest.approx(expected.item(), rel=1e-6)


def test_graded_pairs_score_new_against_old_with_the_main_loss_and_the_rows_scores():
    main = _Main()
    loss = CompatLoss(main, _cache(graded=True), weight=2.0, temperature=0.5)
    old_a, old_p = torch.from_numpy(_cache(True).anchors[[2, 0]]), torch.from_numpy(_cache(True).positives[[2, 0]])
    scores = 0.4 + 0.2
    expected = 2.0 * ((NEW_A.mean() * scores + old_p.sum()) + (NEW_P.mean() * scores + old_a.sum())) / 2
    assert loss.compat_term(NEW_A, NEW_P, ROWS).item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(torch.allclose(seen, torch.tensor([0.4, 0.2])) for seen in main.seen)


def test_a_batch_mixing_graded_and_paired_rows_is_refused():
    cache = _cache(graded=True)
    cache.graded[0] = False
    with pytest.raises(ValueError, match="mixes graded and paired rows"):
        CompatLoss(_Main(), cache, weight=1.0, temperature=0.5).compat_term(NEW_A, NEW_P, ROWS)


def test_forward_passes_graded_scores_not_row_ids_to_the_main_loss(monkeypatch):
    main = _Main()
    loss = CompatLoss(main, _cache(graded=True), weight=1.0, temperature=0.5)
    embeddings = [torch.randn(2, 2), torch.randn(2, 2)]
    monkeypatch.setattr("trainer.compat.embed_columns", lambda model, features: embeddings)
    loss([{}, {}], torch.tensor([1, 2]))
    assert torch.allclose(main.seen[-1], torch.tensor([0.9, 0.4]))
    loss_pairs = CompatLoss(main, _cache(graded=False), weight=1.0, temperature=0.5)
    loss_pairs([{}, {}], torch.tensor([1, 2]))
    assert main.seen[-1] is None  # pairs have no labels of their own
    with pytest.raises(ValueError, match="row ids"):
        loss([{}, {}], None)


def test_weight_zero_trains_the_map_alone():
    main = _Main()
    loss = CompatLoss(main, _cache(False), weight=0.0, temperature=0.5, map_init=np.eye(2, dtype=np.float32))
    new_a = torch.randn(2, 2, requires_grad=True)
    new_p = torch.randn(2, 2, requires_grad=True)
    loss.compat_term(new_a, new_p, torch.tensor([0, 1])).backward()
    assert new_a.grad is None and new_p.grad is None
    assert loss.map_weight is not None and loss.map_weight.grad is not None
    assert "map_weight" in loss._no_weight_decay


def _data(rows: list[dict], kind: str = "pairs", name: str = "d") -> LoadedData:
    columns = ["anchor", "positive"] + (["score"] if kind == "graded" else [])
    modalities = {"anchor": "text", "positive": "text"}
    return LoadedData(name=name, kind=kind, columns=columns, rows=rows, modalities=modalities, sha256="abc")


class _CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0
        self.texts = 0

    def __call__(self, inputs, modality):
        self.calls += 1
        self.texts += len(inputs)
        return np.array([[len(t), t.count("a"), 1.0] for t in inputs], np.float32)


OLD = OldModel(requested="m@production", ref="m/1", source="/m", weights_sha256="f" * 64, in_registry=True)


def test_the_old_embeddings_are_computed_once_and_read_back_on_resume(tmp_path):
    data = [
        _data([{"anchor": "a", "positive": "bb"}, {"anchor": "ccc", "positive": "aa"}]),
        _data([{"anchor": "x", "positive": "y", "score": 0.5}], kind="graded", name="g"),
    ]
    encode = _CountingEncoder()
    cache = build_old_cache(data, OLD, encode, tmp_path / "compat")
    assert encode.calls == 4 and encode.texts == 6  # each column of each set, once
    assert cache.offsets == {"d": 0, "g": 2} and cache.anchors.shape == (3, 3)
    assert cache.graded.tolist() == [False, False, True]
    np.testing.assert_array_equal(cache.anchors[1], [3, 0, 1])
    assert np.isnan(cache.labels[:2]).all() and cache.labels[2] == pytest.approx(0.5)

    again = _CountingEncoder()  # a resumed run: same rows, same old model
    resumed = build_old_cache(data, OLD, again, tmp_path / "compat")
    assert again.calls == 0
    np.testing.assert_array_equal(resumed.positives, cache.positives)

    changed = [_data([{"anchor": "a", "positive": "bb"}, {"anchor": "ccc", "positive": "changed"}]), data[1]]
    build_old_cache(changed, OLD, again, tmp_path / "compat")
    assert again.calls == 2  # only the set whose rows changed is embedded again
    other_model = OldModel(**{**OLD.__dict__, "weights_sha256": "e" * 64})
    build_old_cache(data, other_model, again, tmp_path / "compat")
    assert again.calls == 6


def test_rows_carry_their_global_id_as_the_label_and_graded_scores_leave_the_dataset():
    data = _data(
        [{"anchor": "x", "positive": "y", "score": 0.5}, {"anchor": "z", "positive": "w", "score": 0.1}], "graded"
    )
    dataset = with_row_ids(data, offset=7)
    assert dataset.column_names == ["anchor", "positive", "label"]
    assert dataset["label"] == [7, 8]


def test_the_map_starts_at_identity_or_the_least_squares_fit():
    rng = np.random.default_rng(0)
    true_map = rng.normal(size=(4, 3)).astype(np.float32)
    new = rng.normal(size=(50, 4)).astype(np.float32)
    cache = OldCache(new @ true_map, new @ true_map, np.zeros(50, bool), np.full(50, np.nan), {"d": 0})
    np.testing.assert_allclose(initial_map(4, cache, new), true_map, atol=1e-4)
    square = OldCache(new, new, np.zeros(50, bool), np.full(50, np.nan), {"d": 0})
    np.testing.assert_array_equal(initial_map(4, square), np.eye(4))


def test_dimensions_must_be_known_and_equal_unless_mapped():
    spec = CompatSpec(model="m")
    check_dimensions(spec, OLD, 384, 384)
    with pytest.raises(ConfigError, match="384 dimensions, the new model in 32; set compatible_with.map: true"):
        check_dimensions(spec, OLD, 384, 32)
    check_dimensions(CompatSpec(model="m", map=True), OLD, 384, 32)
    with pytest.raises(ConfigError, match="dimension is unknown"):
        check_dimensions(spec, OLD, None, 32)


def test_the_old_model_is_pinned_at_the_first_start(tmp_path):
    manifest = SimpleNamespace(lineage=Lineage(weights_sha256="a"))  # what pin_old_model reads of a Manifest
    asked: list[str] = []

    def resolve(ref):
        asked.append(ref)
        return f"/registry/{ref}", "m/1" if ref == "m@production" else ref, manifest

    spec = CompatSpec(model="m@production")
    first = pin_old_model(spec, tmp_path, resolve)
    assert first.ref == "m/1" and first.weights_sha256 == "a" and first.in_registry
    assert json.loads((tmp_path / "compat.json").read_text())["ref"] == "m/1"
    again = pin_old_model(spec, tmp_path, resolve)  # resumed after the alias moved: still m/1
    assert asked == ["m@production", "m/1"] and again.ref == "m/1"
    manifest.lineage.weights_sha256 = "b"
    with pytest.raises(ConfigError, match="weights changed since this run started"):
        pin_old_model(spec, tmp_path, resolve)


def _config(tmp_path, compat, **extra):
    (tmp_path / "t.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    body = {"base_model": "m", "train": [{"path": "t.jsonl"}], "output": {"name": "m"}, "compatible_with": compat}
    return parse_config({**body, **extra}, tmp_path)


def test_a_bare_reference_is_shorthand_for_the_model(tmp_path):
    config = _config(tmp_path, "shapes@production")
    assert config.compatible_with == CompatSpec(model="shapes@production", weight=1.0, map=False)
    assert _config(tmp_path, None).compatible_with is None
    full = _config(tmp_path, {"model": "shapes/1", "weight": 0.5, "map": True, "temperature": 0.02})
    assert full.compatible_with is not None and full.compatible_with.temperature == 0.02


@pytest.mark.parametrize(
    ("compat", "extra", "words"),
    [
        ({"model": "m/1", "weight": -1}, {}, "compatible_with.weight: Input should be greater than or equal to 0"),
        ({"model": "m/1", "weight": 0}, {}, "weight 0 without map: true trains nothing"),
        ({"model": " "}, {}, "compatible_with.model is empty"),
        ("m/1", {"loss": {"cached": True}}, "turn off loss.cached"),
        ("m/1", {"loss": {"name": "moco"}}, "instead of moco"),
        ({"model": "m/1", "mapp": True}, {}, "compatible_with.mapp: Extra inputs are not permitted"),
    ],
)
def test_bad_compat_settings_say_what_to_change(tmp_path, compat, extra, words):
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, compat, **extra)
    assert any(words in problem for problem in caught.value.problems), caught.value.problems
