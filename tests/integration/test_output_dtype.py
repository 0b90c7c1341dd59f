"""Quantised embeddings out of /v1/embeddings, from the real MiniLM: the bytes equal
sentence-transformers' quantize_embeddings on the stored calibration, base64 round-trips, bad
values are 400s, and the float/OpenAI path is untouched."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from sentence_transformers.util.quantization import quantize_embeddings

from encoders.calibration_texts import CALIBRATION_TEXTS
from registry.calibration import read_calibration
from service.quantized_output import decode_sample, truncate_and_normalize
from tests.helpers import cosine, png_data_uri

TEXTS = ["A man is playing a guitar.", "Ein Mann spielt Gitarre.", "The cat sleeps on the mat.", "short"]
NUMPY = {"int8": np.int8, "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}


def _embed(http, **fields) -> dict:
    response = http.post("/v1/embeddings", json={"model": "minilm", "input": TEXTS, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def _calibration(server) -> np.ndarray:
    info = server.state.registry.resolve("minilm")
    stored = read_calibration(info)
    assert stored is not None and stored.ref == "minilm/1" and stored.count == len(CALIBRATION_TEXTS)
    return decode_sample(stored)


@pytest.mark.parametrize("dimensions", [None, 128])
@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_quantised_vectors_equal_sentence_transformers(http, server, dtype, dimensions):
    extra = {"dimensions": dimensions} if dimensions else {}
    quantised = _embed(http, output_dtype=dtype, **extra)
    floats = np.array([d["embedding"] for d in _embed(http, **extra)["data"]], dtype=np.float32)
    calibration = _calibration(server)
    if dimensions:
        calibration = truncate_and_normalize(calibration, dimensions)
    expected = quantize_embeddings(floats, precision=dtype, calibration_embeddings=calibration)
    got = np.array([d["embedding"] for d in quantised["data"]], dtype=NUMPY[dtype])
    np.testing.assert_array_equal(got, expected)
    width = dimensions or 384
    assert got.shape == (len(TEXTS), width // 8 if dtype.endswith("binary") else width)
    assert quantised["output_dtype"] == dtype and quantised["model"] == "minilm/1"
    assert quantised["usage"] == _embed(http)["usage"]


def test_the_calibration_is_minilm_on_the_built_in_sample(server, http, reference_model):
    _embed(http, output_dtype="int8")  # calibrates on first use, if no earlier test did
    expected = reference_model.encode(list(CALIBRATION_TEXTS), normalize_embeddings=True)
    assert cosine(_calibration(server), expected).min() >= 0.9999


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_base64_packs_one_byte_per_value(http, dtype):
    as_ints = _embed(http, output_dtype=dtype)["data"]
    as_base64 = _embed(http, output_dtype=dtype, encoding_format="base64")["data"]
    for ints, packed in zip(as_ints, as_base64):
        raw = base64.b64decode(packed["embedding"])
        assert len(raw) == len(ints["embedding"]) == (48 if dtype.endswith("binary") else 384)
        np.testing.assert_array_equal(np.frombuffer(raw, dtype=NUMPY[dtype]), ints["embedding"])


def test_cohere_name_gives_the_same_answer(http):
    voyage = _embed(http, output_dtype="binary")
    assert _embed(http, embedding_types=["binary"]) == voyage
    assert _embed(http, embedding_types="binary") == voyage


def test_explicit_float_is_the_default_answer_plus_its_dtype(http):
    default = _embed(http)
    assert "output_dtype" not in default  # the OpenAI shape, exactly as before
    explicit = _embed(http, output_dtype="float")
    assert explicit.pop("output_dtype") == "float" and explicit == default
    default_b64 = _embed(http, encoding_format="base64")
    explicit_b64 = _embed(http, encoding_format="base64", embedding_types="float")
    assert explicit_b64.pop("output_dtype") == "float" and explicit_b64 == default_b64


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"output_dtype": "int4"}, "output_dtype", "'ubinary'"),
        ({"output_dtype": 8}, "output_dtype", "'int8'"),
        ({"output_dtype": "int8", "embedding_types": ["int8"]}, "embedding_types", "send only one"),
        ({"embedding_types": ["int8", "float"]}, "embedding_types", "one per request"),
        ({"embedding_types": "base64"}, "embedding_types", "not supported; send one of float, int8"),
    ],
)
def test_bad_dtypes_are_400s_naming_the_field(http, fields, param, says):
    response = http.post("/v1/embeddings", json={"model": "minilm", "input": "x", **fields})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and says in error["message"], error


def test_openai_client_gets_ints_through_extra_body(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    # The client asks for base64 float32 by default and decodes it as floats; ask for JSON ("float")
    # to receive the int8 values themselves.
    response = client.embeddings.create(
        model="minilm", input=TEXTS[:2], encoding_format="float", extra_body={"output_dtype": "int8"}
    )
    assert len(response.data) == 2 and len(response.data[0].embedding) == 384
    assert all(float(v).is_integer() and -128 <= v <= 127 for v in response.data[0].embedding)
    plain = client.embeddings.create(model="minilm", input=TEXTS[:2])  # its default path, unchanged
    assert len(plain.data[0].embedding) == 384 and not all(float(v).is_integer() for v in plain.data[0].embedding)


def test_dual_encoder_images_use_its_text_calibration(http, server):
    inputs = ["a red square", png_data_uri(color=(255, 0, 0)), png_data_uri(color=(0, 0, 255))]
    body = {"model": "minilm-dual", "input": inputs}
    floats = http.post("/v1/embeddings", json=body).json()["data"]
    quantised = http.post("/v1/embeddings", json={**body, "output_dtype": "uint8"})
    assert quantised.status_code == 200, quantised.text
    assert quantised.json()["model"] == "minilm-dual/1"
    stored = read_calibration(server.state.registry.resolve("minilm-dual"))
    assert stored is not None and stored.ref == "minilm-dual/1"  # its own, from text
    expected = quantize_embeddings(
        np.array([d["embedding"] for d in floats], dtype=np.float32),
        precision="uint8",
        calibration_embeddings=decode_sample(stored),
    )
    got = np.array([d["embedding"] for d in quantised.json()["data"]], dtype=np.uint8)
    np.testing.assert_array_equal(got, expected)
