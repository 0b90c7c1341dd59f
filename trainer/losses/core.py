"""Contrastive losses in the sentence-transformers loss contract.

The maths lives in plain functions of embeddings alone (:func:`symmetric_info_nce`,
:func:`sigmoid_pairwise_loss`, :func:`debiased_contrastive`), testable without a model. The
``nn.Module`` wrappers only embed the input columns, read their own hyperparameters and call them.

Conventions shared by every loss here:

* Batch columns are ``(anchor, positive, negative_1, ..., negative_n)``; each becomes an embedding
  tensor of shape ``[B, D]``. Embeddings are L2-normalised inside the losses (cosine similarity).
* Candidates ("columns") of anchor ``i`` are all positives of the batch plus all explicit hard
  negatives of the batch; the positive of anchor ``i`` sits at column ``offset + i``.
* Distributed negatives: the functions take an explicit ``rank`` and ``world_size``. With
  ``world_size > 1`` the candidate columns are gathered from every rank *with gradients*
  (open_clip's ``gather_with_grad``), the rows stay this rank's own samples, and the labels are
  offset by ``rank * B``. Per-rank batch sizes must be equal (use ``dataloader_drop_last=True``).
  Semantics: each rank's loss is the mean over its own ``B`` rows, so the *mean over ranks* of the
  per-rank losses equals the single-process loss on the union batch. Autograd through the gather
  sums every rank's contribution into the owner's embeddings, so one rank's embedding gradient is
  ``world_size`` times the union-batch gradient; DDP's averaging of parameter gradients divides that
  back out, and the model gradients equal the union-batch gradients exactly.
* Learnable scalars (temperature, SigLIP bias) are parameters *of the loss module*. The
  sentence-transformers trainer optimises ``loss.named_parameters()`` (which includes the model), so
  they are trained without extra work, but the trainer must exclude them from weight decay (see
  :func:`no_weight_decay_parameter_names`). DDP wraps only the model, never the loss, so these
  modules average their own scalar gradients across ranks whenever ``torch.distributed`` is
  initialised with more than one process. The Transformers trainer clips (``max_grad_norm``) the
  model's gradients only; the loss's scalars are not clipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sentence_transformers.base.losses.gradcache import CachedLossMixin, has_static_embedding_input
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss
from sentence_transformers.util import all_gather_with_grad, get_rank, get_world_size
from torch import Tensor, nn

__all__ = [
    "CachedSymmetricInfoNCELoss",
    "DebiasedContrastiveLoss",
    "Gathered",
    "SigmoidLoss",
    "SymmetricInfoNCELoss",
    "debiased_contrastive",
    "gather_with_grad",
    "matryoshka",
    "no_weight_decay_parameter_names",
    "sigmoid_pairwise_loss",
    "symmetric_info_nce",
]


# --------------------------------------------------------------------------------------------
# Distributed plumbing
# --------------------------------------------------------------------------------------------


T = TypeVar("T")


class Gathered(NamedTuple):
    """Candidate tensors from all ranks, each ``[world_size * B, D]``, rank-major.

    ``anchors`` is only needed by the positive->anchor direction of :func:`symmetric_info_nce`
    and may be ``None`` elsewhere.
    """

    anchors: Tensor | None
    positives: Tensor
    negatives: list[Tensor]


def gather_with_grad(tensor: Tensor, world_size: int) -> Tensor:
    """All-gather ``tensor`` (``[B, ...]``) from every rank into ``[world_size * B, ...]``, rank-major.

    The gather is differentiable: the backward pass sums every rank's gradient for a slice into
    the rank that owns it (open_clip's ``gather_with_grad``; sentence-transformers'
    ``all_gather_with_grad``). ``world_size == 1`` returns ``tensor`` itself.
    """
    if world_size == 1:
        return tensor
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"world_size={world_size} but torch.distributed is not initialised")
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    return all_gather_with_grad(tensor)


def _gather(anchors: Tensor | None, positives: Tensor, negatives: Sequence[Tensor], world_size: int) -> Gathered:
    return Gathered(
        None if anchors is None else gather_with_grad(anchors, world_size),
        gather_with_grad(positives, world_size),
        [gather_with_grad(negative, world_size) for negative in negatives],
    )


def _distributed_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class _AverageGradAcrossRanks(torch.autograd.Function):
    """Identity forward; the backward all-reduces the gradient and divides by the world size.

    DDP averages the gradients of the model it wraps, but the trainer never wraps the loss, so
    a loss-owned scalar (the temperature) would otherwise drift apart on each rank.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


def _synced(parameter: Tensor) -> Tensor:
    if parameter.requires_grad and _distributed_world_size() > 1:
        # torch leaves autograd.Function.apply untyped (it forwards *args to the subclass's forward).
        synced: Tensor = _AverageGradAcrossRanks.apply(parameter)  # type: ignore[no-untyped-call]
        return synced
    return parameter


# --------------------------------------------------------------------------------------------
# The maths: plain functions of embeddings
# --------------------------------------------------------------------------------------------


def _split_columns(embeddings: Sequence[T]) -> tuple[T, T, list[T]]:
    if len(embeddings) < 2:
        raise ValueError(f"expected (anchor, positive, negative_1, ...) columns, got {len(embeddings)} column(s)")
    return embeddings[0], embeddings[1], list(embeddings[2:])


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank={rank} for world_size={world_size}")


def _normalise(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [F.normalize(tensor, p=2, dim=-1) for tensor in tensors]


def _resolve_columns(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    rank: int,
    world_size: int,
    gathered: Gathered | None,
    need_anchors: bool,
) -> Gathered:
    """The (normalised) candidate columns: given, gathered from all ranks, or just the local ones."""
    _check_rank(rank, world_size)
    if gathered is None:
        return _gather(anchors if need_anchors else None, positives, negatives, world_size)
    expected = world_size * anchors.size(0)
    given_anchors = gathered.anchors if need_anchors else None
    if need_anchors and given_anchors is None:
        raise ValueError("gathered.anchors is required for the positive->anchor direction")
    if len(gathered.negatives) != len(negatives):
        raise ValueError(f"gathered has {len(gathered.negatives)} negative columns, the batch {len(negatives)}")
    columns = [gathered.positives, *gathered.negatives] + ([given_anchors] if given_anchors is not None else [])
    if any(column.size(0) != expected for column in columns):
        raise ValueError(f"gathered tensors must have world_size * B = {expected} rows (equal batches per rank)")
    anchors_all = F.normalize(given_anchors, dim=-1) if given_anchors is not None else None
    return Gathered(anchors_all, F.normalize(gathered.positives, dim=-1), _normalise(gathered.negatives))


def _candidates(columns: Gathered) -> Tensor:
    return torch.cat([columns.positives, *columns.negatives], dim=0)


def _info_nce_rows(
    row_anchors: Tensor,
    row_positives: Tensor,
    columns: Gathered,
    label_offset: int,
    logit_scale: Tensor,
    symmetric: bool,
) -> Tensor:
    """Per-row symmetric InfoNCE of normalised rows against normalised columns, shape ``[rows]``."""
    labels = torch.arange(label_offset, label_offset + row_anchors.size(0), device=row_anchors.device)
    # anchor -> candidates: all positives, then all hard negatives, as columns.
    anchor_logits = logit_scale * row_anchors @ _candidates(columns).T
    loss = F.cross_entropy(anchor_logits, labels, reduction="none")
    if symmetric:
        # positive -> anchors: over the anchors only (hard negatives have no anchor to rank).
        assert columns.anchors is not None  # resolved with need_anchors=symmetric
        positive_logits = logit_scale * row_positives @ columns.anchors.T
        loss = (loss + F.cross_entropy(positive_logits, labels, reduction="none")) / 2
    return loss


def symmetric_info_nce(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    logit_scale: Tensor,
    *,
    symmetric: bool = True,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """Symmetric InfoNCE with in-batch and hard negatives (CLIP; ALIGN).

    References: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP); Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
    Learning With Noisy Text Supervision" (ALIGN); van den Oord et al. 2018 (InfoNCE).

    With cosine similarities ``s`` and ``scale = logit_scale`` (``1 / temperature``)::

        L_a2c(i) = -log softmax_j(scale * s(a_i, c_j))[i]   c = [all positives, all hard negatives]
        L_p2a(i) = -log softmax_j(scale * s(p_i, a_j))[i]   over all anchors (no hard negatives)
        loss = mean_i (L_a2c(i) + L_p2a(i)) / 2             (symmetric=False: mean_i L_a2c(i))

    Args:
        anchors, positives: ``[B, D]`` embeddings of this rank (normalised here).
        negatives: hard-negative columns, each ``[B, D]``; may be empty.
        logit_scale: the *multiplier* ``1 / temperature`` (already exponentiated and clamped),
            a scalar tensor, differentiable if learnable.
        symmetric: add the positive->anchor direction (CLIP); else anchor->candidates only.
        rank, world_size: this process's place among the data-parallel ranks. With
            ``world_size > 1`` the columns are all-gathered with gradients unless ``gathered``
            is given, and labels are offset by ``rank * B``.
        gathered: the columns from all ranks (rank-major, ``[world_size * B, D]`` each), e.g. to
            test without a process group; normalised here.

    Returns:
        The mean over this rank's ``B`` rows. The mean of this over ranks is the union-batch loss.
    """
    anchors, positives, *negatives = _normalise([anchors, positives, *negatives])
    columns = _resolve_columns(anchors, positives, negatives, rank, world_size, gathered, need_anchors=symmetric)
    offset = rank * anchors.size(0)
    return _info_nce_rows(anchors, positives, columns, offset, logit_scale, symmetric).mean()


def sigmoid_pairwise_loss(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """Pairwise sigmoid loss (SigLIP).

    Reference: Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training".

    Every (anchor, candidate) pair is an independent binary problem, no softmax::

        z_ij = +1 if candidate j is anchor i's positive else -1   (hard negatives: -1 columns)
        loss = -(1 / B) * sum_i sum_j log sigmoid(z_ij * (scale * s(a_i, c_j) + bias))

    ``logit_scale`` is the multiplier ``t = exp(t')`` (SigLIP initialises ``t' = log 10``, bias
    ``-10``). Distributed semantics as in :func:`symmetric_info_nce`: the rows are this rank's
    anchors, the columns every rank's candidates, divided by the local ``B``, so the mean over
    ranks is the union-batch loss (all pairs of the global batch, divided by the global batch size).
    """
    anchors, positives, *negatives = _normalise([anchors, positives, *negatives])
    columns = _resolve_columns(anchors, positives, negatives, rank, world_size, gathered, need_anchors=False)
    batch_size = anchors.size(0)
    logits = logit_scale * anchors @ _candidates(columns).T + logit_bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(batch_size, device=logits.device)
    signs[rows, rank * batch_size + rows] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch_size


def debiased_contrastive(
    anchors: Tensor,
    positives: Tensor,
    negatives: list[Tensor],
    *,
    temperature: float = 0.05,
    tau_plus: float = 0.1,
    rank: int = 0,
    world_size: int = 1,
    gathered: Gathered | None = None,
) -> Tensor:
    """Debiased contrastive loss (Chuang et al. 2020).

    Reference: Chuang, Robinson, Yen-Chen, Torralba, Jegelka 2020, "Debiased Contrastive
    Learning" (NeurIPS), eq. (5)/(6) and the authors' code.

    For anchor ``i`` with positive logit ``pos = s(a_i, p_i) / t`` and the ``N`` other candidates
    ``u_k`` (all other in-batch positives plus all hard negatives) treated as unlabelled samples
    that are false negatives with class prior ``tau_plus``::

        g = max( (mean_k exp(s(a_i, u_k) / t) - tau_plus * exp(pos)) / (1 - tau_plus),  e^{-1/t} )
        loss_i = -log( exp(pos) / (exp(pos) + N * g) )

    The clamp at ``e^{-1/t}`` is the smallest value ``exp(s / t)`` can take for unit vectors, so
    the estimator never goes below its theoretical minimum. ``tau_plus = 0`` recovers InfoNCE
    (anchor->candidates). Computed in log space, so small temperatures do not overflow. The paper
    uses the SimCLR ``2B``-view batch; here the rows are the anchors of the
    ``(anchor, positive, negatives...)`` convention. Distributed semantics as in
    :func:`symmetric_info_nce`.
    """
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors, positives, *negatives = _normalise([anchors, positives, *negatives])
    columns = _resolve_columns(anchors, positives, negatives, rank, world_size, gathered, need_anchors=False)
    batch_size = anchors.size(0)
    logits = anchors @ _candidates(columns).T / temperature  # [B, M]
    rows = torch.arange(batch_size, device=logits.device)
    own = rank * batch_size + rows
    positive_logits = logits[rows, own]
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative[rows, own] = False
    num_negatives = logits.size(1) - 1
    if num_negatives < 1:
        raise ValueError("the debiased loss needs at least one negative (batch size 1 without hard negatives)")
    negative_logits = logits[is_negative].view(batch_size, num_negatives)
    log_mean_negative = torch.logsumexp(negative_logits, dim=1) - math.log(num_negatives)
    if tau_plus == 0.0:
        log_g = log_mean_negative
    else:
        # log g = log_mean_neg + log(1 - tau_plus * exp(pos - log_mean_neg)) - log(1 - tau_plus),
        # defined while the bracket is positive; otherwise the estimate is below the clamp anyway.
        log_ratio = math.log(tau_plus) + positive_logits - log_mean_negative
        bracket = (-torch.expm1(log_ratio.clamp(max=0.0))).clamp(min=torch.finfo(logits.dtype).tiny)
        log_g = log_mean_negative + torch.log(bracket) - math.log1p(-tau_plus)
        log_g = torch.where(log_ratio < 0, log_g, torch.full_like(log_g, -math.inf))
    log_g = log_g.clamp(min=-1.0 / temperature)
    loss = -positive_logits + torch.logaddexp(positive_logits, math.log(num_negatives) + log_g)
    return loss.mean()


# --------------------------------------------------------------------------------------------
# nn.Module wrappers in the sentence-transformers contract
# --------------------------------------------------------------------------------------------


class _ContrastiveLoss(nn.Module):
    """``forward(sentence_features, labels)`` -> ``compute_loss_from_embeddings(embeddings, labels)``."""

    # Names of loss-owned parameters that must not be weight-decayed.
    _no_weight_decay: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, gather_across_devices: bool) -> None:
        super().__init__()
        self.model = model
        self.gather_across_devices = gather_across_devices

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        embeddings = embed_columns(self.model, sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def _rank_world(self) -> tuple[int, int]:
        if self.gather_across_devices:
            return get_rank(), get_world_size()
        return 0, 1

    def loss_parameters(self) -> list[nn.Parameter]:
        """The parameters this loss owns itself (not the model's): what a custom training loop
        must add to its optimizer. The sentence-transformers trainer already optimises them."""
        model_ids = {id(p) for p in self.model.parameters()} if isinstance(self.model, nn.Module) else set()
        return [p for p in self.parameters() if id(p) not in model_ids]


def _log_scale_bounds(max_logit_scale: float) -> tuple[float, float]:
    # CLIP clamps the log logit scale to [0, log 100]: temperature between 0.01 and 1.
    return 0.0, math.log(max_logit_scale)


class _LearnableScale(nn.Module):
    """Mixin: a log logit-scale ``log_logit_scale`` (parameter or buffer) clamped like CLIP."""

    log_logit_scale: Tensor
    max_logit_scale: float
    init_temperature: float
    learnable_temperature: bool
    symmetric: bool
    gather_across_devices: bool  # set by _ContrastiveLoss, which every user of this mixin also is

    def _init_scale(
        self, init_temperature: float, learnable_temperature: bool, max_logit_scale: float, symmetric: bool
    ) -> None:
        """The options every learnable-temperature loss shares, and its scale."""
        self.init_temperature = float(init_temperature)
        self.learnable_temperature = learnable_temperature
        self.symmetric = symmetric
        self._register_log_scale(init_temperature, learnable_temperature, max_logit_scale)

    def _scale_config(self) -> dict[str, Any]:
        """The shared part of `get_config_dict` (the model card and saved config)."""
        return {
            "init_temperature": self.init_temperature,
            "learnable_temperature": self.learnable_temperature,
            "max_logit_scale": self.max_logit_scale,
            "symmetric": self.symmetric,
            "gather_across_devices": self.gather_across_devices,
        }

    def _register_log_scale(self, init_temperature: float, learnable: bool, max_logit_scale: float) -> None:
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        if max_logit_scale < 1:
            raise ValueError(f"max_logit_scale must be >= 1, got {max_logit_scale}")
        self.max_logit_scale = float(max_logit_scale)
        low, high = _log_scale_bounds(self.max_logit_scale)
        value = torch.tensor(min(max(math.log(1.0 / init_temperature), low), high))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def _clamp_log_scale_(self) -> None:
        """CLIP's post-step clamp, done before the forward: a value the optimizer pushed past a
        bound is put back on it, where the gradient flows again (a forward-only clamp would leave
        it stuck with zero gradient while Adam's momentum keeps pushing)."""
        low, high = _log_scale_bounds(self.max_logit_scale)
        value = float(self.log_logit_scale.detach())
        if not low <= value <= high:
            with torch.no_grad():
                self.log_logit_scale.clamp_(low, high)

    def _scale_from_log(self, log_scale: Tensor) -> Tensor:
        low, high = _log_scale_bounds(self.max_logit_scale)
        return log_scale.clamp(low, high).exp()

    @property
    def logit_scale(self) -> Tensor:
        """The multiplier ``1 / temperature`` used in the logits (clamped, differentiable)."""
        return self._scale_from_log(_synced(self.log_logit_scale))

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / logit_scale``."""
        return float(1.0 / self._scale_from_log(self.log_logit_scale.detach()))


class SymmetricInfoNCELoss(_LearnableScale, _ContrastiveLoss):
    """Symmetric InfoNCE with a learnable, clamped temperature (CLIP; ALIGN).

    Reference: Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision" (CLIP); Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
    Learning With Noisy Text Supervision" (ALIGN). See :func:`symmetric_info_nce` for the maths.

    Inputs: ``(anchor, positive)`` pairs or ``(anchor, positive, negative_1, ..., negative_n)``;
    labels are ignored. The anchor->candidates direction uses every in-batch positive and every
    hard negative; the positive->anchor direction ranks the anchors only.

    The temperature is learned as ``log_logit_scale`` (``logit_scale = exp(log_logit_scale)``,
    initialised at ``1 / init_temperature`` and clamped to ``[1, max_logit_scale]`` as in CLIP).
    It is a parameter of this loss module, not of the model; see the module docstring for what
    the trainer must do (no weight decay; optionally its own learning rate via
    ``learning_rate_mapping={r"log_logit_scale": 1e-3}``).
    """

    _no_weight_decay = ("log_logit_scale",)

    def __init__(
        self,
        model: nn.Module,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        self._init_scale(init_temperature, learnable_temperature, max_logit_scale, symmetric)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        anchors, positives, negatives = _split_columns(embeddings)
        self._clamp_log_scale_()
        rank, world_size = self._rank_world()
        return symmetric_info_nce(
            anchors,
            positives,
            negatives,
            self.logit_scale,
            symmetric=self.symmetric,
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return self._scale_config()

    @property
    def citation(self) -> str:
        return """
@inproceedings{radford2021clip,
    title={Learning Transferable Visual Models From Natural Language Supervision},
    author={Alec Radford and Jong Wook Kim and Chris Hallacy and Aditya Ramesh and Gabriel Goh and others},
    booktitle={ICML},
    year={2021},
    eprint={2103.00020},
    archivePrefix={arXiv},
}
"""


class CachedSymmetricInfoNCELoss(CachedLossMixin, SymmetricInfoNCELoss):
    """:class:`SymmetricInfoNCELoss` with GradCache: large batches in the memory of ``mini_batch_size``.

    Reference: Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under
    Memory Limited Setup" (GradCache), on top of CLIP/ALIGN's symmetric InfoNCE.

    Uses sentence-transformers' ``CachedLossMixin`` for the three GradCache steps (embed without
    gradients, loss + backward to the embeddings, re-embed mini-batch by mini-batch replaying the
    RNG state); this class provides ``calculate_loss``, which also chunks the score matrix by
    ``mini_batch_size`` rows. Same loss value and gradients as the plain loss (with the same
    dropout masks).

    The learnable temperature needs one addition the mixin does not make: ``forward_cached``
    returns a *detached* loss, so the temperature's gradient computed in step (2) is kept aside and
    re-attached through a zero-valued surrogate term ``p * g - stopgrad(p * g)``. That way it is
    scaled by whatever the outer backward hands in (gradient accumulation, fp16 loss scaling)
    exactly like the model's gradients. Under ``MatryoshkaLoss`` the temperature gradients of the
    dimensions are summed unweighted, which is exact for equal ``matryoshka_weights`` (the default;
    :func:`matryoshka` refuses unequal ones for this loss).
    """

    def __init__(
        self,
        model: nn.Module,
        init_temperature: float = 0.05,
        learnable_temperature: bool = True,
        max_logit_scale: float = 100.0,
        symmetric: bool = True,
        gather_across_devices: bool = False,
        mini_batch_size: int = 32,
        show_progress_bar: bool = False,
    ) -> None:
        super().__init__(
            model,
            init_temperature=init_temperature,
            learnable_temperature=learnable_temperature,
            max_logit_scale=max_logit_scale,
            symmetric=symmetric,
            gather_across_devices=gather_across_devices,
        )
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        if _is_sentence_transformer(model) and has_static_embedding_input(model):
            raise ValueError("a StaticEmbedding model cannot be split into mini-batches; use SymmetricInfoNCELoss")
        self.mini_batch_size = mini_batch_size
        self.show_progress_bar = show_progress_bar
        self._pending_scale_grad: Tensor | None = None

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        _split_columns(sentence_features)
        self._clamp_log_scale_()
        self._pending_scale_grad = None
        loss = self.forward_cached(sentence_features, labels)
        scale_grad, self._pending_scale_grad = self._pending_scale_grad, None
        if scale_grad is not None:
            surrogate = (_synced(self.log_logit_scale) * scale_grad).sum()
            loss = loss + (surrogate - surrogate.detach())
        return loss

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """The loss over the whole batch from the per-mini-batch embeddings, chunked by
        ``mini_batch_size`` rows; with ``with_backward``, back-propagated chunk by chunk into
        ``reps`` and returned detached (the temperature gradient is kept for :meth:`forward`)."""
        normalised = _normalise([torch.cat(column) for column in reps])
        _split_columns(normalised)
        rank, world_size = self._rank_world()
        if with_backward:
            # Leaves, so that every chunk's backward stops here and the shared graph above
            # (normalise, gather) is traversed once, at the end.
            work = [tensor.detach().requires_grad_() for tensor in normalised]
            log_scale = self.log_logit_scale.detach().requires_grad_(self.learnable_temperature)
        else:
            work = normalised
            log_scale = _synced(self.log_logit_scale)
        anchors, positives, negatives = work[0], work[1], work[2:]
        gathered = _gather(anchors if self.symmetric else None, positives, negatives, world_size)
        gathered_tensors = [t for t in (gathered.anchors, gathered.positives, *gathered.negatives) if t is not None]
        if with_backward:
            column_leaves = [tensor.detach().requires_grad_() for tensor in gathered_tensors]
            leaf_anchors = column_leaves.pop(0) if self.symmetric else None
            columns = Gathered(leaf_anchors, column_leaves[0], column_leaves[1:])
            column_leaves = [t for t in (leaf_anchors, *column_leaves) if t is not None]
        else:
            columns = gathered
        batch_size = anchors.size(0)
        total = torch.zeros((), device=anchors.device, dtype=anchors.dtype)
        for begin in range(0, batch_size, self.mini_batch_size):
            end = min(begin + self.mini_batch_size, batch_size)
            rows = _info_nce_rows(
                anchors[begin:end],
                positives[begin:end],
                columns,
                rank * batch_size + begin,
                # Per chunk: each chunk's backward frees its graph, the scale's included.
                self._scale_from_log(log_scale),
                self.symmetric,
            )
            chunk_loss = rows.sum() / batch_size
            if with_backward:
                chunk_loss.backward()
                chunk_loss = chunk_loss.detach()
            total = total + chunk_loss
        if not with_backward:
            return total
        # Columns -> (through the gather, summing every rank's share) the local normalised embeddings.
        pairs = [(t, leaf.grad) for t, leaf in zip(gathered_tensors, column_leaves) if leaf.grad is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        # Local normalised embeddings -> (through normalise and cat) the cached per-mini-batch reps.
        pairs = [(t, leaf.grad) for t, leaf in zip(normalised, work) if leaf.grad is not None]
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        if self.learnable_temperature and log_scale.grad is not None:
            grad = log_scale.grad
            self._pending_scale_grad = grad if self._pending_scale_grad is None else self._pending_scale_grad + grad
        return total

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return (
            super().citation
            + """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
}
"""
        )


class SigmoidLoss(_LearnableScale, _ContrastiveLoss):
    """Pairwise sigmoid loss with learnable scale and bias (SigLIP).

    Reference: Zhai, Mustafa, Kolesnikov, Beyer 2023, "Sigmoid Loss for Language Image
    Pre-Training". See :func:`sigmoid_pairwise_loss` for the maths. ``init_temperature=0.1``
    and ``init_bias=-10`` are the paper's ``t' = log 10``, ``b = -10``. The scale is clamped to
    ``[1, max_logit_scale]`` like CLIP's. ``learnable`` covers both the scale and the bias.
    """

    _no_weight_decay = ("log_logit_scale", "logit_bias")

    def __init__(
        self,
        model: nn.Module,
        init_temperature: float = 0.1,
        init_bias: float = -10.0,
        learnable: bool = True,
        max_logit_scale: float = 100.0,
        gather_across_devices: bool = False,
    ) -> None:
        _ContrastiveLoss.__init__(self, model, gather_across_devices)
        self.init_temperature = float(init_temperature)
        self.init_bias = float(init_bias)
        self.learnable = learnable
        self._register_log_scale(init_temperature, learnable, max_logit_scale)
        bias = torch.tensor(float(init_bias))
        if learnable:
            self.logit_bias = nn.Parameter(bias)
        else:
            self.register_buffer("logit_bias", bias)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        anchors, positives, negatives = _split_columns(embeddings)
        self._clamp_log_scale_()
        rank, world_size = self._rank_world()
        return sigmoid_pairwise_loss(
            anchors,
            positives,
            negatives,
            self.logit_scale,
            _synced(self.logit_bias),
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "init_temperature": self.init_temperature,
            "init_bias": self.init_bias,
            "learnable": self.learnable,
            "max_logit_scale": self.max_logit_scale,
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{zhai2023siglip,
    title={Sigmoid Loss for Language Image Pre-Training},
    author={Xiaohua Zhai and Basil Mustafa and Alexander Kolesnikov and Lucas Beyer},
    booktitle={ICCV},
    year={2023},
    eprint={2303.15343},
    archivePrefix={arXiv},
}
"""


class DebiasedContrastiveLoss(_ContrastiveLoss):
    """Debiased contrastive loss (Chuang et al. 2020), fixed temperature.

    Reference: Chuang, Robinson, Yen-Chen, Torralba, Jegelka 2020, "Debiased Contrastive
    Learning". See :func:`debiased_contrastive`: the negative term is corrected for the
    probability ``tau_plus`` that an in-batch "negative" shares the anchor's class, and clamped
    at ``e^{-1/t}``. ``tau_plus=0`` is plain InfoNCE.
    """

    def __init__(
        self,
        model: nn.Module,
        tau_plus: float = 0.1,
        temperature: float = 0.05,
        gather_across_devices: bool = False,
    ) -> None:
        super().__init__(model, gather_across_devices)
        if not 0.0 <= tau_plus < 1.0:
            raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.tau_plus = float(tau_plus)
        self.temperature = float(temperature)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None = None) -> Tensor:
        anchors, positives, negatives = _split_columns(embeddings)
        rank, world_size = self._rank_world()
        return debiased_contrastive(
            anchors,
            positives,
            negatives,
            temperature=self.temperature,
            tau_plus=self.tau_plus,
            rank=rank,
            world_size=world_size,
        )

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "tau_plus": self.tau_plus,
            "temperature": self.temperature,
            "gather_across_devices": self.gather_across_devices,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{chuang2020debiased,
    title={Debiased Contrastive Learning},
    author={Ching-Yao Chuang and Joshua Robinson and Lin Yen-Chen and Antonio Torralba and Stefanie Jegelka},
    booktitle={NeurIPS},
    year={2020},
    eprint={2007.00224},
    archivePrefix={arXiv},
}
"""


# --------------------------------------------------------------------------------------------
# Helpers for the trainer
# --------------------------------------------------------------------------------------------


def _is_sentence_transformer(model: Any) -> bool:
    from sentence_transformers import SentenceTransformer

    return isinstance(model, SentenceTransformer)


def matryoshka(
    loss: _ContrastiveLoss,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    n_dims_per_step: int = -1,
) -> MatryoshkaLoss:
    """Wrap one of our losses in sentence-transformers' ``MatryoshkaLoss`` over ``dims``.

    Reference: Kusupati et al. 2022, "Matryoshka Representation Learning". The loss is applied
    to the re-normalised prefixes ``embedding[:, :d]`` for each ``d`` and summed with ``weights``.
    Works with the plain losses (the model's forward is decorated) and with
    :class:`CachedSymmetricInfoNCELoss` (its ``calculate_loss`` is decorated); for the latter with
    a learnable temperature the weights must be equal (see its docstring).
    """
    dims = [int(d) for d in dims]
    if (
        isinstance(loss, CachedSymmetricInfoNCELoss)
        and loss.learnable_temperature
        and weights is not None
        and len({float(w) for w in weights}) > 1
    ):
        raise ValueError(
            "CachedSymmetricInfoNCELoss with a learnable temperature needs equal matryoshka weights: "
            "MatryoshkaLoss's cached path cannot weight the temperature gradient per dimension"
        )
    # MatryoshkaLoss is typed for a SentenceTransformer; our losses hold any nn.Module (in
    # training, the SentenceTransformer being trained).
    model = loss.model
    return MatryoshkaLoss(model, loss, dims, None if weights is None else list(weights), n_dims_per_step)  # type: ignore[arg-type]


def no_weight_decay_parameter_names(module: nn.Module) -> set[str]:
    """Names (as ``module.named_parameters()`` spells them) of our losses' learnable scalars.

    Weight decay would pull ``log_logit_scale`` towards 0 (temperature 1) and the SigLIP bias
    towards 0; CLIP and open_clip exclude them. The Transformers ``Trainer`` decays every
    parameter whose name lacks "bias"/"norm", and sentence-transformers builds its optimizer
    groups over the *loss* module (which contains the model), so a trainer subclass should do::

        class DuetTrainer(SentenceTransformerTrainer):
            def get_decay_parameter_names(self, model):
                skip = no_weight_decay_parameter_names(model)
                return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    (``model`` there is the loss module, or an ``nn.Sequential`` of the losses of a dict.)
    """
    names: set[str] = set()
    for prefix, submodule in module.named_modules():
        if not isinstance(submodule, _ContrastiveLoss):
            continue
        for name in submodule._no_weight_decay:
            if isinstance(getattr(submodule, name, None), nn.Parameter):
                names.add(f"{prefix}.{name}" if prefix else name)
    return names
