"""HN-NCE (importance-weighted hard negatives), CWCL (soft targets) and multi-positive InfoNCE:
hand-computed values, equivalence with plain InfoNCE where the method reduces to it, loop
references on random data, and the rank split (mean over ranks == union-batch loss)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from trainer.losses import (
    ContinuouslyWeightedLoss,
    Gathered,
    HardNegativeNCELoss,
    MultiPositiveInfoNCELoss,
    graded_targets,
    hard_negative_nce,
    multi_positive_info_nce,
    similarity_targets,
    soft_target_info_nce,
    symmetric_info_nce,
)


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


SCALE = torch.tensor(10.0, dtype=torch.float64)
# The fixed batch of test_losses.py: cos(a_i, p_j) = [[0.6, -0.6], [0.8, 0.8]] (anchors normalised inside).
A = f64([[3.0, 0.0], [0.0, 2.0]])
P = f64([[0.6, 0.8], [-0.6, 0.8]])
# One hard-negative column: cos(a1, n1) = 0, cos(a1, n2) = 1, cos(a2, n1) = 1, cos(a2, n2) = 0.
N1 = f64([[0.0, 1.0], [1.0, 0.0]])


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


@pytest.fixture()
def batch():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(4)]  # a, p, n1, n2


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rank_split(fn, columns, world_size):
    """Each "rank" sees its own rows and every rank's columns, as a gather would give them."""
    rows_per_rank = columns[0].size(0) // world_size
    gathered = Gathered(columns[0], columns[1], list(columns[2:]))
    losses = []
    for rank in range(world_size):
        rows = slice(rank * rows_per_rank, (rank + 1) * rows_per_rank)
        losses.append(fn([c[rows] for c in columns], rank=rank, world_size=world_size, gathered=gathered))
    return torch.stack(losses).mean()


def _assert_rank_split_matches_union(fn, batch, world_size=3):
    union = [x.clone().requires_grad_() for x in batch]
    union_loss = fn(union)
    union_grads = torch.autograd.grad(union_loss, union)
    split = [x.clone().requires_grad_() for x in batch]
    mean = _rank_split(fn, split, world_size)
    assert mean.item() == pytest.approx(union_loss.item(), rel=1e-12)
    for got, expected in zip(torch.autograd.grad(mean, split), union_grads):
        torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------
# HN-NCE
# ------------------------------------------------------------------------------------------


def test_hard_negative_nce_hand_computed():
    # Columns [p1, p2, n1, n2], scale 10, beta 0.1 (weights exp(0.1 * logit), mean 1 over the N = 3 negatives):
    #   a1: logits [6, -6, 0, 10], positive 6, negatives [-6, 0, 10]
    #   a2: logits [8, 8, 10, 0],  positive 8, negatives [8, 10, 0]
    def row(positive, negatives, beta=0.1):
        z = sum(math.exp(beta * n) for n in negatives)
        weighted = sum(3 * math.exp(beta * n) / z * math.exp(n) for n in negatives)
        return -positive + math.log(math.exp(positive) + weighted)

    expected = (row(6, [-6, 0, 10]) + row(8, [8, 10, 0])) / 2
    got = hard_negative_nce(A, P, [N1], SCALE, beta=0.1, symmetric=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # The harder negative (logit 10) gets weight 3 e^1 / (e^-0.6 + 1 + e^1) = 1.84 > 1: the loss grows.
    assert expected > (-6 + lse(6, -6, 0, 10) + -8 + lse(8, 8, 10, 0)) / 2


@pytest.mark.parametrize("symmetric", [True, False])
def test_hard_negative_nce_with_beta_zero_is_info_nce(batch, symmetric):
    a, p, n1, n2 = batch
    plain = symmetric_info_nce(a, p, [n1, n2], SCALE, symmetric=symmetric)
    weighted = hard_negative_nce(a, p, [n1, n2], SCALE, beta=0.0, symmetric=symmetric)
    assert weighted.item() == pytest.approx(plain.item(), rel=1e-12)


def np_hard_negative_nce(a, p, negs, scale, beta):
    a, p, negs = _unit(a), _unit(p), [_unit(n) for n in negs]
    cands = list(p) + [n[j] for n in negs for j in range(len(n))]

    def row(logits, own):
        others = [x for j, x in enumerate(logits) if j != own]
        weights = [len(others) * math.exp(beta * x) / sum(math.exp(beta * y) for y in others) for x in others]
        return -logits[own] + math.log(math.exp(logits[own]) + sum(w * math.exp(x) for w, x in zip(weights, others)))

    total = 0.0
    for i in range(len(a)):
        a2c = row([scale * float(a[i] @ c) for c in cands], i)
        p2a = row([scale * float(p[i] @ a[j]) for j in range(len(a))], i)
        total += (a2c + p2a) / 2
    return total / len(a)


@pytest.mark.parametrize("beta", [0.3, 1.0, 2.5])
def test_hard_negative_nce_matches_loop_reference(batch, beta):
    a, p, n1, n2 = batch
    expected = np_hard_negative_nce(a.numpy(), p.numpy(), [n1.numpy(), n2.numpy()], 7.5, beta)
    got = hard_negative_nce(a, p, [n1, n2], torch.tensor(7.5, dtype=torch.float64), beta=beta)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_hard_negative_nce_rank_split(batch):
    _assert_rank_split_matches_union(lambda c, **kw: hard_negative_nce(c[0], c[1], c[2:], SCALE, beta=0.7, **kw), batch)


# ------------------------------------------------------------------------------------------
# CWCL: soft targets
# ------------------------------------------------------------------------------------------


def test_similarity_targets_hand_computed():
    # r1 = (2, 0) -> (1, 0), r2 = (0, 1): cosines [[1, 0], [0, 1]], w = (1 + cos) / 2 = [[1, .5], [.5, 1]],
    # rows normalised: [[2/3, 1/3], [1/3, 2/3]].
    reference = f64([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(similarity_targets(reference, reference), f64([[2 / 3, 1 / 3], [1 / 3, 2 / 3]]))
    # With a target temperature of 0.5: softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1).
    sharp = math.exp(2) / (math.exp(2) + 1)
    torch.testing.assert_close(
        similarity_targets(reference, reference, temperature=0.5), f64([[sharp, 1 - sharp], [1 - sharp, sharp]])
    )


def test_graded_targets_hand_computed():
    # Score 1 is one-hot; 0.4 leaves 0.6 spread over the 2 other columns; offset 1 moves the own column.
    torch.testing.assert_close(graded_targets(f64([1.0, 0.4]), 3), f64([[1.0, 0.0, 0.0], [0.3, 0.4, 0.3]]))
    torch.testing.assert_close(graded_targets(f64([0.0]), 3, offset=1), f64([[0.5, 0.0, 0.5]]))
    with pytest.raises(ValueError, match="score_max"):
        graded_targets(f64([4.0, 0.5]), 2)


def test_soft_target_loss_hand_computed():
    # Targets [[2/3, 1/3], [1/3, 2/3]], scale 10, anchor -> positives only:
    #   a1: logits [6, -6]: -(2/3 (6 - L1) + 1/3 (-6 - L1)) = L1 - 2,  L1 = log(e^6 + e^-6)
    #   a2: logits [8, 8]:  -(1/3 (8 - L2) + 2/3 (8 - L2)) = L2 - 8 = log 2
    targets = f64([[2 / 3, 1 / 3], [1 / 3, 2 / 3]])
    expected = (lse(6, -6) - 2 + math.log(2)) / 2
    got = soft_target_info_nce(A, P, [], SCALE, targets, symmetric=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # A hard-negative column is a labelled negative: target 0, but it joins the softmax.
    with_negative = soft_target_info_nce(A, P, [N1], SCALE, targets, symmetric=False)
    expected = (lse(6, -6, 0, 10) - 2 + lse(8, 8, 10, 0) - 8) / 2
    assert with_negative.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
def test_one_hot_targets_are_info_nce(batch, symmetric):
    a, p, n1, _ = batch
    one_hot = torch.eye(6, dtype=torch.float64)
    plain = symmetric_info_nce(a, p, [n1], SCALE, symmetric=symmetric)
    assert soft_target_info_nce(a, p, [n1], SCALE, one_hot, symmetric=symmetric).item() == pytest.approx(
        plain.item(), rel=1e-12
    )
    # Graded data scored 1 everywhere is one-hot too.
    graded = graded_targets(torch.ones(6, dtype=torch.float64), 6)
    assert soft_target_info_nce(a, p, [n1], SCALE, graded, symmetric=symmetric).item() == pytest.approx(
        plain.item(), rel=1e-12
    )


def np_soft_targets(a, p, negs, scale, targets):
    a, p, negs = _unit(a), _unit(p), [_unit(n) for n in negs]
    cands = list(p) + [n[j] for n in negs for j in range(len(n))]
    total = 0.0
    for i in range(len(a)):
        logits = [scale * float(a[i] @ c) for c in cands]
        norm = math.log(sum(math.exp(x) for x in logits))
        a2c = -sum(targets[i][j] * (logits[j] - norm) for j in range(len(p)))
        logits = [scale * float(p[i] @ a[j]) for j in range(len(a))]
        norm = math.log(sum(math.exp(x) for x in logits))
        p2a = -sum(targets[i][j] * (logits[j] - norm) for j in range(len(a)))
        total += (a2c + p2a) / 2
    return total / len(a)


def test_soft_target_loss_matches_loop_reference(batch):
    a, p, n1, r = batch
    targets = similarity_targets(r, r)
    expected = np_soft_targets(a.numpy(), p.numpy(), [n1.numpy()], 7.5, targets.numpy())
    got = soft_target_info_nce(a, p, [n1], torch.tensor(7.5, dtype=torch.float64), targets)
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_soft_target_loss_rank_split(batch):
    reference = batch[3]
    world_size, rows = 3, 2

    def fn(c, rank=0, world_size=1, gathered=None):
        local = reference[rank * rows : (rank + 1) * rows] if world_size > 1 else reference
        targets = similarity_targets(local, reference)
        return soft_target_info_nce(
            c[0], c[1], c[2:], SCALE, targets, rank=rank, world_size=world_size, gathered=gathered
        )

    _assert_rank_split_matches_union(fn, batch[:3], world_size)


class _Linear(nn.Module):
    """Stand-in model: features {"x": [B, 5]} -> sentence_embedding [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 4)

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


def _features(columns: int, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, 5, generator=gen)} for _ in range(columns)]


def test_cwcl_module_uses_scores_when_labelled_and_the_reference_view_otherwise():
    model = _Linear()
    features = _features(2)
    with torch.no_grad():
        a, p = (model(f)["sentence_embedding"] for f in features)
        scale = torch.tensor(20.0)
        scores = torch.tensor([1.0, 0.2, 0.8, 0.0, 0.5, 1.0])
        by_score = soft_target_info_nce(a, p, [], scale, graded_targets(scores, 6))
        by_positive = soft_target_info_nce(a, p, [], scale, similarity_targets(p, p))
        by_anchor = soft_target_info_nce(a, p, [], scale, similarity_targets(a, a))
        loss = ContinuouslyWeightedLoss(model, init_temperature=0.05)
        assert loss(features, scores).item() == pytest.approx(by_score.item(), rel=1e-5)
        assert loss(features, None).item() == pytest.approx(by_positive.item(), rel=1e-5)
        anchored = ContinuouslyWeightedLoss(model, reference="anchor", init_temperature=0.05)
        assert anchored(features, None).item() == pytest.approx(by_anchor.item(), rel=1e-5)
    # Targets carry no gradient: only the logits do.
    value = loss(features, None)
    value.backward()
    assert model.linear.weight.grad.abs().sum() > 0 and loss.log_logit_scale.grad is not None


# ------------------------------------------------------------------------------------------
# Multi-positive
# ------------------------------------------------------------------------------------------

# Two positive columns; row 2 has one real positive, its second slot is padding.
P2 = f64([[0.8, 0.6], [123.0, -7.0]])


def test_multi_positive_hand_computed():
    # Candidates column-major [p1_1, p2_1, p1_2, (p2_2 padding: dropped)], scale 10, anchor -> positives:
    #   a1 = (1, 0): logits [6, -6, 8]; positives {6, 8}: -((6 - L1) + (8 - L1)) / 2 = L1 - 7,  L1 = lse(6, -6, 8)
    #   a2 = (0, 1): logits [8, 8, 6];  positive {8 (p2_1)}:                             L2 - 8,  L2 = lse(8, 8, 6)
    counts = torch.tensor([2, 1])
    expected = (lse(6, -6, 8) - 7 + lse(8, 8, 6) - 8) / 2
    got = multi_positive_info_nce(A, [P, P2], SCALE, counts=counts, symmetric=False)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Positive -> anchor: p1_1 = (.6, .8) over [a1, a2] logits [6, 8] -> lse - 6; p1_2 = (.8, .6): [8, 6] -> lse - 8;
    # p2_1 = (-.6, .8): [-6, 8] -> lse - 8. Per anchor averaged over its positives, then over anchors.
    p2a = ((lse(6, 8) - 6 + lse(8, 6) - 8) / 2 + (lse(-6, 8) - 8)) / 2
    both = multi_positive_info_nce(A, [P, P2], SCALE, counts=counts)
    assert both.item() == pytest.approx((expected + p2a) / 2, rel=1e-12)


def test_padding_slots_change_nothing():
    counts = torch.tensor([2, 1])
    other_padding = f64([[0.8, 0.6], [0.0, 1.0]])  # same real positive, different padding
    first = multi_positive_info_nce(A, [P, P2], SCALE, counts=counts)
    second = multi_positive_info_nce(A, [P, other_padding], SCALE, counts=counts)
    assert first.item() == pytest.approx(second.item(), rel=1e-12)
    with pytest.raises(ValueError, match="between 1 and 2 positives"):
        multi_positive_info_nce(A, [P, P2], SCALE, counts=torch.tensor([3, 1]))


@pytest.mark.parametrize("symmetric", [True, False])
def test_one_positive_per_anchor_is_info_nce(batch, symmetric):
    a, p, _, _ = batch
    plain = symmetric_info_nce(a, p, [], SCALE, symmetric=symmetric)
    assert multi_positive_info_nce(a, [p], SCALE, symmetric=symmetric).item() == pytest.approx(plain.item(), rel=1e-12)


def np_multi_positive(a, positives, counts, scale):
    a, positives = _unit(a), [_unit(p) for p in positives]
    cands = [(k, j) for k in range(len(positives)) for j in range(len(a)) if k < counts[j]]
    total = 0.0
    for i in range(len(a)):
        logits = {c: scale * float(a[i] @ positives[c[0]][c[1]]) for c in cands}
        norm = math.log(sum(math.exp(x) for x in logits.values()))
        a2c = -sum(logits[(k, i)] - norm for k in range(counts[i])) / counts[i]
        p2a = 0.0
        for k in range(counts[i]):
            row = [scale * float(positives[k][i] @ a[j]) for j in range(len(a))]
            p2a += -row[i] + math.log(sum(math.exp(x) for x in row))
        total += (a2c + p2a / counts[i]) / 2
    return total / len(a)


def test_multi_positive_matches_loop_reference(batch):
    a, p1, p2, p3 = batch
    counts = [3, 1, 2, 3, 2, 1]
    expected = np_multi_positive(a.numpy(), [p1.numpy(), p2.numpy(), p3.numpy()], counts, 7.5)
    got = multi_positive_info_nce(a, [p1, p2, p3], torch.tensor(7.5, dtype=torch.float64), counts=torch.tensor(counts))
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_multi_positive_rank_split(batch):
    counts = torch.tensor([3, 1, 2, 3, 2, 1])
    rows = 2

    def fn(c, rank=0, world_size=1, gathered=None):
        local = counts[rank * rows : (rank + 1) * rows] if world_size > 1 else counts
        return multi_positive_info_nce(
            c[0],
            c[1:],
            SCALE,
            counts=local,
            rank=rank,
            world_size=world_size,
            gathered=gathered,
            gathered_counts=counts.double() if gathered is not None else None,
        )

    _assert_rank_split_matches_union(fn, batch, world_size=3)


def test_multi_positive_module_reads_counts_from_the_labels():
    model = _Linear()
    features = _features(3)
    loss = MultiPositiveInfoNCELoss(model, init_temperature=0.1)
    with torch.no_grad():
        a, p1, p2 = (model(f)["sentence_embedding"] for f in features)
        counts = torch.tensor([2.0, 1.0, 2.0, 2.0, 1.0, 1.0])
        expected = multi_positive_info_nce(a, [p1, p2], torch.tensor(10.0), counts=counts)
        assert loss(features, counts).item() == pytest.approx(expected.item(), rel=1e-5)
        assert loss(features, None).item() != pytest.approx(expected.item(), rel=1e-3)


def test_new_losses_list_their_hyperparameters_and_refuse_bad_ones():
    model = _Linear()
    assert HardNegativeNCELoss(model, beta=0.3).get_config_dict()["beta"] == 0.3
    assert ContinuouslyWeightedLoss(model, reference="anchor").get_config_dict()["reference"] == "anchor"
    assert MultiPositiveInfoNCELoss(model).get_config_dict()["symmetric"] is True
    for loss in (HardNegativeNCELoss(model), ContinuouslyWeightedLoss(model), MultiPositiveInfoNCELoss(model)):
        assert "@" in loss.citation and [p.shape for p in loss.loss_parameters()] == [torch.Size([])]
    with pytest.raises(ValueError, match="beta"):
        HardNegativeNCELoss(model, beta=-1.0)
    with pytest.raises(ValueError, match="reference"):
        ContinuouslyWeightedLoss(model, reference="image")
