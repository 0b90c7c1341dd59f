"""Negatives gathered across 2 CPU processes (gloo) == one process on the union batch.

Semantics checked here, for every loss with ``gather_across_devices=True``:

* loss: each rank returns the mean over its own rows; the mean over ranks equals the union loss.
* model gradients: the gather's backward sums every rank's share into the owning rank, so the
  per-rank gradients *sum* to ``world_size`` x the union gradient, and their *average* (what DDP
  does) is exactly the union gradient.
* loss-owned scalars (temperature, SigLIP bias): DDP never sees them (the trainer wraps only the
  model), so the loss averages their gradients itself; every rank holds the union gradient.
* raw embeddings (function level): a rank's embedding gradient is ``world_size`` x the union one.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.losses import (
    CachedSymmetricInfoNCELoss,
    ContinuouslyWeightedLoss,
    DebiasedContrastiveLoss,
    HardNegativeNCELoss,
    MomentumQueueLoss,
    MultiPositiveInfoNCELoss,
    SigmoidLoss,
    SymmetricInfoNCELoss,
    symmetric_info_nce,
)

WORLD_SIZE = 2
LOCAL_BATCH = 4
KINDS = ("infonce", "infonce_one_way", "cached", "sigmoid", "debiased", "hn_nce", "cwcl", "multi_positive", "moco")


class _Linear(nn.Module):
    """Stand-in model, identical on every rank: features {"x": [B, 5]} -> sentence_embedding [B, 4]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 4)

    def forward(self, features):
        return {"sentence_embedding": self.linear(features["x"])}


def _make_loss(kind: str, model: nn.Module, gather: bool) -> nn.Module:
    if kind == "infonce":
        return SymmetricInfoNCELoss(model, init_temperature=0.1, gather_across_devices=gather)
    if kind == "infonce_one_way":
        return SymmetricInfoNCELoss(model, init_temperature=0.1, symmetric=False, gather_across_devices=gather)
    if kind == "cached":
        return CachedSymmetricInfoNCELoss(model, init_temperature=0.1, mini_batch_size=3, gather_across_devices=gather)
    if kind == "sigmoid":
        return SigmoidLoss(model, init_temperature=0.2, init_bias=-2.0, gather_across_devices=gather)
    if kind == "hn_nce":
        return HardNegativeNCELoss(model, beta=0.8, init_temperature=0.1, gather_across_devices=gather)
    if kind == "cwcl":  # soft targets from the positives, gathered like the columns
        return ContinuouslyWeightedLoss(model, init_temperature=0.1, gather_across_devices=gather)
    if kind == "multi_positive":  # the third column as a second positive
        return MultiPositiveInfoNCELoss(model, init_temperature=0.1, gather_across_devices=gather)
    if kind == "moco":  # first step: an empty queue, keys from every rank, the filter on
        return MomentumQueueLoss(
            model, queue_size=16, false_negative_threshold=0.5, init_temperature=0.1, gather_across_devices=gather
        )
    return DebiasedContrastiveLoss(model, tau_plus=0.1, temperature=0.2, gather_across_devices=gather)


def _union_features() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(42)
    return [{"x": torch.randn(WORLD_SIZE * LOCAL_BATCH, 5, generator=gen)} for _ in range(3)]  # anchor, pos, neg


def _rows(rank: int) -> slice:
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def _scalar_grads(loss: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in loss.named_parameters() if not n.startswith("model.")}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results: dict[str, dict] = {}
        local_features = [{"x": f["x"][_rows(rank)]} for f in _union_features()]
        for kind in KINDS:
            model = _Linear()
            loss_fn = _make_loss(kind, model, gather=True)
            loss = loss_fn(local_features, None)
            loss.backward()
            raw = {n: p.grad.clone() for n, p in model.named_parameters()}
            averaged = {}
            for name, grad in raw.items():  # what DDP does to the model's gradients
                total = grad.clone()
                dist.all_reduce(total)
                averaged[name] = total / world_size
            results[kind] = {
                "loss": loss.detach(),
                "raw": raw,
                "averaged": averaged,
                "scalars": _scalar_grads(loss_fn),
            }

        # Function level: gradients on the raw local embeddings, gathered inside the function.
        gen = torch.Generator().manual_seed(7)
        union = [torch.randn(world_size * LOCAL_BATCH, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
        local = [u[_rows(rank)].clone().requires_grad_() for u in union]
        value = symmetric_info_nce(
            local[0], local[1], [local[2]], torch.tensor(8.0, dtype=torch.float64), rank=rank, world_size=world_size
        )
        value.backward()
        results["embeddings"] = {"loss": value.detach(), "grads": [t.grad.clone() for t in local]}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(WORLD_SIZE, _free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _union_reference(kind: str) -> dict:
    model = _Linear()
    loss_fn = _make_loss(kind, model, gather=False)
    loss = loss_fn(_union_features(), None)
    loss.backward()
    return {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "scalars": _scalar_grads(loss_fn),
    }


@pytest.mark.parametrize("kind", KINDS)
def test_gathered_loss_and_gradients_equal_the_union_batch(per_rank, kind):
    reference = _union_reference(kind)
    ranks = [results[kind] for results in per_rank]

    # Loss: the mean over ranks of the per-rank (local-row mean) losses is the union loss.
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, reference["loss"], rtol=1e-5, atol=1e-6)

    for name, expected in reference["grads"].items():
        # Sum semantics of the gather: the per-rank gradients add up to world_size x the union gradient ...
        summed = sum(r["raw"][name] for r in ranks)
        torch.testing.assert_close(summed, WORLD_SIZE * expected, rtol=1e-4, atol=1e-6, msg=name)
        # ... so DDP's average gives every rank exactly the union gradient.
        for r in ranks:
            torch.testing.assert_close(r["averaged"][name], expected, rtol=1e-4, atol=1e-6, msg=name)

    # Loss-owned scalars: averaged by the loss itself, the union gradient on every rank.
    assert (
        set(reference["scalars"])
        == {
            "infonce": {"log_logit_scale"},
            "infonce_one_way": {"log_logit_scale"},
            "cached": {"log_logit_scale"},
            "sigmoid": {"log_logit_scale", "logit_bias"},
            "debiased": set(),
            "hn_nce": {"log_logit_scale"},
            "cwcl": {"log_logit_scale"},
            "multi_positive": {"log_logit_scale"},
            "moco": {"log_logit_scale"},
        }[kind]
    )
    for name, expected in reference["scalars"].items():
        for r in ranks:
            torch.testing.assert_close(r["scalars"][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_embedding_gradients_through_the_gather_are_world_size_times_the_union_ones(per_rank):
    gen = torch.Generator().manual_seed(7)
    union = [
        torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)
    ]
    loss = symmetric_info_nce(union[0], union[1], [union[2]], torch.tensor(8.0, dtype=torch.float64))
    grads = torch.autograd.grad(loss, union)
    mean_loss = torch.stack([results["embeddings"]["loss"] for results in per_rank]).mean()
    torch.testing.assert_close(mean_loss, loss.detach())
    for rank, results in enumerate(per_rank):
        for got, expected in zip(results["embeddings"]["grads"], grads):
            torch.testing.assert_close(got, WORLD_SIZE * expected[_rows(rank)])
