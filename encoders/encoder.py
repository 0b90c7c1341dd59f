"""Load and run one sentence-transformers encoder, text-only or text+image.

`Encoder` is the one object the service and the trainer hold for a model: it owns the
`SentenceTransformer`, knows the model's `VectorContract`, counts tokens the way the model
truncates them, and embeds already-validated inputs. Hub ids and local folders load through
the same call (sentence-transformers resolves both), so users with internet pass hub ids and
tests pass folders.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from encoders.contract import Modality, VectorContract
from encoders.errors import ModelLoadError, UnsupportedModalityError

if TYPE_CHECKING:
    from PIL.Image import Image
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.transformer import Transformer
    from tokenizers import Tokenizer

    from encoders.packing import PackedText
    from encoders.runtime import RuntimeForward

logger = logging.getLogger(__name__)

_MODALITIES: tuple[Modality, ...] = ("text", "image")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str = "auto") -> str:
    """`auto` means the first CUDA device when one is present, else the CPU."""
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> torch.dtype:
    """`auto` means bf16 on CUDA (fp16 where bf16 is missing) and fp32 on the CPU."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_sentence_transformer(source: str | Path, device: str = "cpu") -> SentenceTransformer:
    """Load a model folder or hub id; one error type for every way it can fail."""
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(source), device=device)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load encoder from {source!s}: {exc}") from exc


def _text_transformer(model: SentenceTransformer) -> Transformer | None:
    """The Transformer module that tokenises text, wherever it sits (top level or in a Router)."""
    from sentence_transformers.base.modules.transformer import Transformer

    for module in model.modules():
        if isinstance(module, Transformer) and "text" in module.modalities and module.tokenizer is not None:
            return cast("Transformer", module)  # isinstance does not narrow: see _image_transformer
    return None


def _image_transformer(model: SentenceTransformer) -> Transformer | None:
    from sentence_transformers.base.modules.transformer import Transformer

    for module in model.modules():
        if isinstance(module, Transformer) and "image" in module.modalities:
            # sentence-transformers decorates Transformer.__init__ without types, so mypy sees the
            # class object as Any and the isinstance above does not narrow `module`.
            return cast("Transformer", module)
    return None


def _image_size(module: object) -> int | None:
    """Side of the square the image processor crops to (dicts and transformers' SizeDict)."""
    processor = getattr(module, "processor", None)
    for size in (getattr(processor, "crop_size", None), getattr(processor, "size", None)):
        if size is None:
            continue
        get = size.get if isinstance(size, dict) else lambda key, s=size: getattr(s, key, None)
        for key in ("height", "shortest_edge", "width"):
            value = get(key)
            if value:
                return int(value)
    return None


def describe(model: SentenceTransformer, matryoshka_dims: Sequence[int] = ()) -> VectorContract:
    """Derive the vector contract from the loaded model itself, never from its name."""
    from sentence_transformers.base.modules.normalize import Normalize

    modalities = tuple(m for m in _MODALITIES if model.supports(m))
    if not modalities:
        raise ModelLoadError("model supports neither text nor image inputs")
    text = _text_transformer(model)
    image = _image_transformer(model)
    preprocessing: dict[str, str] = {}
    if text is not None:
        preprocessing["text"] = f"{type(text.tokenizer).__name__}, truncation at {text.max_seq_length} tokens"
    if image is not None:
        preprocessing["image"] = (
            f"{type(image.processor).__name__}: RGB, resize + centre crop to {_image_size(image)} px, "
            "normalise by the processor's mean/std"
        )
    dimension = model.get_embedding_dimension()
    if not dimension:
        raise ModelLoadError("model does not report its embedding dimension")
    return VectorContract(
        dimension=dimension,
        normalized=any(isinstance(m, Normalize) for m in model.children()),
        # sentence-transformers also knows "manhattan", which no contract promises: pydantic
        # refuses it here (ValidationError), as it always has.
        similarity=model.similarity_fn_name,  # type: ignore[arg-type]
        modalities=modalities,
        max_seq_length=text.max_seq_length if text is not None else None,
        image_size=_image_size(image) if image is not None else None,
        preprocessing=preprocessing,
        matryoshka_dims=tuple(sorted(d for d in matryoshka_dims if 0 < d < dimension)),
    )


def _token_counter(tokenizer: Any) -> Tokenizer | None:
    """A private copy of the fast (Rust) tokenizer, without truncation or padding, for counting
    tokens on the event loop: calling the transformers wrapper cost a quarter of the loop's busy
    time under many small requests, and a separate copy cannot collide with the batcher thread's
    tokenizer (the Rust object refuses concurrent mutation). None for slow tokenizers."""
    import copy

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    counter: Tokenizer = copy.deepcopy(backend)
    counter.no_truncation()
    counter.no_padding()
    return counter


class Encoder:
    """A loaded encoder: embeds validated inputs and reports token counts and truncation."""

    def __init__(
        self,
        model: SentenceTransformer,
        contract: VectorContract,
        device: str,
        packed: PackedText | None = None,
        runtime: RuntimeForward | None = None,
    ) -> None:
        self.model = model
        self.contract = contract
        self.device = device
        self.packed = packed  # when set, text batches run unpadded (encoders/packing.py)
        # when set, the first (Transformer) module runs in ONNX Runtime / OpenVINO (encoders/runtime.py)
        self.runtime = runtime
        # A tokeniser call may reconfigure the shared Rust tokeniser (truncation, padding), which
        # refuses a second caller meanwhile: preprocessing takes turns (it is a small part of a
        # batch); forward passes may run in several threads at once.
        self._preprocessing = threading.Lock()
        self._text = _text_transformer(model)
        self._counter = _token_counter(self._text.tokenizer) if self._text is not None else None

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        contract: VectorContract | None = None,
        packing: str = "off",
        pack_tokens: int = 256,
    ) -> Encoder:
        """Load a folder or hub id. A contract from the registry is checked against the model.

        `packing`: "auto" packs text batches on the CPU (where padding costs as much as real
        tokens), "on" everywhere, "off" never; packing is used only for models it suits and
        whose packed vectors match their padded ones (encoders/packing.py).
        """
        device = pick_device(device)
        model = load_sentence_transformer(source, device=device)
        model.eval()
        torch_dtype = pick_dtype(dtype, device)
        if torch_dtype != torch.float32:
            model.to(torch_dtype)
        derived = describe(model, contract.matryoshka_dims if contract else ())
        if contract is not None and not contract.is_compatible_with(derived):
            raise ModelLoadError(
                f"model at {source!s} produces {derived.dimension}-d vectors "
                f"(normalised={derived.normalized}), but its manifest promises {contract.dimension}-d "
                f"(normalised={contract.normalized})"
            )
        packed = None
        if packing == "on" or (packing == "auto" and device.split(":")[0] == "cpu"):
            from encoders.packing import PackedText

            packed, why = PackedText.build(model, pack_tokens)
            logger.info("%s: %s", source, why if packed else f"padded text inference ({why})")
        return cls(model, contract or derived, device, packed)

    @property
    def max_seq_length(self) -> int | None:
        return self._text.max_seq_length if self._text is not None else None

    def count_tokens(self, texts: Sequence[str]) -> list[tuple[int, bool]]:
        """Tokens each text will use after truncation, and whether it was truncated.

        Counts include the special tokens the model adds, like the tokenizer itself does, so
        `usage.prompt_tokens` matches what the forward pass really saw.
        """
        if self._text is None:
            raise UnsupportedModalityError("this model has no text tower")
        limit = self.max_seq_length or 10**9
        if self._counter is not None:
            lengths = [len(e.ids) for e in self._counter.encode_batch_fast(list(texts), add_special_tokens=True)]
        else:
            tokenizer = self._text.tokenizer
            assert tokenizer is not None  # _text_transformer picks a Transformer that has one
            ids = tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False)
            lengths = [len(seq) for seq in ids["input_ids"]]
        return [(min(n, limit), n > limit) for n in lengths]

    def encode(self, inputs: Sequence[str] | Sequence[Image], modality: Modality) -> np.ndarray:
        """Embed one batch of inputs of one modality; float32 rows in input order.

        Safe to call from several threads at once: what `SentenceTransformer.encode` does for
        one batch (preprocess, move to the device, forward), with the preprocessing serialised.
        """
        from sentence_transformers.util import batch_to_device

        if not self.contract.accepts(modality):
            raise UnsupportedModalityError(f"this model embeds {', '.join(self.contract.modalities)}, not {modality}")
        with self._preprocessing:
            features = self.model.preprocess(list(inputs))
        with torch.inference_mode():
            if self.runtime is not None:
                vectors = self._runtime_forward(features)
            elif modality == "text" and self.packed is not None:
                vectors = self.packed.forward(features)
            else:
                vectors = self.model(batch_to_device(features, self.model.device))["sentence_embedding"]
        return vectors.float().cpu().numpy()

    def _runtime_forward(self, features: dict[str, Any]) -> torch.Tensor:
        """The runtime's token embeddings, then the version's own modules after its Transformer."""
        assert self.runtime is not None
        features["token_embeddings"] = self.runtime(features)
        for module in list(self.model.children())[1:]:
            features = module(features)
        return cast("torch.Tensor", features["sentence_embedding"])

    def memory_bytes(self) -> int:
        """Bytes held by parameters and buffers: the quantity the service's budget counts (with a
        runtime: its weights, plus the torch modules after the transformer, whose own are dropped)."""
        modules = list(self.model.children())[1:] if self.runtime is not None else [self.model]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        held = sum(t.numel() * t.element_size() for t in tensors)
        return held + (self.runtime.memory_bytes() if self.runtime is not None else 0)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        self.model.save(str(path))
        return path
