"""What a search request and answer look like on the wire, on both backends (the collection contract,
tests/integration/backends.py): base64 float32 vectors as /v1/embeddings emits them, `include` choosing
the fields of each hit, and bad vectors refused with a 400 that names the query."""

from __future__ import annotations

import base64
import uuid

import numpy as np
import pytest

DIM = 8


def b64(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def unit_vectors(n: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def vectors(backend_http):
    """A vector-only collection of 40 items, half upserted as floats and half as base64."""
    name = "w" + uuid.uuid4().hex[:10]
    assert backend_http.post("/v1/collections", json={"name": name, "dimension": DIM}).status_code == 201
    data = unit_vectors(40, seed=0)
    items = [
        {"id": f"v{i}", "vector": b64(v) if i % 2 else v.tolist(), "payload": {"n": i}} for i, v in enumerate(data)
    ]
    upserted = backend_http.put(f"/v1/collections/{name}/items", json={"items": items})
    assert upserted.status_code == 200, upserted.text
    return name, data


def search(http, name, **body):
    response = http.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_base64_vectors_answer_as_floats_do(backend_http, vectors):
    name, data = vectors
    queries = unit_vectors(3, seed=1)
    as_floats = search(backend_http, name, queries=[{"vector": q.tolist()} for q in queries], k=5)
    as_base64 = search(backend_http, name, queries=[{"vector": b64(q)} for q in queries], k=5)
    assert [[h["id"] for h in row] for row in as_base64] == [[h["id"] for h in row] for row in as_floats]
    scores = np.array([[h["score"] for h in row] for row in as_base64])
    assert np.allclose(scores, [[h["score"] for h in row] for row in as_floats], atol=1e-6)
    stored = search(backend_http, name, query={"vector": b64(data[7])}, k=1)  # an item upserted as base64
    assert stored[0]["id"] == "v7" and stored[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_an_embedding_in_base64_passes_straight_through(backend_http):
    name = "w" + uuid.uuid4().hex[:10]
    assert backend_http.post("/v1/collections", json={"name": name, "model": "minilm"}).status_code == 201
    texts = {"guitar": "A man is playing a guitar.", "soup": "The chef cooks a vegetable soup."}
    items = [{"id": k, "text": t} for k, t in texts.items()]
    assert backend_http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    embedded = backend_http.post(
        "/v1/embeddings", json={"model": "minilm", "input": "someone plays guitar", "encoding_format": "base64"}
    )
    assert embedded.status_code == 200, embedded.text
    vector = embedded.json()["data"][0]["embedding"]
    by_vector = search(backend_http, name, query={"vector": vector}, k=2)
    by_text = search(backend_http, name, query={"text": "someone plays guitar"}, k=2)
    assert [h["id"] for h in by_vector] == [h["id"] for h in by_text] == ["guitar", "soup"]
    assert by_vector[0]["score"] == pytest.approx(by_text[0]["score"], abs=1e-5)


def test_include_chooses_the_fields_of_each_hit(backend_http, vectors):
    name, data = vectors
    query = {"vector": b64(data[3])}
    default = search(backend_http, name, query=query, k=3)
    assert [list(h) for h in default] == [["id", "score", "payload", "modality", "content"]] * 3  # today's answer
    assert default[0]["id"] == "v3" and default[0]["payload"] == {"n": 3} and default[0]["content"] is None
    bare = search(backend_http, name, query=query, k=3, include=[])
    assert [list(h) for h in bare] == [["id", "score", "modality"]] * 3
    assert [(h["id"], h["score"]) for h in bare] == [(h["id"], h["score"]) for h in default]
    with_vector = search(backend_http, name, query=query, k=3, include=["vector", "payload"])
    assert list(with_vector[0]) == ["id", "score", "payload", "modality", "vector"]
    assert np.allclose(with_vector[0]["vector"], data[3], atol=1e-6)  # stored normalised: these already are
    assert with_vector[0]["payload"] == {"n": 3}


BAD_VECTORS = [
    ("not base64", "not base64!", "not base64"),
    ("wrong length", base64.b64encode(b"\x00" * 12).decode(), "decodes to 12 bytes"),
    ("one byte a value", base64.b64encode(b"\x01" * DIM).decode(), "quantised output_dtype"),
    ("NaN", base64.b64encode(np.array([np.nan] + [0.5] * (DIM - 1), "<f4").tobytes()).decode(), "NaN"),
    ("infinity", base64.b64encode(np.array([np.inf] + [0.5] * (DIM - 1), "<f4").tobytes()).decode(), "infinity"),
    ("zero", base64.b64encode(np.zeros(DIM, "<f4").tobytes()).decode(), "zero vector"),
]


@pytest.mark.parametrize(("vector", "says"), [c[1:] for c in BAD_VECTORS], ids=[c[0] for c in BAD_VECTORS])
def test_bad_vectors_are_refused_naming_the_query(backend_http, vectors, vector, says):
    name, data = vectors
    queries = [{"vector": b64(data[0])}, {"vector": data[1].tolist()}, {"vector": vector}]
    response = backend_http.post(f"/v1/collections/{name}/search", json={"queries": queries})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_vector" and error["param"] == "queries[2].vector", error
    assert says in error["message"] and "queries[2].vector" in error["message"], error
    upsert = backend_http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "bad", "vector": vector}]})
    assert upsert.status_code == 400 and upsert.json()["error"]["param"] == "items[0].vector", upsert.text


def test_a_wrong_dimension_among_float_queries_is_named(backend_http, vectors):
    name, data = vectors
    queries = [{"vector": data[0].tolist()}, {"vector": [0.5, 0.5]}]
    response = backend_http.post(f"/v1/collections/{name}/search", json={"queries": queries})
    assert response.status_code == 400 and response.json()["error"]["param"] == "queries[1].vector", response.text


def test_include_refuses_unknown_fields(backend_http, vectors):
    name, data = vectors
    response = backend_http.post(
        f"/v1/collections/{name}/search", json={"query": {"vector": b64(data[0])}, "include": ["score"]}
    )
    assert response.status_code == 400, response.text
