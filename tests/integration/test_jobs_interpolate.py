"""POST /v1/jobs takes the `interpolate` block (WiSE-FT) with the trainer's own validation: retain
data only from uploaded datasets, and every problem in one 422."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.helpers import make_settings


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    from service.app import create_app

    settings = make_settings(
        tmp_path_factory.mktemp("wiseft") / "data", preload_models=[], register_default_models=False, local_worker=False
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _upload(client: TestClient, name: str) -> str:
    response = client.post("/v1/datasets", params={"filename": name}, content=b"anchor,positive\na,b\nc,d\n")
    assert response.status_code == 201, response.text
    return response.json()["path"]


def _config(client: TestClient, interpolate: dict) -> dict:
    return {
        "base_model": "org/model",
        "train": [{"path": _upload(client, "train.csv")}],
        "eval": [{"path": _upload(client, "dev.csv"), "name": "dev"}],
        "output": {"name": "tuned"},
        "interpolate": interpolate,
    }


def test_openapi_documents_the_interpolate_block(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert {"alpha", "alphas", "retain", "metric", "max_retention_drop"} <= set(
        schemas["InterpolateSpec"]["properties"]
    )


def test_an_auto_interpolation_with_an_uploaded_retain_set_is_queued(client):
    retain = {"path": _upload(client, "general.csv"), "name": "general"}
    created = client.post("/v1/jobs", json={"config": _config(client, {"alpha": "auto", "retain": [retain]})})
    assert created.status_code == 201, created.text
    assert created.json()["config"]["interpolate"] == {"alpha": "auto", "retain": [retain]}


def test_retain_data_from_a_server_path_and_a_bad_alpha_are_one_422(client):
    config = _config(client, {"alpha": 1.5, "retain": [{"path": "/etc/passwd"}]})
    response = client.post("/v1/jobs", json={"config": config})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "interpolate.alpha must be in [0, 1] (the fine-tuned model's weight) or 'auto', got 1.5" in message
    assert "interpolate.retain[0].path: '/etc/passwd' must be the path of an uploaded dataset" in message
