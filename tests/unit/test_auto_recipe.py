"""`epochs: auto` / `learning_rate: auto` / `eval_every`: the pure recipe, its config checks, and the
best-evaluation bookkeeping (curve, kept weights, checkpoint round trip) without training."""

from __future__ import annotations

import pytest
import torch

from trainer.auto_recipe import (
    MAX_AUTO_LEARNING_RATE,
    MAX_EPOCHS,
    MIN_EPOCHS,
    auto_epochs,
    auto_learning_rate,
    resolve_recipe,
)
from trainer.best import BestTracker, evaluation_due, format_curve, lower_is_better
from trainer.config import ConfigError, parse_config

GOOD = {
    "base_model": "minilm",
    "train": [{"path": "train.jsonl"}],
    "eval": [{"path": "dev.jsonl", "name": "dev"}],
    "output": {"name": "tuned"},
}


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    (tmp_path / "dev.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    return tmp_path


# ---------------------------------------------------------------------------------------- recipe


def test_auto_epochs_fall_as_the_data_grows_within_bounds():
    sizes = [1, 10, 100, 2_500, 3_000, 5_749, 9_999, 10_000, 50_000, 10**9]
    epochs = [auto_epochs(n) for n in sizes]
    assert all(a >= b for a, b in zip(epochs, epochs[1:])), epochs
    assert epochs[0] == MAX_EPOCHS and epochs[-1] == MIN_EPOCHS
    assert auto_epochs(5_749) == 2  # STS-B train: two passes
    assert auto_epochs(10_000) == 1 and auto_epochs(9_999) == 2


def test_auto_epochs_needs_rows():
    with pytest.raises(ValueError, match="at least one training row"):
        auto_epochs(0)


def test_auto_learning_rate_scales_with_contrastive_batch_and_model_size():
    assert auto_learning_rate("cosine", 16) == pytest.approx(2e-5)
    assert auto_learning_rate("infonce", 64) == pytest.approx(2e-5)
    assert auto_learning_rate("infonce", 256) == pytest.approx(4e-5)  # sqrt(256 / 64) = 2
    assert auto_learning_rate("cosent", 256) == pytest.approx(2e-5)  # graded losses are not scaled
    assert auto_learning_rate("infonce", 64, parameters=335_000_000) == pytest.approx(1e-5)
    assert auto_learning_rate("infonce", 65_536) == MAX_AUTO_LEARNING_RATE
    rates = [auto_learning_rate("infonce", b) for b in (8, 64, 128, 512, 4096, 65_536)]
    assert all(a <= b for a, b in zip(rates, rates[1:]))


def test_auto_learning_rate_refuses_nonsense():
    with pytest.raises(ValueError, match="positive batch_size"):
        auto_learning_rate("infonce", 0)
    with pytest.raises(ValueError, match="parameter count"):
        auto_learning_rate("infonce", 8, parameters=-1)


def test_numbers_pass_through_and_auto_is_recorded_with_reasons():
    fixed = resolve_recipe(
        epochs=1.5, learning_rate=3e-5, eval_every=100, rows=5_749, loss="cosine", batch_size=16, has_eval=True
    )
    assert (fixed.epochs, fixed.learning_rate, fixed.eval_every, fixed.chosen) == (1.5, 3e-5, 100, ())
    auto = resolve_recipe(
        epochs="auto", learning_rate="auto", eval_every="auto", rows=5_749, loss="cosine", batch_size=16, has_eval=True
    )
    assert (auto.epochs, auto.learning_rate, auto.eval_every) == (2, 2e-5, "epoch")
    assert auto.chosen == ("epochs", "learning_rate", "eval_every") and len(auto.reasons) == 3
    assert "5749 training rows" in auto.reasons[0]
    assert auto.as_dict()["chosen"] == ["epochs", "learning_rate", "eval_every"]
    without_eval = resolve_recipe(
        epochs=1, learning_rate=2e-5, eval_every="auto", rows=10, loss="infonce", batch_size=8, has_eval=False
    )
    assert without_eval.eval_every is None
    never = resolve_recipe(
        epochs=1, learning_rate=2e-5, eval_every="none", rows=10, loss="infonce", batch_size=8, has_eval=True
    )
    assert never.eval_every is None and never.chosen == ()
    with pytest.raises(ValueError, match="eval_every must be"):
        resolve_recipe(epochs=1, learning_rate=1e-5, eval_every=0, rows=1, loss="cosine", batch_size=1, has_eval=True)


# ---------------------------------------------------------------------------------------- config


def test_config_accepts_auto_and_keeps_numbers(folder):
    config = parse_config({**GOOD, "epochs": "auto", "learning_rate": "auto", "eval_every": 50}, folder)
    assert (config.epochs, config.learning_rate, config.eval_every) == ("auto", "auto", 50)
    plain = parse_config(GOOD, folder)
    assert (plain.epochs, plain.learning_rate, plain.eval_every, plain.best_metric) == (1.0, 2e-5, "auto", None)
    assert parse_config({**GOOD, "epochs": 3}, folder).epochs == 3.0


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"epochs": "lots"}, "epochs"),
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": "fast"}, "learning_rate"),
        ({"learning_rate": 2}, "learning_rate"),
        ({"eval_every": 0}, "eval_every"),
        ({"eval_every": "sometimes"}, "eval_every"),
        ({"eval": [], "eval_every": "epoch"}, "eval_every epoch needs an evaluation set"),
        ({"eval": [], "best_metric": "dev/spearman"}, "best_metric needs an evaluation set"),
        ({"eval_every": "none", "best_metric": "dev/spearman"}, "remove it or set eval_every"),
        ({"best_metric": "test/spearman"}, "must start with an eval set's name"),
    ],
)
def test_config_problems_name_the_field(folder, overrides, words):
    with pytest.raises(ConfigError) as error:
        parse_config({**GOOD, **overrides}, folder)
    assert any(words in problem for problem in error.value.problems), error.value.problems


# ---------------------------------------------------------------------------------------- best


def test_evaluation_is_due_at_epoch_ends_every_n_steps_and_at_the_last_step():
    assert [s for s in range(1, 11) if evaluation_due("epoch", s, s / 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if evaluation_due(3, s, None, 10)] == [3, 6, 9, 10]
    assert not any(evaluation_due(None, s, s / 4, 10) for s in range(1, 11))


def test_main_metrics_and_their_direction():
    from trainer.evaluation import EvalSet
    from trainer.interpolate import main_metric

    graded = EvalSet(name="sts-dev", kind="graded", a_inputs=["a"], b_inputs=["b"], scores=[1.0])
    same = EvalSet(name="dev", kind="paired", a_inputs=["q"], b_inputs=["p"])
    cross = EvalSet(name="shapes", kind="paired", a_inputs=["q"], b_inputs=["p"], a_modality="text", b_modality="image")
    assert main_metric(graded) == "sts-dev/spearman"
    assert main_metric(same) == "dev/a_to_b/mrr@10"
    assert main_metric(cross) == "shapes/text_to_image/mrr@10"
    assert lower_is_better("dev/alignment") and lower_is_better("dev/uniformity_text")
    assert not lower_is_better("dev/spearman")


def _tracker(values, metric="dev/spearman"):
    """A BestTracker whose evaluations return `values` in turn and whose weights are a counter."""
    calls = iter(values)
    weights = {"w": torch.zeros(2)}

    def evaluate():
        value = next(calls)
        weights["w"] = torch.full((2,), value)
        return {metric: value, "dev/pearson": value / 2}

    return BestTracker(metric, evaluate, lambda: {"model": {"w": weights["w"].clone()}, "loss": {}})


def test_the_best_point_is_kept_and_restored_not_the_last():
    events = []
    best = _tracker([80.0, 85.0, 83.0])
    best.progress._listener = events.append
    for step in (10, 20, 30):
        best.evaluate(step, step / 10)
    assert [p["best"] for p in best.curve] == [False, True, False]
    assert best.best is not None and best.best["step"] == 20
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(2))
    assert best.restore(model)["step"] == 20
    assert torch.equal(model.w, torch.full((2,), 85.0))
    assert [e["best"] for e in events] == [True, True, False] and events[0]["when"] == "during"
    table = format_curve(best.curve, "dev/spearman")
    assert "| 20 | 2 | 85.0000 | best |" in table and "| 30 | 3 | 83.0000 |  |" in table


def test_lower_is_better_metrics_pick_the_smallest():
    best = _tracker([0.9, 0.5, 0.7], metric="dev/alignment")
    for step in (1, 2, 3):
        best.evaluate(step, None)
    assert best.best is not None and best.best["step"] == 2


def test_an_unmeasured_best_metric_names_what_was_measured():
    best = BestTracker("dev/nope", lambda: {"dev/spearman": 1.0}, lambda: {"model": {}, "loss": {}})
    with pytest.raises(ValueError, match="measured: dev/spearman"):
        best.evaluate(1, None)


def test_the_curve_and_best_weights_survive_a_checkpoint_round_trip(tmp_path):
    best = _tracker([80.0, 85.0, 83.0])
    for step in (10, 20, 30):
        best.evaluate(step, None)
    best.save(tmp_path)
    resumed = _tracker([84.0])
    resumed.load(tmp_path)
    assert resumed.curve == best.curve and resumed.best is not None and resumed.best["step"] == 20
    resumed.evaluate(40, None)  # 84 < 85: the best from before the resume stays
    model = torch.nn.Module()
    model.register_buffer("w", torch.zeros(2))
    assert resumed.restore(model)["step"] == 20 and torch.equal(model.w, torch.full((2,), 85.0))
    other_metric = _tracker([1.0], metric="dev/pearson")
    other_metric.load(tmp_path)  # a curve on another metric is not continued
    assert other_metric.curve == [] and other_metric.best_state is None


def test_a_service_allowing_fewer_epochs_than_auto_may_choose_refuses_auto(folder):
    from service.routes.jobs import limit_problems
    from service.settings import Settings

    config = parse_config({**GOOD, "epochs": "auto"}, folder)
    assert limit_problems(config, Settings(data_dir=folder, job_max_epochs=MAX_EPOCHS)) == []
    problems = limit_problems(config, Settings(data_dir=folder, job_max_epochs=2))
    assert problems == [
        f"epochs (auto chooses up to): {MAX_EPOCHS} is more than this service allows (2, DUET_JOB_MAX_EPOCHS)"
    ]


def test_the_best_metric_defaults_to_promotion_then_the_first_sets_main_metric(folder):
    from trainer.evaluation import EvalSet
    from trainer.run import best_metric

    sets = [EvalSet("dev", "paired", ["a"], ["b"]), EvalSet("sts", "graded", ["a"], ["b"], scores=[1.0])]
    measured = {"dev/a_to_b/mrr@10": 0.5, "dev/b_to_a/mrr@10": 0.4, "sts/spearman": 80.0}
    assert best_metric(parse_config(GOOD, folder), sets, measured) == "dev/a_to_b/mrr@10"
    promoted = {**GOOD, "output": {"name": "tuned", "promote": {"metric": "dev/b_to_a/mrr@10"}}}
    assert best_metric(parse_config(promoted, folder), sets, measured) == "dev/b_to_a/mrr@10"
    unmeasured_promotion = {**GOOD, "output": {"name": "tuned", "promote": {"metric": "dev/new-old/spearman"}}}
    assert best_metric(parse_config(unmeasured_promotion, folder), sets, measured) == "dev/a_to_b/mrr@10"
    chosen = parse_config({**GOOD, "best_metric": "dev/b_to_a/mrr@10"}, folder)
    assert best_metric(chosen, sets, measured) == "dev/b_to_a/mrr@10"
    with pytest.raises(ConfigError, match="best_metric 'dev/recall@3' is not measured; use one of: dev/a_to_b"):
        best_metric(parse_config({**GOOD, "best_metric": "dev/recall@3"}, folder), sets, measured)
