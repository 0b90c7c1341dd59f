"""The promotion rule: which reference the metric must beat, and the threshold."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, parse_config
from trainer.export import decide_promotion

METRIC = "dev/spearman"


def config(tmp_path, **promote):
    (tmp_path / "t.jsonl").write_text('{"anchor": "a", "positive": "b"}\n')
    return parse_config(
        {
            "base_model": "minilm",
            "train": [{"path": "t.jsonl"}],
            "eval": [{"path": "t.jsonl", "name": "dev"}],
            "output": {"name": "m", "promote": {"metric": METRIC, **promote}},
        },
        tmp_path,
    )


def test_base_reference_needs_an_improvement_above_the_margin(tmp_path):
    spec = config(tmp_path, min_improvement=0.01)
    assert decide_promotion(spec, {METRIC: 0.80}, {METRIC: 0.82}).promoted
    kept = decide_promotion(spec, {METRIC: 0.80}, {METRIC: 0.805})
    assert not kept.promoted and "did not improve over the base model" in kept.reason


def test_current_holder_is_the_reference_when_asked(tmp_path):
    spec = config(tmp_path, compare_to="current")
    # better than the base, worse than the version in production: stays out
    kept = decide_promotion(spec, {METRIC: 0.70}, {METRIC: 0.80}, current={METRIC: 0.85})
    assert not kept.promoted and kept.before == 0.85 and "current holder" in kept.reason
    assert decide_promotion(spec, {METRIC: 0.70}, {METRIC: 0.90}, current={METRIC: 0.85}).promoted


def test_no_current_holder_promotes_on_the_threshold_alone(tmp_path):
    spec = config(tmp_path, compare_to="current", min_value=0.5)
    first = decide_promotion(spec, {}, {METRIC: 0.6}, current=None)
    assert first.promoted and "no version holds m@production yet" in first.reason
    assert not decide_promotion(spec, {}, {METRIC: 0.4}, current=None).promoted


def test_threshold_and_improvement_must_both_hold(tmp_path):
    spec = config(tmp_path, min_value=0.9)
    low = decide_promotion(spec, {METRIC: 0.5}, {METRIC: 0.8})
    assert not low.promoted and "is below min_value 0.9" in low.reason
    assert decide_promotion(spec, {METRIC: 0.5}, {METRIC: 0.95}).promoted


def test_threshold_only(tmp_path):
    spec = config(tmp_path, compare_to="none", min_value=0.7)
    assert decide_promotion(spec, {METRIC: 0.99}, {METRIC: 0.71}).promoted  # worse than base, still promoted


def test_unmeasured_metric_never_promotes(tmp_path):
    outcome = decide_promotion(config(tmp_path), {METRIC: 0.5}, {"other": 0.9})
    assert not outcome.promoted and "not measured" in outcome.reason


def test_threshold_only_without_a_threshold_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="needs output.promote.min_value"):
        config(tmp_path, compare_to="none")
