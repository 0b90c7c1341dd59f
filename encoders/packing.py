"""Packed (unpadded) text inference: a batch's texts run as rows of concatenated tokens.

Why: a padded batch computes every position up to its longest text, and on a CPU a padded
position costs as much as a real one. Requests from many clients rarely share a length, and
a server can only sort what is waiting, so padding ate about a third of the forward pass
under many one-text requests (bench/serve.py). Packing concatenates texts into one sequence
of up to `pack_tokens` tokens, restarts position ids at each text, and masks attention to a
block diagonal so each text sees only its own tokens: every text gets the arithmetic of a
forward pass on its own (equal to float rounding), and no position is padding. The price is
attention across the whole pack, which the block mask discards; packs of a few hundred tokens
keep it small next to the dense layers (256 measured best for MiniLM on 2 cores).

This is what text-embeddings-inference does with variable-length flash attention; here it
runs through the model's own attention with a 4D mask, so it needs no extra kernels.

The encoder is traced to TorchScript where it traces (any pack length runs the same graph):
a traced call runs all its layers without the GIL, where eager PyTorch takes the GIL back
between every one of its ~200 operations, so worker threads and the event loop stop queueing
behind each other (two workers in one process, a third thread busy: 241-271 -> 285-306
texts/s). A model that does not trace, or whose traced vectors fail the check, runs eagerly.

Only models laid out as `[Transformer(text), Pooling(mean or cls), modules that read the
sentence embedding]` qualify, and each one must pass `check` against its own padded
`SentenceTransformer.encode` before it is used; anything else keeps the padded path.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)

# Texts that exercise the check: one word, typical sentences, repeated tokens, punctuation,
# and one far over any model's limit (truncation must match too).
PROBE_TEXTS = (
    "hi",
    "A man is playing a guitar on the stage.",
    "The quick brown fox jumps over the lazy dog, twice; then it rests.",
    "Zebras!",
    "embedding " * 12,
    "Ünïcödé façade — naïve café, 東京 and emoji 🎸.",
    "long " * 600,
)
# Largest accepted 1 - cosine between packed and padded vectors: float rounding in fp32, and
# the rounding of 16-bit weights and activations otherwise (both sides round differently).
CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5}
HALF_PRECISION_TOLERANCE = 2e-3
_POOLING_MODES = ("mean", "cls")
_PER_TOKEN_FEATURES = ("input_ids", "token_type_ids")


class PackedText:
    """Embeds text batches of one sentence-transformers model without padding."""

    def __init__(self, model: SentenceTransformer, pack_tokens: int) -> None:
        """Only for a model `_unsupported` passes (`build` checks): else ValueError."""
        from sentence_transformers.sentence_transformer.modules import Pooling

        modules = list(model.children())
        pooling, network = modules[1], _network(modules[0])
        if network is None or not isinstance(pooling, Pooling) or not isinstance(pooling.pooling_mode, str):
            raise ValueError(f"cannot pack this model: {_unsupported(model) or 'not Transformer + Pooling'}")
        self.model = model
        self.pooling_mode: str = pooling.pooling_mode
        self.after_pooling = modules[2:]
        self.network = network
        self.pack_tokens = pack_tokens
        self.position_offset = _position_offset(self.network)
        self._accepts = set(inspect.signature(self.network.forward).parameters)
        self._traced: torch.jit.ScriptModule | None = None
        self._checked = ""  # what the last passing check measured, for the load log line

    @classmethod
    def build(cls, model: SentenceTransformer, pack_tokens: int) -> tuple[PackedText | None, str]:
        """A packed runner for `model` (traced if it can be), or None and the reason it cannot have one."""
        reason = _unsupported(model)
        if reason:
            return None, reason
        packed = cls(model, pack_tokens)
        try:
            packed.trace()
        except Exception as exc:  # untraceable: eager packing may still do
            logger.info("packed encoder not traced (%s: %s); running it eagerly", type(exc).__name__, exc)
        problem = packed._problem()
        if problem and packed._traced is not None:
            logger.info("traced packed encoder failed its check (%s); trying it eagerly", problem)
            packed._traced = None
            problem = packed._problem()
        if problem:
            return None, problem
        how = "traced" if packed._traced is not None else "eager"
        return packed, f"packed text inference on ({how}), {pack_tokens} tokens a pack ({packed._checked})"

    def trace(self) -> None:
        """Trace the encoder on a small two-text pack; `check` then proves it on other lengths."""
        example = self._pack_inputs(self._example_tokens(), [3, 5])[0]
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks
            self._traced = torch.jit.trace(_LastHidden(self.network, list(example)), tuple(example.values()))

    def _example_tokens(self) -> dict[str, torch.Tensor]:
        features = self.model.preprocess(["a b", "a b c d"])
        keep = features["attention_mask"].bool()
        return {k: features[k][keep][:8] for k in self._token_features(features)}

    def _problem(self) -> str:
        """Why the packed vectors cannot be used (empty when they can); sets `_checked`."""
        try:
            gap = self.check()
        except Exception as exc:  # any failure means: keep the padded path
            return f"packed forward failed ({type(exc).__name__}: {exc})"
        dtype = next(self.network.parameters()).dtype
        if gap > CHECK_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE):
            return f"packed vectors differ from padded ones (1 - cosine = {gap:.1e})"
        self._checked = f"1 - cosine = {gap:.1e} on probes"
        return ""

    def check(self, texts: Sequence[str] = PROBE_TEXTS) -> float:
        """Largest 1 - cosine between packed vectors and the model's own padded encode."""
        with torch.inference_mode():
            padded = self.model.encode(
                list(texts), batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False
            )
            packed = self.encode(texts)
        cosine = torch.nn.functional.cosine_similarity(packed.float(), padded.float(), dim=-1)
        return float(1.0 - cosine.min())

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings of `texts`, in order (tokenised by the model's own preprocessing,
        so truncation, casing and special tokens are its own)."""
        with torch.inference_mode():
            return self.forward(self.model.preprocess(list(texts)))

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        """Sentence embeddings from the model's padded preprocessing output, one pass per pack."""
        keep = features["attention_mask"].bool()
        lengths = keep.sum(dim=1).tolist()
        tokens = {k: features[k][keep] for k in self._token_features(features)}
        pooled = []
        for first, last, start, end in pack_spans(lengths, self.pack_tokens):
            pack = {k: v[start:end] for k, v in tokens.items()}
            pooled.append(self._forward_pack(pack, lengths[first:last]))
        out: dict[str, Any] = {"sentence_embedding": torch.cat(pooled)}
        for module in self.after_pooling:
            out = module(out)
        embeddings: torch.Tensor = out["sentence_embedding"]
        return embeddings

    def _token_features(self, features: dict[str, Any]) -> list[str]:
        return [k for k in _PER_TOKEN_FEATURES if k in features and k in self._accepts]

    def _pack_inputs(
        self, tokens: dict[str, torch.Tensor], lengths: list[int]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder's inputs for one pack (a batch of one sequence), and where its texts lie."""
        parameter = next(self.network.parameters())
        device, dtype = parameter.device, parameter.dtype
        sizes = torch.tensor(lengths)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        positions = torch.arange(int(sizes.sum())) - starts[segment] + self.position_offset
        same_text = segment[:, None] == segment[None, :]
        mask = torch.zeros(same_text.shape, dtype=dtype).masked_fill_(~same_text, torch.finfo(dtype).min)
        inputs = {k: v.unsqueeze(0) for k, v in tokens.items()}
        inputs |= {"position_ids": positions.unsqueeze(0), "attention_mask": mask[None, None]}
        return {k: v.to(device) for k, v in inputs.items()}, segment.to(device), starts.to(device), sizes.to(device)

    def _forward_pack(self, tokens: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        inputs, segment, starts, sizes = self._pack_inputs(tokens, lengths)
        hidden: torch.Tensor  # modules' calls are typed Any
        if self._traced is not None:
            hidden = self._traced(*inputs.values())[0]
        else:
            hidden = self.network(**inputs).last_hidden_state[0]
        if self.pooling_mode == "cls":
            return hidden[starts]
        dtype = hidden.dtype
        hidden = hidden.float()  # accumulate in fp32, as sentence-transformers' pooling does
        sums = torch.zeros(len(lengths), hidden.shape[-1], device=hidden.device).index_add_(0, segment, hidden)
        return (sums / sizes[:, None]).to(dtype)


class _LastHidden(torch.nn.Module):
    """The encoder as a call on positional tensors (what tracing takes), returning its last hidden state."""

    def __init__(self, network: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.network = network
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.network(**dict(zip(self.names, tensors, strict=True))).last_hidden_state
        return hidden


def pack_spans(lengths: Sequence[int], pack_tokens: int) -> list[tuple[int, int, int, int]]:
    """Consecutive texts grouped into packs of at most `pack_tokens` tokens (a longer text
    gets a pack of its own): (first text, end text, first token, end token) per pack."""
    spans = []
    first = start = total = 0
    for index, length in enumerate(lengths):
        if index > first and total + length > pack_tokens:
            spans.append((first, index, start, start + total))
            first, start, total = index, start + total, 0
        total += length
    if lengths:
        spans.append((first, len(lengths), start, start + total))
    return spans


def _unsupported(model: SentenceTransformer) -> str:
    """Why `model`'s layout cannot be packed; empty when it can."""
    from sentence_transformers.base.modules.transformer import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    modules = list(model.children())
    if len(modules) < 2 or not isinstance(modules[0], Transformer) or not isinstance(modules[1], Pooling):
        return "the model is not Transformer + Pooling"
    transformer, pooling = modules[0], modules[1]
    if list(transformer.modalities) != ["text"]:
        return "the transformer is not text-only"
    if pooling.pooling_mode not in _POOLING_MODES or not pooling.include_prompt:
        return f"pooling {pooling.pooling_mode!r} is not one of {', '.join(_POOLING_MODES)}"
    network = _network(transformer)
    if network is None or getattr(network.config, "is_decoder", False):
        return "the transformer is not a bidirectional encoder"
    if "position_ids" not in inspect.signature(network.forward).parameters:
        return "the encoder takes no position ids"
    return ""


def _network(transformer: torch.nn.Module) -> torch.nn.Module | None:
    """The Hugging Face model inside a sentence-transformers Transformer module."""
    network = getattr(transformer, "model", None) or getattr(transformer, "auto_model", None)
    return network if isinstance(network, torch.nn.Module) else None


def _position_offset(network: torch.nn.Module) -> int:
    """Where position ids start: 0, or after the padding index for RoBERTa-style learned positions."""
    for module in network.modules():
        padding_idx = getattr(module, "padding_idx", None)
        learned = isinstance(getattr(module, "position_embeddings", None), torch.nn.Embedding)
        if learned and isinstance(padding_idx, int):
            return padding_idx + 1
    return 0
