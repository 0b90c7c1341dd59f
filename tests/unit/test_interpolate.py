"""Blend math of trainer/interpolate.py on hand-made state dicts."""

import pytest
import torch

from trainer.interpolate import blend_state_dicts


def test_blend_math_and_kept_keys() -> None:
    base = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor([1]), "s": torch.zeros(3)}
    tuned = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor([5]), "s": torch.ones(2), "head": torch.ones(1)}
    out = blend_state_dicts(base, tuned, 0.25)
    assert torch.equal(out.state["w"], torch.tensor([1.0, 3.0]))
    assert out.kept_from_finetuned == ["n", "s", "head"]
    assert torch.equal(out.state["n"], torch.tensor([5]))


def test_alpha_ends_are_exact() -> None:
    base = {"w": torch.randn(4, 4)}
    tuned = {"w": torch.randn(4, 4)}
    assert torch.equal(blend_state_dicts(base, tuned, 0.0).state["w"], base["w"])
    assert torch.equal(blend_state_dicts(base, tuned, 1.0).state["w"], tuned["w"])


def test_alpha_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        blend_state_dicts({}, {}, 1.5)


def test_choose_alpha_on_faked_scores() -> None:
    from trainer.interpolate import AlphaTrial, choose_alpha

    alphas = [i / 10 for i in range(11)]
    trials = [AlphaTrial(a, target=80 + 10 * a, retain={"r": 85 - 4 * a}) for a in alphas]
    assert choose_alpha(trials, {"r": 85.0}, 1.0) == (0.2, True)
    bad = [AlphaTrial(a, 80 + a, {"r": 70.0}) for a in alphas[1:]]
    assert choose_alpha(bad, {"r": 85.0}, 1.0) == (0.0, False)


def _spec(**fields):
    from trainer.config import InterpolateSpec

    return InterpolateSpec(**fields)


def _fake_measure(calls):
    """Target rises with alpha, the retain metric falls 2 points per 0.5 of alpha."""
    from registry.manifest import AlphaScore

    def measure(alpha: float) -> AlphaScore:
        calls.append(alpha)
        return AlphaScore(alpha=alpha, target=70 + 10 * alpha, retain={"general/spearman": 80 - 4 * alpha})

    return measure


def test_sweep_auto_measures_the_base_once_and_picks_within_the_margin() -> None:
    from trainer.interpolate import format_sweep, sweep

    calls: list[float] = []
    spec = _spec(alpha="auto", alphas=[1.0, 0.25, 0.5], retain=["general"], max_retention_drop=1.0)
    record = sweep(spec, _fake_measure(calls), metric="dev/spearman", can_measure=True)
    assert calls == [0.0, 0.25, 0.5, 1.0]  # the base first (not a candidate here), then sorted, each once
    assert [t.alpha for t in record.trials] == [0.25, 0.5, 1.0]
    assert record.alpha == 0.25 and record.qualified and record.mode == "auto"  # 0.5 drops 2 > 1 point
    assert record.base is not None and record.base.retain == {"general/spearman": 80.0}
    table = format_sweep(record)
    assert "| 0 (base) | 70.0000 (+0.0000) | 80.0000 (+0.0000) |  |" in table
    assert "| 0.25 | 72.5000 (+2.5000) | 79.0000 (-1.0000) | **yes** |" in table
    assert "| 1 | 80.0000 (+10.0000) | 76.0000 (-4.0000) |  |" in table
    assert "Saved weights: alpha 0.25 (chosen)" in table


def test_sweep_with_no_qualifying_alpha_keeps_the_base_and_says_so() -> None:
    from trainer.interpolate import format_sweep, sweep

    spec = _spec(alpha="auto", alphas=[0.5, 1.0], retain=["general"], max_retention_drop=0.1)
    record = sweep(spec, _fake_measure([]), metric="dev/spearman", can_measure=True)
    assert (record.alpha, record.qualified) == (0.0, False)
    table = format_sweep(record)
    assert "| 0 (base) | 70.0000 (+0.0000) | 80.0000 (+0.0000) | **yes** |" in table
    assert "**Warning:** no alpha kept every retain metric within 0.1" in table


def test_sweep_fixed_alpha_and_nothing_to_measure() -> None:
    from trainer.interpolate import format_sweep, sweep

    calls: list[float] = []
    record = sweep(_spec(alpha=0.4), _fake_measure(calls), metric=None, can_measure=False)
    assert calls == [] and record.alpha == 0.4 and record.base is None and record.trials == []
    assert "nothing measured" in format_sweep(record)
    fixed = sweep(_spec(alpha=0.4), _fake_measure(calls), metric="dev/spearman", can_measure=True)
    assert calls == [0.0, 0.4] and fixed.alpha == 0.4 and fixed.qualified and fixed.mode == "fixed"


def test_target_metric_defaults_and_unknown_keys() -> None:
    from trainer.evaluation import EvalSet
    from trainer.interpolate import main_metric, target_metric

    graded = EvalSet(name="sts", kind="graded", a_inputs=["a"], b_inputs=["b"], scores=[1.0])
    pairs = EvalSet(name="qa", kind="paired", a_inputs=["q"], b_inputs=["p"])
    assert main_metric(graded) == "sts/spearman" and main_metric(pairs) == "qa/a_to_b/mrr@10"
    spec = _spec(alpha="auto", retain=["qa"])
    assert target_metric(spec, None, [graded, pairs]) == "sts/spearman"
    assert target_metric(spec, "qa/b_to_a/ndcg@10", [graded, pairs]) == "qa/b_to_a/ndcg@10"
    assert target_metric(spec, "qa/alignment", [graded, pairs]) == "sts/spearman"  # not a target: default
    with pytest.raises(ValueError, match="sts/spearman, sts/pearson"):
        target_metric(_spec(alpha="auto", metric="sts/recall@1"), None, [graded])
