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

Only models laid out as `[Transformer(text), Pooling(mean or cls), modules that read the
sentence embedding]` qualify, and each one must pass `check` against its own padded
`SentenceTransformer.encode` before it is used; anything else keeps the padded path.
"""

from __future__ import annotations

import inspect
import logging
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
        modules = list(model.children())
        self.model = model
        self.transformer = modules[0]
        self.pooling_mode: str = modules[1].pooling_mode
        self.after_pooling = modules[2:]
        self.network = _network(self.transformer)
        self.pack_tokens = pack_tokens
        self.position_offset = _position_offset(self.network)
        self._accepts = set(inspect.signature(self.network.forward).parameters)

    @classmethod
    def build(cls, model: SentenceTransformer, pack_tokens: int) -> tuple[PackedText | None, str]:
        """A packed runner for `model`, or None and the reason it cannot have one."""
        reason = _unsupported(model)
        if reason:
            return None, reason
        packed = cls(model, pack_tokens)
        try:
            gap = packed.check()
        except Exception as exc:  # any failure means: keep the padded path
            return None, f"packed forward failed ({type(exc).__name__}: {exc})"
        dtype = next(packed.network.parameters()).dtype
        if gap > CHECK_TOLERANCE.get(dtype, HALF_PRECISION_TOLERANCE):
            return None, f"packed vectors differ from padded ones (1 - cosine = {gap:.1e})"
        return packed, f"packed text inference on, {pack_tokens} tokens a pack (1 - cosine = {gap:.1e} on probes)"

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
        return self.forward(self.model.preprocess(list(texts)))

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        """Sentence embeddings from the model's padded preprocessing output, one pass per pack."""
        keep = features["attention_mask"].bool()
        lengths = keep.sum(dim=1).tolist()
        tokens = {k: features[k][keep] for k in _PER_TOKEN_FEATURES if k in features and k in self._accepts}
        pooled = []
        for first, last, start, end in pack_spans(lengths, self.pack_tokens):
            pack = {k: v[start:end] for k, v in tokens.items()}
            pooled.append(self._forward_pack(pack, lengths[first:last]))
        out: dict[str, Any] = {"sentence_embedding": torch.cat(pooled)}
        for module in self.after_pooling:
            out = module(out)
        return out["sentence_embedding"]

    def _forward_pack(self, tokens: dict[str, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        device = next(self.network.parameters()).device
        sizes = torch.tensor(lengths)
        segment = torch.repeat_interleave(torch.arange(len(lengths)), sizes)
        starts = torch.cumsum(sizes, 0) - sizes
        positions = torch.arange(int(sizes.sum())) - starts[segment] + self.position_offset
        dtype = next(self.network.parameters()).dtype
        same_text = segment[:, None] == segment[None, :]
        mask = torch.zeros(same_text.shape, dtype=dtype).masked_fill_(~same_text, torch.finfo(dtype).min)
        inputs = {k: v.unsqueeze(0).to(device) for k, v in tokens.items()}
        hidden = self.network(
            **inputs, position_ids=positions.unsqueeze(0).to(device), attention_mask=mask[None, None].to(device)
        ).last_hidden_state[0]
        if self.pooling_mode == "cls":
            return hidden[starts.to(device)]
        hidden = hidden.float()  # accumulate in fp32, as sentence-transformers' pooling does
        sums = torch.zeros(len(lengths), hidden.shape[-1], device=device).index_add_(0, segment.to(device), hidden)
        return (sums / sizes.to(device)[:, None]).to(dtype)


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


def _network(transformer) -> torch.nn.Module | None:
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
