"""What a search tells its caller besides the hits: that the pinned model is untrained (the
`X-Duet-Warning` embeddings responses carry too), and an empty query in plain words. On both
collection backends (tests/integration/backends.py)."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture()
def http(backend_http):
    """This module's client talks to the contract server of the backend under test."""
    return backend_http


@pytest.fixture()
def collection(http):
    def make(model: str) -> str:
        name = f"feedback-{uuid.uuid4().hex[:8]}"
        http.post("/v1/collections", json={"name": name, "model": model}).raise_for_status()
        http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "a", "text": "a guitar"}]}).raise_for_status()
        made.append(name)
        return name

    made: list[str] = []
    yield make
    for name in made:
        http.delete(f"/v1/collections/{name}")


def test_search_warns_when_the_pinned_model_is_untrained(http, collection):
    untrained = http.post(f"/v1/collections/{collection('minilm-dual')}/search", json={"query": {"text": "music"}})
    assert untrained.status_code == 200
    assert untrained.headers["x-duet-warning"] == "minilm-dual/1 is untrained"
    embeddings = http.post("/v1/embeddings", json={"input": "music", "model": "minilm-dual"})
    assert embeddings.headers["x-duet-warning"] == untrained.headers["x-duet-warning"]
    trained = http.post(f"/v1/collections/{collection('minilm')}/search", json={"query": {"text": "music"}})
    assert trained.status_code == 200 and "x-duet-warning" not in trained.headers


def test_an_empty_query_is_called_empty(http, collection):
    name = collection("minilm")
    single = http.post(f"/v1/collections/{name}/search", json={"query": {"text": ""}})
    assert single.status_code == 400
    error = single.json()["error"]
    assert error["message"].startswith("the query is empty") and error["param"] == "query", error
    batch = http.post(f"/v1/collections/{name}/search", json={"queries": [{"text": "x"}, {"text": ""}]})
    assert batch.json()["error"]["message"].startswith("query 2 (queries[1]) is empty")
