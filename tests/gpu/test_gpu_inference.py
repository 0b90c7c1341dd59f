"""GPU paths: run on a machine with CUDA (`pytest -m gpu`); skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.encoder import Encoder
from tests.helpers import cosine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text and images into one vector space.",
    " ".join(["long"] * 400),
]


def test_bf16_text_inference_matches_fp32(minilm_path):
    fp32 = Encoder.load(minilm_path, device="cpu", dtype="float32")
    bf16 = Encoder.load(minilm_path, device="cuda", dtype="auto")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    got = bf16.encode(TEXTS, "text")
    assert got.dtype == np.float32
    assert cosine(got, fp32.encode(TEXTS, "text")).min() >= 0.999


def test_bf16_image_inference_matches_fp32(tmp_path, minilm_path):
    from encoders.dual import build_dual_encoder

    build_dual_encoder(minilm_path).save(str(tmp_path / "dual"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)) for _ in range(8)]
    fp32 = Encoder.load(tmp_path / "dual", device="cpu", dtype="float32")
    bf16 = Encoder.load(tmp_path / "dual", device="cuda", dtype="bfloat16")
    assert cosine(bf16.encode(images, "image"), fp32.encode(images, "image")).min() >= 0.999
