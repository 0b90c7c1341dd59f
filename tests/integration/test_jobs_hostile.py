"""POST /v1/jobs against hostile values in this session's config blocks (compatible_with, interpolate,
epochs/learning_rate auto, eval_every, best_metric): each is a 422 naming the field and what to change,
never a 500 and never a queued job; an old model whose registered manifest cannot be read is one of them."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.helpers import make_settings

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_model_dir) -> Iterator[TestClient]:
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import MANIFEST_FILE, Manifest
    from service.app import create_app
    from service.state import open_registry

    settings = make_settings(
        tmp_path_factory.mktemp("jobs-hostile") / "data",
        preload_models=[],
        register_default_models=False,
        local_worker=False,
    )
    registry = open_registry(settings)
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    registry.register("old", tiny_model_dir, manifest)
    broken = registry.register("old", tiny_model_dir, manifest)
    (broken.path / MANIFEST_FILE).write_text('{"compatible_with": "old/1"}')
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def datasets(client) -> dict[str, str]:
    paths = {}
    for name in ("train", "dev", "general"):
        response = client.post("/v1/datasets", params={"filename": f"{name}.csv"}, content=b"anchor,positive\na,b\n")
        assert response.status_code == 201, response.text
        paths[name] = response.json()["path"]
    return paths


CASES = {
    "interpolate.alpha": {"interpolate": {"alpha": NAN}},
    "interpolate.alphas": {"interpolate": {"alpha": "auto", "alphas": [INF], "retain": ["dev"]}},
    "interpolate.max_retention_drop": {"interpolate": {"alpha": "auto", "retain": ["dev"], "max_retention_drop": NAN}},
    "interpolate.retain[0]: '../../etc/passwd'": {"interpolate": {"alpha": "auto", "retain": ["../../etc/passwd"]}},
    "interpolate.retain[0].path": {"interpolate": {"alpha": "auto", "retain": [{"path": "datasets/../../x.csv"}]}},
    "interpolate.metric": {"interpolate": {"alpha": "auto", "retain": ["general"], "metric": "x" * 10_000}},
    "eval_every: must be": {"eval_every": 0},
    "eval_every: must be 'auto'": {"eval_every": -1},
    "eval_every: must be 'auto', 'epoch'": {"eval_every": 10**30},
    "best_metric 'nope'": {"best_metric": "nope"},
    "best_metric: String should have at most 200": {"best_metric": "dev/" + "x" * 500},
    "epochs: must be": {"epochs": NAN},
    "epochs: must be a number": {"epochs": "AUTO"},
    "learning_rate: must be": {"learning_rate": INF},
    "compatible_with.model: '../../x' is a server path": {"compatible_with": "../../x"},
    "compatible_with.weight": {"compatible_with": {"model": "old/1", "weight": NAN}},
    "compatible_with.model: old/2's manifest cannot be read": {"compatible_with": "old/2"},
    "compatible_with.model: model 'old' has no version 9": {"compatible_with": "old/9"},
}


@pytest.mark.parametrize("expected", list(CASES))
def test_a_hostile_value_is_a_422_naming_the_field(client, datasets, expected):
    config = {
        "base_model": "org/model",
        "train": [{"path": datasets["train"]}],
        "eval": [{"path": datasets["dev"], "name": "dev"}],
        "output": {"name": "tuned"},
        **CASES[expected],
    }
    before = len(client.get("/v1/jobs").json()["data"])
    response = client.post(
        "/v1/jobs", content=json.dumps({"config": config}), headers={"content-type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert expected in response.json()["error"]["message"]
    assert len(client.get("/v1/jobs").json()["data"]) == before
