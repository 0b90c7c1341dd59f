"""What the official `openai` client sees: model objects with OpenAI's fields, and a malformed or
misspelled request answered 400 (its `BadRequestError`) in OpenAI's error shape, as OpenAI answers it."""

from __future__ import annotations

import openai
import pytest


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_retrieves_a_model_with_openais_fields(client, http):
    model = client.models.retrieve("minilm")
    assert model.id == "minilm" and model.object == "model" and model.owned_by == "duet"
    assert model.created > 1_600_000_000  # the version's registration time, in seconds
    raw = http.get("/v1/models/minilm").json()
    assert raw["ref"] == "minilm/1" and raw["version"] == 1  # Duet's fields stay beside OpenAI's
    assert http.get("/v1/models/minilm/versions/1").json()["id"] == "minilm/1"


def test_model_list_has_registration_times(client):
    models = client.models.list().data
    assert models and all(m.created > 1_600_000_000 for m in models)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "minilm"}, "input"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": "x", "dimensions": "big"}, "dimensions"),
    ],
)
def test_malformed_fields_are_openai_400s(http, body, param):
    response = http.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["code"] == "invalid_request_body"


def test_openai_client_gets_bad_request_error(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="minilm", input="x", extra_body={"modle": "minilm"})
    assert caught.value.status_code == 400
    assert "modle" in caught.value.message


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/collections", "/v1/collections/any/search"])
def test_invalid_json_says_the_body_is_not_json(http, path):
    response = http.post(path, content=b'{"input": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] is None and "not valid JSON" in error["message"], error


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/embeddings", {"input": "x", "modle": "minilm"}),
        ("POST", "/v1/collections", {"name": "typo", "modle": "minilm"}),
        ("PUT", "/v1/models/minilm/aliases/staging", {"version": 1, "modle": "x"}),
        ("POST", "/v1/collections/any/search", {"query": {"text": "x", "modle": "x"}}),
        ("POST", "/v1/jobs", {"config": {}, "modle": "x"}),
    ],
)
def test_unknown_body_keys_are_refused_by_name(http, method, path, body):
    response = http.request(method, path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    param = "query.modle" if "query" in body else "modle"  # a nested key is named by its path
    assert error["param"] == param and f"unknown parameter '{param}'" in error["message"], error


def test_every_key_the_openai_client_sends_is_accepted(client):
    response = client.embeddings.create(model="minilm", input=["a", "b"], dimensions=64, user="u-1")
    assert len(response.data) == 2 and len(response.data[0].embedding) == 64
