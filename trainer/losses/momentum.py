"""Momentum queue of negatives (MoCo) with hard-negative filtering: many negatives on one small GPU.

The in-batch negatives of InfoNCE are as many as the batch is large. MoCo keeps the keys of past
batches in a FIFO queue and uses them as extra negatives; the keys come from a slowly moving
(exponential moving average) copy of the encoder, so keys from a few hundred steps ago are still
comparable with today's. With thousands of negatives, some are bound to be paraphrases of the
positive: those above a similarity threshold to the positive are dropped as likely false
negatives, and optionally only the hardest remaining queue entries are kept.

Parts, each testable alone: :func:`momentum_queue_info_nce` (the maths, embeddings only),
:class:`KeyQueue` (the FIFO), :class:`MomentumEncoder` (the EMA copy), and the losses that join
them (:class:`MomentumQueueLoss`, :class:`CachedMomentumQueueLoss` with GradCache).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import CachedLossMixin, _create_minibatch, _minibatch_ranges
from sentence_transformers.base.losses.merged_forward import embed_columns
from torch import Tensor, nn

from trainer.losses.core import (
    Gathered,
    _candidates,
    _ContrastiveLoss,
    _LearnableScale,
    _normalise,
    _resolve_columns,
    _split_columns,
    _synced,
    gather_with_grad,
)

T = TypeVar("T")


def momentum_queue_info_nce(
    queries: Tensor,
    keys: Tensor,
    queue: Tensor,
    logit_scale: Tensor,
    *,
    negatives: list[Tensor] | None = None,
    false_negative_threshold: float | None = None,
    hardest: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """One-directional InfoNCE of queries against momentum keys: in-batch keys, hard negatives and a queue.

    References: He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"
    (MoCo: queue + momentum encoder); Li et al. 2021, "Align before Fuse" (ALBEF: in-batch keys
    beside the queue, both directions); the false-negative filter and hardest-k selection after
    "Momentum Contrastive Learning with Enhanced Negative Sampling and Hard Negative Filtering".

    Candidates of query ``i``: every in-batch key (all ranks; its own key ``k_i`` is the positive),
    every explicit hard negative (also momentum keys), and every queue entry. With cosine ``s``::

        drop u from row i      if u is an in-batch key or queue entry, u != k_i, s(k_i, u) > threshold
        keep only the `hardest` queue entries of row i with the highest s(q_i, u)   (after the filter)
        loss = mean_i -log softmax(scale * s(q_i, candidates))[k_i]

    Explicit hard negatives are labelled, so the filter leaves them alone. ``keys``, negatives and
    ``queue`` are treated as constants (momentum-encoder outputs; no gradient flows into them).
    With an empty queue and no filter this is one-directional InfoNCE of ``queries`` against
    ``keys`` (:func:`~trainer.losses.symmetric_info_nce` with ``symmetric=False``).
    Distributed: as in :func:`~trainer.losses.symmetric_info_nce`; the queue is the same on every
    rank (it is filled with gathered keys).
    """
    if false_negative_threshold is not None and not -1.0 <= false_negative_threshold <= 1.0:
        raise ValueError(f"false_negative_threshold must be a cosine in [-1, 1], got {false_negative_threshold}")
    if hardest is not None and hardest < 1:
        raise ValueError(f"hardest must be >= 1, got {hardest}")
    constant = [t.detach() for t in [keys, *(negatives or []), queue]]
    queries, keys, *rest = _normalise([queries, *constant])
    negatives, queue = rest[:-1], rest[-1]
    if gathered is not None:
        gathered = Gathered(None, gathered.positives.detach(), [n.detach() for n in gathered.negatives])
    columns = _resolve_columns(queries, keys, negatives, rank, world_size, gathered, need_anchors=False)
    in_batch = columns.positives.size(0)
    candidates = torch.cat([_candidates(columns), queue])
    logits = logit_scale * queries @ candidates.T  # [B, in-batch keys + negatives + queue]
    rows = torch.arange(queries.size(0), device=queries.device)
    own = rank * queries.size(0) + rows
    dropped = torch.zeros_like(logits, dtype=torch.bool)
    unlabelled = torch.ones(candidates.size(0), dtype=torch.bool, device=logits.device)
    unlabelled[in_batch : candidates.size(0) - queue.size(0)] = False  # explicit hard negatives
    if false_negative_threshold is not None:
        dropped |= ((keys @ candidates.T) > false_negative_threshold) & unlabelled
    if hardest is not None and queue.size(0) > hardest:
        queue_scores = (queries.detach() @ queue.T).masked_fill(dropped[:, -queue.size(0) :], float("-inf"))
        kept = torch.zeros_like(queue_scores, dtype=torch.bool)
        kept.scatter_(1, queue_scores.topk(hardest, dim=1).indices, True)
        dropped[:, -queue.size(0) :] |= ~kept
    dropped[rows, own] = False  # the positive always stays
    logits = logits.masked_fill(dropped, float("-inf"))
    return F.cross_entropy(logits, own)


class KeyQueue:
    """A FIFO of the last ``size`` key embeddings (MoCo's dictionary), on the keys' device.

    Allocated on the first push (the embedding width is known then). It holds detached tensors
    only. Not saved in checkpoints: a resumed run refills it in ``size / batch`` steps.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.size = size
        self._buffer: Tensor | None = None
        self._next = 0
        self._filled = 0

    def __len__(self) -> int:
        return self._filled

    def keys(self, like: Tensor) -> Tensor:
        """The queued keys ``[n, D]`` (oldest entries overwritten first), or an empty ``[0, D]``."""
        if self._buffer is None:
            return like.new_zeros((0, like.size(-1)))
        return self._buffer[: self._filled]

    def push(self, keys: Tensor) -> None:
        keys = keys.detach()[-self.size :]
        if self._buffer is None or self._buffer.size(1) != keys.size(1):
            self._buffer = keys.new_zeros((self.size, keys.size(1)))
            self._next = self._filled = 0
        positions = (self._next + torch.arange(keys.size(0), device=keys.device)) % self.size
        self._buffer[positions] = keys.to(self._buffer.dtype)
        self._next = (self._next + keys.size(0)) % self.size
        self._filled = min(self._filled + keys.size(0), self.size)

    def clear(self) -> None:
        self._buffer, self._next, self._filled = None, 0, 0


class MomentumEncoder:
    """An exponential-moving-average copy of a model: ``theta_k <- m * theta_k + (1 - m) * theta_q``.

    Frozen parameters (LiT's locked tower) are *shared* with the model, not copied: their average
    is themselves, so the frozen tower costs no memory twice. Not an ``nn.Module`` attribute of the
    loss on purpose: the trainer must neither optimise, nor switch to train mode, nor checkpoint
    it as part of the model (a resumed run restarts it from the resumed model's weights).
    """

    def __init__(self, model: nn.Module, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module: nn.Module = copy.deepcopy(model, shared)
        self.module.eval()  # keys without dropout: they are targets
        self._pairs = [
            (key, query)
            for key, query in zip(self.module.parameters(), model.parameters(), strict=True)
            if query.requires_grad
        ]
        for key, _ in self._pairs:
            key.requires_grad_(False)

    @property
    def shared_parameters(self) -> int:
        """How many parameters the copy shares with the model (the frozen ones)."""
        return sum(1 for p in self.module.parameters() if not any(p is key for key, _ in self._pairs))

    @torch.no_grad()
    def update(self) -> None:
        for key, query in self._pairs:
            key.mul_(self.momentum).add_(query.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def embed(self, features: list[dict[str, Tensor]]) -> list[Tensor]:
        return [e.detach() for e in embed_columns(self.module, features)]


class Keys(NamedTuple):
    """Momentum-encoder embeddings of one batch's columns (``anchor`` only when symmetric)."""

    anchor: Tensor | None
    positive: Tensor
    negatives: list[Tensor]


class MomentumQueueLoss(_LearnableScale, _ContrastiveLoss):
    """MoCo-style loss: queries from the model, keys from its momentum copy, a queue of past keys.

    References: He et al. 2020 (MoCo); Li et al. 2021 (ALBEF, both directions with in-batch keys);
    "Momentum Contrastive Learning with Enhanced Negative Sampling and Hard Negative Filtering"
    (the false-negative filter). See :func:`momentum_queue_info_nce`.

    Each training forward (gradients enabled): update the momentum copy, embed the keys with it,
    compute the loss, then push this batch's keys into the queue. Anchor queries rank positive
    keys (plus hard negatives and the positive-key queue); with ``symmetric`` positive queries also
    rank anchor keys and an anchor-key queue. Evaluation forwards (no gradients) leave the
    encoder and queues as they are.

    Works with frozen towers (the momentum copy shares them) and with ``gather_across_devices``
    (keys are gathered; every rank queues the same keys). Not with ``MatryoshkaLoss`` (it truncates
    the model's outputs, not the copy's; the config refuses the combination). The EMA step runs
    per forward, as MoCo's does, i.e. per micro-batch under gradient accumulation.
    """

    _no_weight_decay = ("log_logit_scale",)

    def __init__(
        self,
        model: nn.Module,
        queue_size: int = 4096,
        momentum: float = 0.995,
        false_negative_threshold: float | None = 0.9,
        hardest: int | None = None,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        if false_negative_threshold is not None and not -1.0 <= false_negative_threshold <= 1.0:
            raise ValueError(f"false_negative_threshold must be a cosine in [-1, 1], got {false_negative_threshold}")
        if hardest is not None and hardest < 1:
            raise ValueError(f"hardest must be >= 1, got {hardest}")
        self.encoder = MomentumEncoder(model, momentum)
        self.queues = {"positive": KeyQueue(queue_size), "anchor": KeyQueue(queue_size)}
        self.queue_size = queue_size
        self.false_negative_threshold = false_negative_threshold
        self.hardest = hardest
        self._init_scale(init_temperature, learnable_temperature, max_logit_scale, symmetric)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        training = self._begin_step(features)
        keys = self._keys_of(self.encoder.embed(self._key_columns(features)))
        queries = embed_columns(self.model, self._query_columns(features))
        loss = self.loss_from_queries_and_keys(queries, keys, logit_scale=self.logit_scale)
        if training:
            self.enqueue(keys)
        return loss

    def _begin_step(self, features: list[dict[str, Tensor]]) -> bool:
        """Check the columns, clamp the temperature and, when training (gradients on), move the momentum
        copy one EMA step; returns whether this is a training step (its keys then join the queue)."""
        _split_columns(features)
        self._clamp_log_scale_()
        training = torch.is_grad_enabled()
        if training:
            self.encoder.update()
        return training

    def _query_columns(self, features: list[T]) -> list[T]:
        return features[:2] if self.symmetric else features[:1]

    def _key_columns(self, features: list[T]) -> list[T]:
        return features if self.symmetric else features[1:]

    def _keys_of(self, embedded: list[Tensor]) -> Keys:
        if self.symmetric:
            return Keys(embedded[0], embedded[1], embedded[2:])
        return Keys(None, embedded[0], embedded[1:])

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        raise TypeError("MomentumQueueLoss embeds its keys with the momentum encoder: call it on features")

    def _gather(self, tensor: Tensor) -> Tensor:
        return gather_with_grad(tensor.detach(), self._rank_world()[1])

    def loss_from_queries_and_keys(self, queries: list[Tensor], keys: Keys, logit_scale: Tensor) -> Tensor:
        """Anchor queries against positive keys (and back, if symmetric); the queues are read, not changed."""
        rank, world_size = self._rank_world()
        options: dict[str, Any] = {
            "false_negative_threshold": self.false_negative_threshold,
            "hardest": self.hardest,
            "rank": rank,
            "world_size": world_size,
        }
        loss = momentum_queue_info_nce(
            queries[0],
            keys.positive,
            self.queues["positive"].keys(keys.positive),
            logit_scale,
            negatives=keys.negatives,
            gathered=Gathered(None, self._gather(keys.positive), [self._gather(n) for n in keys.negatives]),
            **options,
        )
        if self.symmetric:
            assert keys.anchor is not None  # symmetric: the anchor column has keys too
            back = momentum_queue_info_nce(
                queries[1],
                keys.anchor,
                self.queues["anchor"].keys(keys.anchor),
                logit_scale,
                gathered=Gathered(None, self._gather(keys.anchor), []),
                **options,
            )
            loss = (loss + back) / 2
        return loss

    def enqueue(self, keys: Keys) -> None:
        """This batch's keys (every rank's) into the queues, after the loss that used the old ones."""
        self.queues["positive"].push(F.normalize(self._gather(keys.positive), dim=-1))
        if keys.anchor is not None:
            self.queues["anchor"].push(F.normalize(self._gather(keys.anchor), dim=-1))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "queue_size": self.queue_size,
            "momentum": self.encoder.momentum,
            "false_negative_threshold": self.false_negative_threshold,
            "hardest": self.hardest,
            **self._scale_config(),
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{he2020moco,
    title={Momentum Contrast for Unsupervised Visual Representation Learning},
    author={Kaiming He and Haoqi Fan and Yuxin Wu and Saining Xie and Ross Girshick},
    booktitle={CVPR},
    year={2020},
    eprint={1911.05722},
    archivePrefix={arXiv},
}
"""


class CachedMomentumQueueLoss(CachedLossMixin, MomentumQueueLoss):
    """:class:`MomentumQueueLoss` with GradCache: the queries are embedded in mini-batches twice
    (without, then with gradients), the keys once, in mini-batches, without gradients.

    Reference: Gao et al. 2021 (GradCache) on top of MoCo. Same loss and gradients as the plain
    loss; the learnable temperature's gradient is re-attached through a zero-valued surrogate term,
    as in :class:`~trainer.losses.CachedSymmetricInfoNCELoss`.
    """

    def __init__(self, model: nn.Module, mini_batch_size: int = 32, show_progress_bar: bool = False, **options: Any):
        super().__init__(model, **options)
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar
        self._keys: Keys | None = None
        self._pending_scale_grad: Tensor | None = None

    def _embed_keys(self, features: list[dict[str, Tensor]]) -> Keys:
        """Momentum keys mini-batch by mini-batch (no gradients: only one chunk's activations live)."""
        keys = []
        for feature in features:
            chunks = [
                self.encoder.embed([_create_minibatch(feature, begin, end)])[0]
                for begin, end in _minibatch_ranges(feature, self.mini_batch_size)
            ]
            keys.append(torch.cat(chunks))
        return self._keys_of(keys)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        features = list(sentence_features)
        training = self._begin_step(features)
        keys = self._keys = self._embed_keys(self._key_columns(features))
        self._pending_scale_grad = None
        try:
            loss = self.forward_cached(self._query_columns(features), labels)
        finally:
            self._keys = None
        scale_grad, self._pending_scale_grad = self._pending_scale_grad, None
        if scale_grad is not None:
            surrogate = (_synced(self.log_logit_scale) * scale_grad).sum()
            loss = loss + (surrogate - surrogate.detach())
        if training:
            self.enqueue(keys)
        return loss

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        queries = [torch.cat(column) for column in reps]
        assert self._keys is not None  # set by forward around forward_cached
        if not with_backward:
            return self.loss_from_queries_and_keys(queries, self._keys, self.logit_scale)
        log_scale = self.log_logit_scale.detach().requires_grad_(self.learnable_temperature)
        loss = self.loss_from_queries_and_keys(queries, self._keys, self._scale_from_log(log_scale))
        loss.backward()
        if self.learnable_temperature and log_scale.grad is not None:
            self._pending_scale_grad = log_scale.grad
        return loss.detach()

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}
