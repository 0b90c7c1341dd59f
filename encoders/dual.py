"""Text+image dual encoders built from sentence-transformers modules.

A dual encoder here is one `SentenceTransformer` whose first module is a `Router` that
sends text to a text tower and images to an image tower, both ending in the same vector
space, followed by `Normalize`. Using the library's own modules (not a custom class) means
the saved folder loads with plain `SentenceTransformer(path)` and trains with the plain
sentence-transformers trainer.

The default image tower is a small CLIP vision transformer built from a config, with no
download: random weights until the trainer aligns it to the text tower. Its image
processor is transformers' PIL backend, so no torchvision is needed.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


@dataclass(frozen=True)
class ImageTowerConfig:
    """Architecture of the from-scratch image tower; recorded in the manifest's lineage."""

    image_size: int = 64
    patch_size: int = 8
    width: int = 256
    layers: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    seed: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _write_vision_tower(config: ImageTowerConfig, folder: Path) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(config.seed)
    vision = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=config.width,
            intermediate_size=config.width * config.mlp_ratio,
            num_hidden_layers=config.layers,
            num_attention_heads=config.heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
        )
    )
    vision.save_pretrained(folder)
    CLIPImageProcessorPil(
        size={"shortest_edge": config.image_size},
        crop_size={"height": config.image_size, "width": config.image_size},
    ).save_pretrained(folder)
    return folder


def build_dual_encoder(text_model: str | Path, image_tower: ImageTowerConfig | None = None) -> SentenceTransformer:
    """A text tower (any sentence-transformers text model) plus a fresh image tower.

    The text route keeps the text model's own modules and pooling, so text vectors equal the
    text model's until training moves them. The image route is vision transformer -> mean
    pooling -> linear projection to the text dimension.
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules.normalize import Normalize
    from sentence_transformers.sentence_transformer.modules import Dense, Pooling, Router, Transformer

    image_tower = image_tower or ImageTowerConfig()
    text = SentenceTransformer(str(text_model), device="cpu")
    text_modules = [m for m in text.children() if not isinstance(m, Normalize)]
    dimension = text.get_embedding_dimension()
    if dimension is None:
        raise ValueError(f"text model {text_model} does not report its embedding dimension")
    with tempfile.TemporaryDirectory() as tmp:
        vision = Transformer(str(_write_vision_tower(image_tower, Path(tmp))))
    torch.manual_seed(image_tower.seed + 1)
    image_modules = [
        vision,
        Pooling(image_tower.width, "mean"),
        Dense(image_tower.width, dimension, activation_function=torch.nn.Identity()),
    ]
    router = Router(
        # Router's annotation asks for sentence-transformers' Module subclass; children() is typed
        # as torch's Module. These are the text model's own modules, passed on unchanged.
        sub_modules={"text": text_modules, "image": image_modules},  # type: ignore[dict-item]
        default_route="text",
        route_mappings={(None, "text"): "text", (None, "image"): "image"},
    )
    return SentenceTransformer(modules=[router, Normalize()], device="cpu")
