from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from encoders.contract import VectorContract
from encoders.encoder import Encoder
from encoders.errors import ModelLoadError, UnsupportedModalityError
from tests.helpers import cosine


@pytest.fixture(scope="module")
def minilm(minilm_path) -> Encoder:
    return Encoder.load(minilm_path, device="cpu")


def test_contract_is_derived_from_the_model(minilm):
    c = minilm.contract
    assert (c.dimension, c.normalized, c.similarity, c.modalities, c.max_seq_length) == (
        384,
        True,
        "cosine",
        ("text",),
        256,
    )
    assert "256 tokens" in c.preprocessing["text"]


def test_token_counts_report_truncation_and_match_the_forward_pass(minilm, reference_model):
    long_text = " ".join(["embedding"] * 600)
    counts = minilm.count_tokens(["hello world", long_text])
    assert counts[0] == (4, False)
    assert counts[1] == (256, True)
    vectors = minilm.encode(["hello world", long_text], "text")
    expected = reference_model.encode(["hello world", long_text], normalize_embeddings=True)
    assert cosine(vectors, expected).min() > 0.9999


def test_text_only_model_refuses_images(minilm):
    with pytest.raises(UnsupportedModalityError):
        minilm.encode([Image.new("RGB", (8, 8))], "image")


def test_dual_encoder_round_trips_through_plain_sentence_transformers(tmp_path, minilm_path, reference_model):
    from sentence_transformers import SentenceTransformer

    from encoders.dual import ImageTowerConfig, build_dual_encoder

    model = build_dual_encoder(minilm_path, ImageTowerConfig(image_size=32, patch_size=8, width=64, layers=1, heads=2))
    model.save(str(tmp_path / "dual"))
    encoder = Encoder.load(tmp_path / "dual", device="cpu")
    assert encoder.contract.modalities == ("text", "image")
    assert encoder.contract.image_size == 32 and encoder.contract.dimension == 384
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (20, 60), (0, 0, 255))]
    image_vectors = encoder.encode(images, "image")
    assert image_vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, rtol=1e-5)
    assert cosine(image_vectors[0], image_vectors[1])[0] < 0.9999  # different images, different vectors
    # The text tower is all-MiniLM-L6-v2 unchanged until trained.
    text = encoder.encode(["a red square"], "text")
    assert cosine(text, reference_model.encode(["a red square"]))[0] > 0.9999
    # Plain sentence-transformers loads the same folder and agrees.
    plain = SentenceTransformer(str(tmp_path / "dual"), device="cpu")
    assert cosine(plain.encode(images), image_vectors).min() > 0.9999


def test_manifest_contract_mismatch_is_refused(minilm_path):
    wrong = VectorContract(dimension=768, normalized=True, similarity="cosine", modalities=("text",))
    with pytest.raises(ModelLoadError, match="768"):
        Encoder.load(minilm_path, device="cpu", contract=wrong)


def test_a_folder_that_is_not_a_model_fails_with_one_error_type(tmp_path):
    (tmp_path / "modules.json").write_text("not json")
    with pytest.raises(ModelLoadError):
        Encoder.load(tmp_path, device="cpu")


def test_tiny_model_from_config_loads_through_the_same_code(tiny_model_dir):
    encoder = Encoder.load(tiny_model_dir, device="cpu")
    assert encoder.contract.dimension == 32
    assert encoder.encode(["hi", "there"], "text").shape == (2, 32)
