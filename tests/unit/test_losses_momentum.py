"""The momentum queue loss (MoCo with hard-negative filtering): the maths by hand, its reduction to
InfoNCE, the FIFO queue, the momentum encoder (frozen towers shared, not copied), GradCache ==
plain, and training inside the sentence-transformers trainer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.losses import (
    CachedMomentumQueueLoss,
    Gathered,
    KeyQueue,
    MomentumEncoder,
    MomentumQueueLoss,
    momentum_queue_info_nce,
    no_weight_decay_parameter_names,
    symmetric_info_nce,
)


def f64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


SCALE = torch.tensor(10.0, dtype=torch.float64)
Q = f64([[3.0, 0.0], [0.0, 2.0]])  # queries q1 = (1, 0), q2 = (0, 1) once normalised
K = f64([[0.6, 0.8], [-0.6, 0.8]])  # keys k1, k2
QUEUE = f64([[1.0, 0.0], [0.6, 0.8]])  # u1, u2 (u2 is a copy of k1: a false negative for row 1)


def test_hand_computed_with_queue_filter_and_hardest():
    # Cosines: q1.[k1, k2, u1, u2] = [.6, -.6, 1, .6];  q2.[k1, k2, u1, u2] = [.8, .8, 0, .8]
    # Filter at 0.9 on s(own key, candidate): s(k1, u2) = 1 > .9 -> dropped from row 1; s(k1, k2) = .28,
    # s(k1, u1) = .6, s(k2, k1) = .28, s(k2, u1) = -.6, s(k2, u2) = .28: nothing else.
    row1 = -6 + lse(6, -6, 10)
    row2 = -8 + lse(8, 8, 0, 8)
    got = momentum_queue_info_nce(Q, K, QUEUE, SCALE, false_negative_threshold=0.9)
    assert got.item() == pytest.approx((row1 + row2) / 2, rel=1e-12)
    # No filter: u2 stays in row 1.
    unfiltered = momentum_queue_info_nce(Q, K, QUEUE, SCALE)
    assert unfiltered.item() == pytest.approx((-6 + lse(6, -6, 10, 6) + row2) / 2, rel=1e-12)
    # hardest=1 keeps the one queue entry closest to the query among those the filter left:
    # row 1 keeps u1 (u2 is filtered), row 2 keeps u2 (.8 > 0) and loses u1.
    hardest = momentum_queue_info_nce(Q, K, QUEUE, SCALE, false_negative_threshold=0.9, hardest=1)
    assert hardest.item() == pytest.approx((row1 + (-8 + lse(8, 8, 8))) / 2, rel=1e-12)


def test_explicit_hard_negatives_are_never_filtered():
    negative = f64([[0.6, 0.8], [1.0, 0.0]])  # row 1's hard negative equals its own key: still kept
    got = momentum_queue_info_nce(Q, K, QUEUE[:0], SCALE, negatives=[negative], false_negative_threshold=0.9)
    # Row 1 columns: [k1, k2, n1 = (.6,.8), n2 = (1,0)] -> [6, -6, 6, 10]; row 2: [8, 8, 8, 0].
    assert got.item() == pytest.approx((-6 + lse(6, -6, 6, 10) + -8 + lse(8, 8, 8, 0)) / 2, rel=1e-12)


def test_without_queue_or_filter_it_is_one_directional_info_nce():
    gen = torch.Generator().manual_seed(0)
    queries, keys, negative = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    queries.requires_grad_()
    empty = keys[:0]
    got = momentum_queue_info_nce(queries, keys, empty, SCALE, negatives=[negative])
    expected_queries = queries.detach().clone().requires_grad_()
    expected = symmetric_info_nce(expected_queries, keys, [negative], SCALE, symmetric=False)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    got.backward()
    expected.backward()
    torch.testing.assert_close(queries.grad, expected_queries.grad)


def test_rank_split_mean_equals_union_loss():
    gen = torch.Generator().manual_seed(1)
    queries, keys = (torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    queue = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    queries.requires_grad_()
    union = momentum_queue_info_nce(queries, keys, queue, SCALE, false_negative_threshold=0.5, hardest=3)
    (union_grad,) = torch.autograd.grad(union, queries)
    losses = [
        momentum_queue_info_nce(
            queries[rank * 2 : rank * 2 + 2],
            keys[rank * 2 : rank * 2 + 2],
            queue,
            SCALE,
            false_negative_threshold=0.5,
            hardest=3,
            rank=rank,
            world_size=3,
            gathered=Gathered(None, keys, []),
        )
        for rank in range(3)
    ]
    mean = torch.stack(losses).mean()
    assert mean.item() == pytest.approx(union.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(mean, queries)[0], union_grad)


def test_key_queue_is_a_fifo_of_the_last_entries():
    queue = KeyQueue(3)
    assert queue.keys(torch.zeros(2, 4)).shape == (0, 4) and len(queue) == 0
    queue.push(torch.tensor([[1.0], [2.0]]))
    assert sorted(queue.keys(torch.zeros(1, 1)).view(-1).tolist()) == [1.0, 2.0]
    queue.push(torch.tensor([[3.0], [4.0]]))  # overwrites the oldest (1)
    assert sorted(queue.keys(torch.zeros(1, 1)).view(-1).tolist()) == [2.0, 3.0, 4.0] and len(queue) == 3
    queue.push(torch.tensor([[5.0], [6.0], [7.0], [8.0]]))  # more than fits: the last three
    assert sorted(queue.keys(torch.zeros(1, 1)).view(-1).tolist()) == [6.0, 7.0, 8.0]
    with pytest.raises(ValueError):
        KeyQueue(0)


class _TwoTowers(nn.Module):
    """Stand-in dual model: a "frozen" tower and a trained one, features {"x": [B, 5]} -> [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.locked = nn.Linear(5, 4)
        self.trained = nn.Linear(5, 4)

    def forward(self, features):
        return {"sentence_embedding": self.trained(features["x"]) + self.locked(features["x"])}


def test_momentum_encoder_averages_trained_weights_and_shares_frozen_ones():
    model = _TwoTowers()
    model.locked.requires_grad_(False)  # LiT: a locked tower
    encoder = MomentumEncoder(model, momentum=0.75)
    assert encoder.module.locked.weight is model.locked.weight  # shared, not copied
    assert encoder.module.trained.weight is not model.trained.weight
    assert encoder.shared_parameters == 2
    assert not any(p.requires_grad for p in encoder.module.parameters())
    start = model.trained.weight.detach().clone()
    with torch.no_grad():
        model.trained.weight.add_(1.0)
    encoder.update()
    # theta_k = 0.75 * start + 0.25 * (start + 1) = start + 0.25
    torch.testing.assert_close(encoder.module.trained.weight, start + 0.25)
    with pytest.raises(ValueError):
        MomentumEncoder(model, momentum=1.0)


def _features(columns: int, batch: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, 5, generator=gen)} for _ in range(columns)]


def test_training_forwards_fill_the_queue_and_evaluation_leaves_it():
    model = _TwoTowers()
    loss = MomentumQueueLoss(model, queue_size=8, momentum=0.9)
    assert no_weight_decay_parameter_names(loss) == {"log_logit_scale"}
    own = loss.loss_parameters()
    assert [p.shape for p in own] == [torch.Size([])]  # the momentum copy is not the optimiser's
    with torch.no_grad():
        loss(_features(2), None)
    assert len(loss.queues["positive"]) == 0
    first = loss(_features(2), None)
    first.backward()
    assert len(loss.queues["positive"]) == 6 and len(loss.queues["anchor"]) == 6
    loss(_features(3, seed=1), None)  # a hard-negative column too
    assert len(loss.queues["positive"]) == 8  # capped at queue_size
    one_way = MomentumQueueLoss(model, queue_size=8, symmetric=False)
    one_way(_features(2), None)
    assert len(one_way.queues["anchor"]) == 0 and len(one_way.queues["positive"]) == 6


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    model.eval()  # no dropout: plain and cached embed differently (merged columns vs mini-batches)
    return model


TEXTS = [
    ["a cat sits on the mat", "stock market falls", "bake sourdough bread", "football ends in a draw"],
    ["a kitten on a rug", "shares drop sharply", "a sourdough loaf recipe", "the game finished level"],
    ["a dog in the park", "the bond market was calm", "brew coffee at home", "tennis final in five sets"],
]


def _run(loss, model, features, weight=1.0):
    model.zero_grad()
    loss.log_logit_scale.grad = None
    value = loss(features, None)
    (value * weight).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return value.detach(), grads, loss.log_logit_scale.grad.detach().clone()


@pytest.mark.parametrize("symmetric", [True, False])
def test_cached_equals_plain_loss_gradients_and_queues(tiny_model, symmetric):
    features = [tiny_model.preprocess(column) for column in TEXTS]
    options = {"queue_size": 16, "momentum": 0.5, "init_temperature": 0.1, "symmetric": symmetric}
    plain = MomentumQueueLoss(tiny_model, false_negative_threshold=0.95, **options)
    cached = CachedMomentumQueueLoss(tiny_model, mini_batch_size=3, false_negative_threshold=0.95, **options)
    for loss in (plain, cached):  # one step each first, so the second has a queue to read
        loss(features, None)
    plain_value, plain_grads, plain_scale = _run(plain, tiny_model, features)
    cached_value, cached_grads, cached_scale = _run(cached, tiny_model, features, weight=0.25)
    assert cached_value.item() == pytest.approx(plain_value.item(), rel=1e-5)
    assert cached_scale.item() == pytest.approx(0.25 * plain_scale.item(), rel=1e-4)
    assert plain_grads.keys() == cached_grads.keys() and len(plain_grads) > 10
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], 0.25 * grad, rtol=1e-4, atol=1e-6, msg=name)
    like = torch.zeros(1, 32)
    for side in ("positive", "anchor"):
        torch.testing.assert_close(cached.queues[side].keys(like), plain.queues[side].keys(like))
    assert len(plain.queues["positive"]) == 8
    with torch.no_grad():
        assert cached(features, None).item() == pytest.approx(plain(features, None).item(), rel=1e-5)


def test_trains_inside_the_sentence_transformers_trainer(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Args

    torch.manual_seed(0)
    model = SentenceTransformer(str(tiny_model_dir), device="cpu")
    loss = MomentumQueueLoss(model, queue_size=10, momentum=0.9, init_temperature=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_dict({"anchor": TEXTS[0] * 3, "positive": TEXTS[1] * 3})
    args = Args(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_drop_last=True,
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss).train()
    assert len(loss.queues["positive"]) == 10  # 3 steps x 4 keys, capped
    name, weight = next((n, p) for n, p in model.named_parameters() if "encoder.layer.0" in n and p.dim() == 2)
    key_weight = dict(loss.encoder.module.named_parameters())[name]
    # The copy trails the model: strictly between the start and the trained weights, 0.9-weighted to the start.
    assert not torch.equal(weight.detach(), start[name]) and not torch.equal(key_weight, start[name])
    assert (key_weight - start[name]).norm() < (weight.detach() - start[name]).norm()
