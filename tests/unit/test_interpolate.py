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
