"""Packed (unpadded) text inference equals the model's own padded encode, and is used only where it fits."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from encoders.encoder import Encoder
from encoders.packing import PackedText, pack_spans
from tests.helpers import cosine

# Lengths from one token to past the model's limit, so packs mix sizes and one text is truncated.
TEXTS = [
    "hi",
    "A man is playing a guitar.",
    "A woman is slicing an onion with a very sharp knife in a small kitchen.",
    "Zebras!",
    " ".join(["embedding"] * 600),
    "Two dogs run along the beach while the sun sets behind them.",
    "ok",
    "The stock market fell sharply on Monday after the announcement, then recovered.",
]


def test_pack_spans_fill_packs_in_order_and_give_a_long_text_its_own():
    assert pack_spans([3, 4, 5, 9, 2], 10) == [(0, 2, 0, 7), (2, 3, 7, 12), (3, 4, 12, 21), (4, 5, 21, 23)]
    assert pack_spans([20], 10) == [(0, 1, 0, 20)]
    assert pack_spans([], 10) == []


@pytest.fixture(scope="module")
def packed_minilm(minilm_path) -> Encoder:
    return Encoder.load(minilm_path, device="cpu", packing="auto", pack_tokens=64)


def test_packed_vectors_match_sentence_transformers_encode(packed_minilm, reference_model):
    assert packed_minilm.packed is not None
    vectors = packed_minilm.encode(TEXTS, "text")
    expected = reference_model.encode(TEXTS, normalize_embeddings=True)
    assert vectors.shape == (len(TEXTS), 384)
    assert cosine(vectors, expected).min() > 0.99999


def test_minilm_runs_traced_and_an_untraceable_model_runs_eagerly(minilm_path, reference_model, monkeypatch):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    traced, why = PackedText.build(model, 64)
    assert traced is not None and "(traced)" in why

    def untraceable(self):
        raise RuntimeError("this model does not trace")

    monkeypatch.setattr(PackedText, "trace", untraceable)
    eager, why = PackedText.build(model, 64)
    assert eager is not None and "(eager)" in why
    expected = reference_model.encode(TEXTS, convert_to_tensor=True)
    for packed in (traced, eager):
        assert cosine(packed.encode(TEXTS).numpy(), expected.numpy()).min() > 0.99999


def test_packing_is_off_unless_asked_and_auto_means_the_cpu(minilm_path):
    assert Encoder.load(minilm_path, device="cpu").packed is None
    assert Encoder.load(minilm_path, device="cpu", packing="off").packed is None


def test_cls_pooling_and_roberta_positions_pass_the_check(tmp_path, minilm_path):
    """The two layouts other than BERT + mean that the packer claims to handle."""
    from sentence_transformers import SentenceTransformer

    from encoders.tiny import build_tiny_text_model

    folder = build_tiny_text_model(minilm_path, tmp_path, architecture="roberta", pooling="cls")
    model = SentenceTransformer(str(folder), device="cpu")
    packed, why = PackedText.build(model, pack_tokens=48)
    assert packed is not None, why
    assert packed.position_offset == model.tokenizer.pad_token_id + 1
    assert packed.check(TEXTS) < 1e-5


def test_models_it_does_not_fit_keep_the_padded_path(tmp_path, minilm_path):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from encoders.dual import ImageTowerConfig, build_dual_encoder

    dual = build_dual_encoder(minilm_path, ImageTowerConfig(image_size=32, patch_size=8, width=64, layers=1, heads=2))
    assert PackedText.build(dual, 256) == (None, "the model is not Transformer + Pooling")
    max_pooled = SentenceTransformer(
        modules=[Transformer(str(minilm_path), max_seq_length=32), Pooling(384, "max")], device="cpu"
    )
    packed, why = PackedText.build(max_pooled, 256)
    assert packed is None and "pooling 'max'" in why


def test_a_packed_forward_that_disagrees_is_refused(minilm_path, monkeypatch):
    """The load-time check is what guards every model: break the mask and it must say no."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    monkeypatch.setattr(PackedText, "__init__", _without_position_restart(PackedText.__init__))
    packed, why = PackedText.build(model, 256)
    assert packed is None and "differ from padded" in why


def _without_position_restart(init):
    def broken(self, model, pack_tokens):
        init(self, model, pack_tokens)
        self.position_offset = 7  # every text's positions shifted: vectors change

    return broken


def test_concurrent_encodes_from_many_threads_agree_with_one_at_a_time(packed_minilm):
    """The batcher runs several forward passes at once; tokenisers are not thread-safe."""
    expected = packed_minilm.encode(TEXTS, "text")
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(5):
                results.append(packed_minilm.encode(TEXTS, "text"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for got in results:
        np.testing.assert_allclose(got, expected, atol=1e-5)
