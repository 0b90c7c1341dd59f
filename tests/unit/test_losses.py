"""Our contrastive losses: hand-computed values, temperature handling, GradCache equivalence and
a few real SentenceTransformerTrainer steps per loss on a tiny BERT built from a config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.losses import (
    CachedSymmetricInfoNCELoss,
    DebiasedContrastiveLoss,
    Gathered,
    SigmoidLoss,
    SymmetricInfoNCELoss,
    debiased_contrastive,
    matryoshka,
    no_weight_decay_parameter_names,
    sigmoid_pairwise_loss,
    symmetric_info_nce,
)

T = torch.tensor


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# Tiny fixed embeddings, D=2, B=2. Anchors are deliberately not unit length (the losses normalise):
#   a1 = (3, 0) -> (1, 0)      a2 = (0, 2) -> (0, 1)
#   p1 = (0.6, 0.8)            p2 = (-0.6, 0.8)
# cosine matrix S[i][j] = cos(a_i, p_j):
#   S = [[ 0.6, -0.6],
#        [ 0.8,  0.8]]
A = f64([[3.0, 0.0], [0.0, 2.0]])
P = f64([[0.6, 0.8], [-0.6, 0.8]])
# Hard negatives (one column): n1 = (0, 1), n2 = (1, 0);  cos(a1,n1)=0, cos(a1,n2)=1, cos(a2,n1)=1, cos(a2,n2)=0
N1 = f64([[0.0, 1.0], [1.0, 0.0]])


def log1pexp(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------
# Hand-computed values
# ------------------------------------------------------------------------------------------


def test_info_nce_hand_computed_pairs():
    # scale 10 (temperature 0.1)
    # anchor->positives logits 10*S: row 1 [6, -6] label 0 -> -6 + log(e^6 + e^-6) = log(1 + e^-12)
    #                                row 2 [8,  8] label 1 -> log 2
    # positive->anchor logits 10*S^T: p1 [6, 8] label 0 -> log(1 + e^2)
    #                                 p2 [-6, 8] label 1 -> log(1 + e^-14)
    a2c = (log1pexp(-12) + math.log(2)) / 2
    p2a = (log1pexp(2) + log1pexp(-14)) / 2
    scale = torch.tensor(10.0, dtype=torch.float64)
    assert symmetric_info_nce(A, P, [], scale).item() == pytest.approx((a2c + p2a) / 2, rel=1e-12)
    assert symmetric_info_nce(A, P, [], scale, symmetric=False).item() == pytest.approx(a2c, rel=1e-12)


def test_info_nce_hand_computed_with_hard_negative():
    # Columns [p1, p2, n1, n2]; anchor rows, scale 10:
    #   a1: [6, -6, 0, 10] label 0 -> -6 + log(e^6 + e^-6 + e^0 + e^10)
    #   a2: [8,  8, 10, 0] label 1 -> -8 + log(2 e^8 + e^10 + e^0)
    # The positive->anchor direction does not see hard negatives: unchanged from the pair case.
    a2c = (
        -6 + math.log(math.exp(6) + math.exp(-6) + 1 + math.exp(10)) + -8 + math.log(2 * math.exp(8) + math.exp(10) + 1)
    ) / 2
    p2a = (log1pexp(2) + log1pexp(-14)) / 2
    scale = torch.tensor(10.0, dtype=torch.float64)
    assert symmetric_info_nce(A, P, [N1], scale).item() == pytest.approx((a2c + p2a) / 2, rel=1e-12)


def test_sigmoid_hand_computed():
    # scale t = 2, bias b = -1: logits 2*S - 1 = [[0.2, -2.2], [0.6, 0.6]], z = +1 on the diagonal, -1 off it.
    # -log sigmoid(z x) = log(1 + e^{-z x}):
    #   (1,1): log(1+e^-0.2)  (1,2): log(1+e^-2.2)  (2,1): log(1+e^0.6)  (2,2): log(1+e^-0.6)
    # summed over the 4 pairs, divided by B = 2.
    expected = (log1pexp(-0.2) + log1pexp(-2.2) + log1pexp(0.6) + log1pexp(-0.6)) / 2
    loss = sigmoid_pairwise_loss(A, P, [], T(2.0, dtype=torch.float64), T(-1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # A hard-negative column adds -1 pairs: logits 2*cos - 1 = a1.n1: -1, a2.n2: -1 ... (n1 for a1 is cos 0,
    # n2 for a1 is cos 1): rows a1: [0 -> -1, 1 -> 1]  a2: [1 -> 1, 0 -> -1], each with z = -1.
    extra = (log1pexp(-1) + log1pexp(1) + log1pexp(1) + log1pexp(-1)) / 2
    loss = sigmoid_pairwise_loss(A, P, [N1], T(2.0, dtype=torch.float64), T(-1.0, dtype=torch.float64))
    assert loss.item() == pytest.approx(expected + extra, rel=1e-12)


def test_debiased_hand_computed_with_and_without_clamp():
    # t = 0.5, tau+ = 0.1, B = 2 pairs, so N = 1 negative per anchor.
    # a1: pos = 0.6/0.5 = 1.2, neg = -0.6/0.5 = -1.2
    #     g = (e^-1.2 - 0.1 e^1.2) / 0.9 = (0.3012 - 0.3320) / 0.9 < 0  -> clamped to e^{-1/t} = e^-2
    #     loss = -log(e^1.2 / (e^1.2 + 1 * e^-2)) = log(1 + e^-3.2)
    # a2: pos = neg = 0.8/0.5 = 1.6
    #     g = (e^1.6 - 0.1 e^1.6) / 0.9 = e^1.6 (above the clamp)
    #     loss = log(1 + e^1.6 / e^1.6) = log 2
    assert math.exp(-1.2) - 0.1 * math.exp(1.2) < 0
    expected = (log1pexp(-3.2) + math.log(2)) / 2
    loss = debiased_contrastive(A, P, [], temperature=0.5, tau_plus=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_debiased_with_zero_tau_plus_is_one_directional_info_nce():
    gen = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    plain = symmetric_info_nce(a, p, [n], T(1 / 0.07, dtype=torch.float64), symmetric=False)
    debiased = debiased_contrastive(a, p, [n], temperature=0.07, tau_plus=0.0)
    assert debiased.item() == pytest.approx(plain.item(), rel=1e-10)


# ------------------------------------------------------------------------------------------
# Independent numpy references (loops over the formulas, float64) on random data, also split
# over "ranks" with explicit gathered columns.
# ------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_info_nce(a, p, negs, scale, symmetric):
    a, p, negs = _unit(a), _unit(p), [_unit(n) for n in negs]
    cands = [p[j] for j in range(len(p))] + [n[j] for n in negs for j in range(len(n))]
    total = 0.0
    for i in range(len(a)):
        logits = [scale * float(a[i] @ c) for c in cands]
        a2c = -logits[i] + math.log(sum(math.exp(x) for x in logits))
        if symmetric:
            logits = [scale * float(p[i] @ a[j]) for j in range(len(a))]
            p2a = -logits[i] + math.log(sum(math.exp(x) for x in logits))
            total += (a2c + p2a) / 2
        else:
            total += a2c
    return total / len(a)


def np_sigmoid(a, p, negs, scale, bias):
    a, p, negs = _unit(a), _unit(p), [_unit(n) for n in negs]
    cands = [p[j] for j in range(len(p))] + [n[j] for n in negs for j in range(len(n))]
    total = 0.0
    for i in range(len(a)):
        for j, c in enumerate(cands):
            z = 1.0 if j == i else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * float(a[i] @ c) + bias))))
    return total / len(a)


def np_debiased(a, p, negs, t, tau_plus):
    a, p, negs = _unit(a), _unit(p), [_unit(n) for n in negs]
    cands = [p[j] for j in range(len(p))] + [n[j] for n in negs for j in range(len(n))]
    total = 0.0
    for i in range(len(a)):
        pos = math.exp(float(a[i] @ p[i]) / t)
        neg = [math.exp(float(a[i] @ c) / t) for j, c in enumerate(cands) if j != i]
        n = len(neg)
        g = max((sum(neg) / n - tau_plus * pos) / (1 - tau_plus), math.exp(-1 / t))
        total += -math.log(pos / (pos + n * g))
    return total / len(a)


@pytest.fixture()
def random_batch():
    gen = torch.Generator().manual_seed(0)
    shape = (6, 3)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]  # a, p, n1, n2


@pytest.mark.parametrize("symmetric", [True, False])
def test_info_nce_matches_numpy_reference(random_batch, symmetric):
    a, p, n1, n2 = random_batch
    scale = 7.5
    expected = np_info_nce(a.numpy(), p.numpy(), [n1.numpy(), n2.numpy()], scale, symmetric)
    got = symmetric_info_nce(a, p, [n1, n2], T(scale, dtype=torch.float64), symmetric=symmetric)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_sigmoid_matches_numpy_reference(random_batch):
    a, p, n1, n2 = random_batch
    expected = np_sigmoid(a.numpy(), p.numpy(), [n1.numpy(), n2.numpy()], 10.0, -3.0)
    got = sigmoid_pairwise_loss(a, p, [n1, n2], T(10.0, dtype=torch.float64), T(-3.0, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("tau_plus,t", [(0.1, 0.5), (0.3, 0.2), (0.5, 1.0), (0.0, 0.1)])
def test_debiased_matches_numpy_reference(random_batch, tau_plus, t):
    a, p, n1, n2 = random_batch
    expected = np_debiased(a.numpy(), p.numpy(), [n1.numpy(), n2.numpy()], t, tau_plus)
    got = debiased_contrastive(a, p, [n1, n2], temperature=t, tau_plus=tau_plus)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_debiased_is_finite_at_small_temperature():
    gen = torch.Generator().manual_seed(1)
    a, p = (torch.randn(8, 4, generator=gen, requires_grad=True) for _ in range(2))
    loss = debiased_contrastive(a, p, [], temperature=0.005, tau_plus=0.2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(p.grad).all()


def _rank_split_losses(fn, local_columns, world_size, **kwargs):
    """Each "rank" sees its own rows and every rank's columns (as a gather would give them)."""
    batch = local_columns[0].size(0) // world_size
    union_a, union_p, *union_n = local_columns
    gathered = Gathered(union_a, union_p, list(union_n))
    losses = []
    for rank in range(world_size):
        rows = slice(rank * batch, (rank + 1) * batch)
        a, p, *n = (column[rows] for column in local_columns)
        losses.append(fn(a, p, n, rank=rank, world_size=world_size, gathered=gathered, **kwargs))
    return losses


@pytest.mark.parametrize(
    "name",
    ["info_nce", "info_nce_one_way", "sigmoid", "debiased"],
)
def test_rank_split_mean_equals_union_loss_and_gradients(random_batch, name):
    scale, bias = T(9.0, dtype=torch.float64), T(-2.0, dtype=torch.float64)
    fns = {
        "info_nce": lambda a, p, n, **kw: symmetric_info_nce(a, p, n, scale, **kw),
        "info_nce_one_way": lambda a, p, n, **kw: symmetric_info_nce(a, p, n, scale, symmetric=False, **kw),
        "sigmoid": lambda a, p, n, **kw: sigmoid_pairwise_loss(a, p, n, scale, bias, **kw),
        "debiased": lambda a, p, n, **kw: debiased_contrastive(a, p, n, temperature=0.3, tau_plus=0.2, **kw),
    }
    fn = fns[name]
    union = [x.clone().requires_grad_() for x in random_batch]
    union_loss = fn(union[0], union[1], union[2:])
    union_grads = torch.autograd.grad(union_loss, union)

    split = [x.clone().requires_grad_() for x in random_batch]
    losses = _rank_split_losses(fn, split, world_size=3)
    mean = torch.stack(losses).mean()
    assert mean.item() == pytest.approx(union_loss.item(), rel=1e-12)
    for got, expected in zip(torch.autograd.grad(mean, split), union_grads):
        torch.testing.assert_close(got, expected)


def test_gathered_with_wrong_row_count_is_refused(random_batch):
    a, p, n1, _ = random_batch
    with pytest.raises(ValueError, match="world_size"):
        symmetric_info_nce(a[:3], p[:3], [n1[:3]], T(10.0), rank=0, world_size=3, gathered=Gathered(a, p, [n1]))
    with pytest.raises(RuntimeError, match="not initialised"):
        symmetric_info_nce(a, p, [], T(10.0), rank=1, world_size=2)


# ------------------------------------------------------------------------------------------
# Temperature: parameterisation, clamping, gradient
# ------------------------------------------------------------------------------------------


class _Linear(nn.Module):
    """Stand-in model: features {"x": [B, 5]} -> sentence_embedding [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 4)

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


def _features(columns: int = 3, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, 5, generator=gen)} for _ in range(columns)]


def test_temperature_is_a_clamped_log_parameter():
    model = _Linear()
    loss = SymmetricInfoNCELoss(model, init_temperature=0.05)
    assert isinstance(loss.log_logit_scale, nn.Parameter)
    assert loss.log_logit_scale.item() == pytest.approx(math.log(20.0))
    assert loss.logit_scale.item() == pytest.approx(20.0)
    assert loss.temperature == pytest.approx(0.05)
    assert [p for p in loss.loss_parameters()] == [loss.log_logit_scale]

    # Initial temperature below 1/max_logit_scale: clamped (CLIP clamps at 100).
    hot = SymmetricInfoNCELoss(model, init_temperature=0.001, max_logit_scale=100.0)
    assert hot.logit_scale.item() == pytest.approx(100.0)
    # An optimizer step past the bound is put back on it before the next forward (CLIP's post-step clamp) ...
    with torch.no_grad():
        hot.log_logit_scale.fill_(7.0)
    value = hot(_features(), None)
    assert hot.log_logit_scale.item() == pytest.approx(math.log(100.0))
    # ... where the gradient flows again, instead of being stuck at zero behind a forward-only clamp.
    value.backward()
    assert hot.log_logit_scale.grad.abs().item() > 0
    # And the lower bound: temperature at most 1 (scale >= 1).
    cold = SymmetricInfoNCELoss(model, init_temperature=5.0)
    assert cold.logit_scale.item() == pytest.approx(1.0)


def test_fixed_temperature_is_a_buffer_not_a_parameter():
    loss = SymmetricInfoNCELoss(_Linear(), init_temperature=0.1, learnable_temperature=False)
    assert "log_logit_scale" not in dict(loss.named_parameters())
    assert "log_logit_scale" in dict(loss.named_buffers())
    assert loss.loss_parameters() == []
    assert no_weight_decay_parameter_names(loss) == set()


def test_learnable_temperature_gets_the_right_gradient():
    loss_fn = SymmetricInfoNCELoss(_Linear(), init_temperature=0.1)
    loss = loss_fn(_features(), None)
    loss.backward()
    grad = loss_fn.log_logit_scale.grad.item()
    assert grad != 0.0

    # Central finite difference on log_logit_scale, through the plain function.
    with torch.no_grad():
        embeddings = [loss_fn.model(f)["sentence_embedding"].double() for f in _features()]
        eps = 1e-5
        base = math.log(10.0)

        def value(log_scale: float) -> float:
            scale = torch.tensor(math.exp(log_scale), dtype=torch.float64)
            return symmetric_info_nce(embeddings[0], embeddings[1], embeddings[2:], scale).item()

        numeric = (value(base + eps) - value(base - eps)) / (2 * eps)
    assert grad == pytest.approx(numeric, rel=1e-3)


def test_sigmoid_scale_and_bias_are_learnable_and_get_gradients():
    loss_fn = SigmoidLoss(_Linear())
    assert loss_fn.logit_scale.item() == pytest.approx(10.0)
    assert loss_fn.logit_bias.item() == -10.0
    loss_fn(_features(), None).backward()
    assert loss_fn.log_logit_scale.grad.item() != 0 and loss_fn.logit_bias.grad.item() != 0
    assert no_weight_decay_parameter_names(loss_fn) == {"log_logit_scale", "logit_bias"}
    fixed = SigmoidLoss(_Linear(), learnable=False)
    assert fixed.loss_parameters() == []


def test_hard_negatives_change_the_loss_as_expected():
    gen = torch.Generator().manual_seed(5)
    a, p = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    close = a + 0.01 * torch.randn(4, 8, generator=gen)  # hard: nearly the anchor itself
    far = -a  # easy: opposite of the anchor
    scale = T(20.0)
    base = symmetric_info_nce(a, p, [], scale, symmetric=False)
    with_close = symmetric_info_nce(a, p, [close], scale, symmetric=False)
    with_far = symmetric_info_nce(a, p, [far], scale, symmetric=False)
    # Every extra column adds to the softmax denominator: the loss can only grow ...
    assert with_close > with_far > base
    # ... a near-duplicate of the anchor dominates it; an opposite vector (logit -20 for its own anchor,
    # random directions for the others, which see every row's negatives as columns) hardly counts.
    assert (with_close - base).item() > 1.0
    assert 0 < (with_far - base).item() < 0.01
    # The positive->anchor direction ignores hard negatives: the symmetric loss moves by half as much.
    sym_delta = symmetric_info_nce(a, p, [close], scale) - symmetric_info_nce(a, p, [], scale)
    assert sym_delta.item() == pytest.approx((with_close - base).item() / 2, rel=1e-5)
    # SigLIP: a hard-negative column only adds non-negative per-pair terms.
    s, b = T(10.0), T(-10.0)
    assert sigmoid_pairwise_loss(a, p, [close], s, b) > sigmoid_pairwise_loss(a, p, [far], s, b)
    # Debiased: a harder negative raises the loss too.
    assert debiased_contrastive(a, p, [close]) > debiased_contrastive(a, p, [far])


def test_config_dicts_list_the_hyperparameters():
    model = _Linear()
    assert SymmetricInfoNCELoss(model).get_config_dict() == {
        "init_temperature": 0.05,
        "learnable_temperature": True,
        "max_logit_scale": 100.0,
        "symmetric": True,
        "gather_across_devices": False,
    }
    assert CachedSymmetricInfoNCELoss(model, mini_batch_size=8).get_config_dict() == {
        "init_temperature": 0.05,
        "learnable_temperature": True,
        "max_logit_scale": 100.0,
        "symmetric": True,
        "gather_across_devices": False,
        "mini_batch_size": 8,
    }
    assert SigmoidLoss(model).get_config_dict() == {
        "init_temperature": 0.1,
        "init_bias": -10.0,
        "learnable": True,
        "max_logit_scale": 100.0,
        "gather_across_devices": False,
    }
    assert DebiasedContrastiveLoss(model).get_config_dict() == {
        "tau_plus": 0.1,
        "temperature": 0.05,
        "gather_across_devices": False,
    }
    for loss in (SymmetricInfoNCELoss(model), SigmoidLoss(model), DebiasedContrastiveLoss(model)):
        assert "@" in loss.citation


def test_invalid_hyperparameters_are_refused():
    model = _Linear()
    with pytest.raises(ValueError):
        SymmetricInfoNCELoss(model, init_temperature=0.0)
    with pytest.raises(ValueError):
        DebiasedContrastiveLoss(model, tau_plus=1.0)
    with pytest.raises(ValueError):
        CachedSymmetricInfoNCELoss(model, mini_batch_size=0)
    with pytest.raises(ValueError, match="columns"):
        SymmetricInfoNCELoss(model)(_features(columns=1), None)


# ------------------------------------------------------------------------------------------
# GradCache: cached == plain on a tiny real model
# ------------------------------------------------------------------------------------------

ANCHORS = [
    "a cat sits on the mat",
    "the stock market fell sharply today",
    "how do I bake sourdough bread",
    "football match ends in a draw",
    "new phone has a bigger battery",
    "rain expected over the weekend",
]
POSITIVES = [
    "a kitten is resting on a rug",
    "shares dropped steeply this afternoon",
    "recipe for a sourdough loaf",
    "the game finished level",
    "the latest smartphone lasts longer on a charge",
    "showers forecast for saturday and sunday",
]
NEGATIVES = [
    "a dog runs in the park",
    "the bond market was calm",
    "how to brew coffee at home",
    "tennis final goes to five sets",
    "old laptop with a cracked screen",
    "sunny skies all week long",
]


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    model.eval()  # dropout off: the plain loss embeds columns merged, the cached one in mini-batches
    return model


def _text_features(model, columns):
    return [model.preprocess(column) for column in columns]


def _grads(loss_module, model, features, weight=1.0):
    model.zero_grad()
    for p in loss_module.loss_parameters():
        p.grad = None
    value = loss_module(features, None)
    (value * weight).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    scale_grad = loss_module.log_logit_scale.grad.detach().clone()
    return value.detach(), grads, scale_grad


@pytest.mark.parametrize("symmetric", [True, False])
def test_cached_equals_plain_loss_and_gradients(tiny_model, symmetric):
    features = _text_features(tiny_model, [ANCHORS, POSITIVES, NEGATIVES])
    plain = SymmetricInfoNCELoss(tiny_model, init_temperature=0.1, symmetric=symmetric)
    cached = CachedSymmetricInfoNCELoss(tiny_model, init_temperature=0.1, symmetric=symmetric, mini_batch_size=4)
    plain_value, plain_grads, plain_scale = _grads(plain, tiny_model, features)
    # The cached loss is scaled by 0.25 on the way back, like gradient accumulation would: every gradient,
    # the temperature's included, must carry that factor (it reaches the temperature via the surrogate term).
    cached_value, cached_grads, cached_scale = _grads(cached, tiny_model, features, weight=0.25)
    assert cached_value.item() == pytest.approx(plain_value.item(), rel=1e-5)
    assert cached_scale.item() == pytest.approx(0.25 * plain_scale.item(), rel=1e-4)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], 0.25 * grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_without_grad_returns_the_same_value(tiny_model):
    features = _text_features(tiny_model, [ANCHORS, POSITIVES])
    plain = SymmetricInfoNCELoss(tiny_model)
    cached = CachedSymmetricInfoNCELoss(tiny_model, mini_batch_size=2)
    with torch.no_grad():
        assert cached(features, None).item() == pytest.approx(plain(features, None).item(), rel=1e-5)


def test_matryoshka_with_cached_equals_matryoshka_with_plain(tiny_model):
    features = _text_features(tiny_model, [ANCHORS, POSITIVES, NEGATIVES])
    plain = matryoshka(SymmetricInfoNCELoss(tiny_model, init_temperature=0.1), [32, 16, 8])
    cached = matryoshka(CachedSymmetricInfoNCELoss(tiny_model, init_temperature=0.1, mini_batch_size=2), [32, 16, 8])
    values, grads, scales = [], [], []
    for loss in (plain, cached):
        tiny_model.zero_grad()
        value = loss(features, None)
        value.backward()
        values.append(value.item())
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
        scales.append(loss.loss.log_logit_scale.grad.item())
    assert values[1] == pytest.approx(values[0], rel=1e-5)
    assert scales[1] == pytest.approx(scales[0], rel=1e-4)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # The full-dimension term alone is the plain loss; the prefixes add to it.
    assert values[0] > SymmetricInfoNCELoss(tiny_model, init_temperature=0.1)(features, None).item()
    assert no_weight_decay_parameter_names(plain) == {"loss.log_logit_scale"}
    with pytest.raises(ValueError, match="equal matryoshka weights"):
        matryoshka(CachedSymmetricInfoNCELoss(tiny_model), [32, 16], weights=[1.0, 0.5])


# ------------------------------------------------------------------------------------------
# Inside a real SentenceTransformerTrainer
# ------------------------------------------------------------------------------------------


def _train_dataset(with_negative: bool):
    from datasets import Dataset

    columns = {"anchor": ANCHORS * 2, "positive": POSITIVES * 2}
    if with_negative:
        columns["negative"] = NEGATIVES * 2
    return Dataset.from_dict(columns)


def _make_trainer(model, loss, dataset, output_dir, weight_decay=0.0):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    class DuetTrainer(SentenceTransformerTrainer):
        # What the module docstring asks of the trainer: no weight decay on the loss's scalars.
        def get_decay_parameter_names(self, model):
            skip = no_weight_decay_parameter_names(model)
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=6,
        per_device_eval_batch_size=6,
        learning_rate=3e-3,
        weight_decay=weight_decay,
        warmup_steps=0,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=4,
        use_cpu=True,
        seed=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    return DuetTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset, loss=loss)


@pytest.mark.parametrize(
    "kind",
    ["infonce", "cached", "sigmoid", "debiased", "matryoshka"],
)
def test_each_loss_trains_inside_the_sentence_transformers_trainer(tiny_model_dir, tmp_path, kind):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    losses = {
        "infonce": lambda: SymmetricInfoNCELoss(model, init_temperature=0.1),
        "cached": lambda: CachedSymmetricInfoNCELoss(model, init_temperature=0.1, mini_batch_size=3),
        "sigmoid": lambda: SigmoidLoss(model),
        "debiased": lambda: DebiasedContrastiveLoss(model, temperature=0.1),
        "matryoshka": lambda: matryoshka(SymmetricInfoNCELoss(model, init_temperature=0.1), [32, 16]),
    }
    loss = losses[kind]()
    trainer = _make_trainer(model, loss, _train_dataset(with_negative=kind != "sigmoid"), tmp_path, weight_decay=0.01)
    before = trainer.evaluate()["eval_loss"]
    own = {n: p.detach().clone() for n, p in loss.named_parameters() if not n.startswith(("model.", "loss.model."))}
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before, f"{kind}: eval loss {before:.4f} -> {after:.4f}"

    # The loss's own parameters are in the optimizer, undecayed, and were updated.
    params = dict(loss.named_parameters())
    assert set(own) == no_weight_decay_parameter_names(loss)
    groups = trainer.optimizer.param_groups
    for name in own:
        (group,) = [g for g in groups if any(p is params[name] for p in g["params"])]
        assert group["weight_decay"] == 0.0, name
        assert not torch.equal(params[name].detach(), own[name]), f"{name} was not trained"
    if kind in ("infonce", "cached", "sigmoid", "matryoshka"):
        assert own, "the learnable temperature must be visible to the optimizer"
