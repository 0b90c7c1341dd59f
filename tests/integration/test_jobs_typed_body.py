"""POST /v1/jobs documents its `config` as trainer.config.TrainConfig (every field, in /openapi.json
and so in /docs), while a bad config is still one 422 `invalid_training_config` that lists every
problem (shape, cross-field and what only the API checks), and the job keeps the config as sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.helpers import make_settings
from trainer.config import DatasetSpec, LossSpec, TrainConfig


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    from service.app import create_app

    settings = make_settings(
        tmp_path_factory.mktemp("typed") / "data", preload_models=[], register_default_models=False, local_worker=False
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    assert ref.startswith("#/components/schemas/"), ref
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_openapi_shows_every_field_of_the_training_config_under_the_jobs_body(client):
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    config = _resolve(spec, _resolve(spec, body)["properties"]["config"])
    assert set(config["properties"]) == set(TrainConfig.model_fields)
    assert set(config["required"]) == {"base_model", "train", "output"}
    assert config["properties"]["batch_size"]["exclusiveMinimum"] == 0  # bounds come along
    train = config["properties"]["train"]
    assert train["minItems"] == 1
    dataset = _resolve(spec, train["items"])
    assert set(dataset["properties"]) == set(DatasetSpec.model_fields)
    assert dataset["properties"]["path"]["description"].startswith("JSONL, CSV/TSV")  # help text too
    loss = _resolve(spec, config["properties"]["loss"])
    assert set(loss["properties"]) == set(LossSpec.model_fields)
    schemas = spec["components"]["schemas"]
    assert all(ref.rsplit("/", 1)[1] in schemas for ref in _refs(spec))  # every $ref resolves


def test_a_bad_config_is_one_422_listing_every_problem(client):
    config = {"base_model": "/srv/models/x", "train": [], "output": {"name": "tuned"}, "batch_size": 0, "seed": "x"}
    response = client.post("/v1/jobs", json={"config": config})
    assert response.status_code == 422
    assert response.json()["error"] == {
        "message": "invalid training config: train: List should have at least 1 item after validation, not 0; "
        "batch_size: Input should be greater than 0; seed: Input should be a valid integer, unable to parse "
        "string as an integer; base_model: '/srv/models/x' is a server path; name a registry model "
        "(e.g. 'minilm@production')",
        "type": "invalid_request_error",
        "code": "invalid_training_config",
        "param": "config",
    }


def test_the_config_body_is_a_json_object_or_a_400(client):
    response = client.post("/v1/jobs", json={"config": ["not", "an", "object"]})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request_body"
    assert response.json()["error"]["param"] == "config"


def test_the_job_keeps_the_config_as_it_was_sent(client):
    dataset = client.post("/v1/datasets", params={"filename": "pairs.csv"}, content=b"anchor,positive\na,b\n")
    config = {
        "base_model": "org/model",
        "train": [{"path": dataset.json()["path"]}],
        "output": {"name": "tuned"},
        "epochs": 1,
    }
    created = client.post("/v1/jobs", json={"config": config})
    assert created.status_code == 201, created.text
    assert created.json()["config"] == config  # no defaults filled in
    assert type(created.json()["config"]["epochs"]) is int  # as sent, not the model's 1.0
    assert client.get(f"/v1/jobs/{created.json()['id']}").json()["config"] == config


@pytest.mark.parametrize("compat", ["/srv/models/old", {"model": "../old", "map": True}])
def test_a_compat_model_from_the_api_is_a_registry_model_not_a_server_path(client, compat):
    dataset = client.post("/v1/datasets", params={"filename": "pairs.csv"}, content=b"anchor,positive\na,b\n")
    config = {
        "base_model": "org/model",
        "train": [{"path": dataset.json()["path"]}],
        "output": {"name": "tuned"},
        "compatible_with": compat,
    }
    response = client.post("/v1/jobs", json={"config": config})
    assert response.status_code == 422, response.text
    old = compat if isinstance(compat, str) else compat["model"]
    assert response.json()["error"]["message"] == (
        f"invalid training config: compatible_with.model: {old!r} is a server path; name a registry model "
        "(e.g. 'minilm@production')"
    )
