"""Serving a collection pinned to one version with queries from a version registered compatible with it
(issue 14 part 2): searches embed with the named version (through its new -> old map), writes keep the
pinned version, the collection lists its compatible versions, and alias moves can require compatibility.
On both collection backends (tests/integration/backends.py).

"v2 compatible with v1" is built without training: the tiny model with other weights and a random
orthogonal map, registered with a `Compatibility` record carrying v1's real weights hash."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import RunningServer, perturbed_copy, register_trained
from tests.integration.backends import backend_settings, serving

TEXTS = {
    "guitar": "A man is playing a guitar.",
    "onions": "A woman is slicing onions.",
    "piano": "Someone plays the piano on stage.",
    "soup": "The chef cooks a vegetable soup.",
    "cat": "A cat sleeps on the sofa.",
}
MAP_FILE = "compat_map.npy"
METRICS = {"sts-dev/new-old/spearman": 61.5, "sts-dev/old-old/spearman": 60.0}


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model's shape with other weights, and a random orthogonal new -> old map beside them."""
    from sentence_transformers import SentenceTransformer

    out = perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("compat-v2") / "model", seed=4321)
    dim = SentenceTransformer(str(out), device="cpu").get_embedding_dimension()
    rotation, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(dim, dim)))
    np.save(out / MAP_FILE, rotation.astype(np.float32))
    return out


def claim(ref: str, sha: str | None, map_file: str | None = MAP_FILE):
    from registry.manifest import Compatibility

    return Compatibility(ref=ref, weights_sha256=sha, map_file=map_file, metrics=METRICS)


@pytest.fixture(scope="module")
def running(request, backend, tmp_path_factory, tiny_model_dir, v2_dir) -> Iterator[RunningServer]:
    """cm/1 (the pinned one); cm/2 claims cm/1 with its real hash and a map; cm/3 claims nothing; cm/4 claims
    cm/1 with a hash cm/1's weights do not have. al/1..3: the same, for alias moves. zz/1: a version whose
    manifest cannot be read."""
    from registry.manifest import MANIFEST_FILE
    from service.state import open_registry

    settings = backend_settings(
        backend,
        tmp_path_factory.mktemp("compat-serving") / "data",
        request,
        preload_models=["cm/1"],
        register_default_models=False,
        milvus_timeout_seconds=5.0,
    )
    registry = open_registry(settings)
    v1 = register_trained(registry, "cm", tiny_model_dir, aliases=("production",))
    sha = v1.manifest.lineage.weights_sha256
    assert sha
    register_trained(registry, "cm", v2_dir, [claim("cm/1", sha)])
    register_trained(registry, "cm", v2_dir)
    register_trained(registry, "cm", v2_dir, [claim("cm/1", "0" * 64)])
    register_trained(registry, "al", tiny_model_dir, aliases=("production",))
    register_trained(registry, "al", v2_dir, [claim("al/1", sha)])
    register_trained(registry, "al", v2_dir)
    unreadable = register_trained(registry, "zz", tiny_model_dir)
    (unreadable.path / MANIFEST_FILE).write_text("{")  # the registry scan leaves it out instead of failing
    with serving(backend, settings) as server:
        yield server


@pytest.fixture()
def http(running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.url, timeout=60) as client:
        yield client


@pytest.fixture()
def collection(http) -> str:
    name = "c" + uuid.uuid4().hex[:10]
    assert http.post("/v1/collections", json={"name": name, "model": "cm/1"}).status_code == 201
    items = [{"id": k, "text": t} for k, t in TEXTS.items()]
    assert http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    return name


def search(http, name: str, query: dict, model: str | None = None) -> httpx.Response:
    body = {"query": query, "k": len(TEXTS), **({"model": model} if model else {})}
    return http.post(f"/v1/collections/{name}/search", json=body)


def ranked(response: httpx.Response) -> list[tuple[str, float]]:
    assert response.status_code == 200, response.text
    return [(hit["id"], hit["score"]) for hit in response.json()["results"]]


def test_a_compatible_version_searches_the_pinned_collection_through_its_map(http, collection, v2_dir):
    from registry.compat import map_queries

    text = "Someone is playing music."
    answer = search(http, collection, {"text": text}, model="cm/2")
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "cm/1"
    assert answer.json()["models"] == {"query": "cm/2", "gallery": "cm/1"}

    embedded = http.post("/v1/embeddings", json={"model": "cm/2", "input": [text]})
    assert embedded.status_code == 200, embedded.text
    v2_vector = np.array([embedded.json()["data"][0]["embedding"]], dtype=np.float32)
    mapped = map_queries(v2_vector, np.load(v2_dir / MAP_FILE))[0].tolist()
    expected = ranked(search(http, collection, {"vector": mapped}))
    got = ranked(answer)
    assert [i for i, _ in got] == [i for i, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], atol=1e-4)
    unmapped = ranked(search(http, collection, {"vector": v2_vector[0].tolist()}))
    assert not np.allclose(sorted(s for _, s in got), sorted(s for _, s in unmapped), atol=1e-3)


def test_the_pinned_version_reports_itself_as_both_sides(http, collection):
    for model in (None, "cm/1", "cm@production"):
        answer = search(http, collection, {"text": "a cat"}, model=model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["models"] == {"query": "cm/1", "gallery": "cm/1"}


def test_a_version_without_a_claim_is_refused_with_the_reason_and_what_is_allowed(http, collection):
    answer = search(http, collection, {"text": "a cat"}, model="cm/3")
    assert answer.status_code == 409, answer.text
    message = answer.json()["error"]["message"]
    assert "cm/3 is not registered compatible with cm/1" in message
    assert "cm/1 or a version registered compatible with it (cm/2)" in message
    assert f"/v1/collections/{collection}/reembed" in message


def test_a_claim_on_other_weights_of_the_pinned_version_is_refused(http, collection):
    answer = search(http, collection, {"text": "a cat"}, model="cm/4")
    assert answer.status_code == 409, answer.text
    assert "now has weights" in answer.json()["error"]["message"]


def test_writes_still_need_the_pinned_version(http, collection):
    items = [{"id": "new", "text": "A dog runs."}]
    answer = http.put(f"/v1/collections/{collection}/items", json={"items": items, "model": "cm/2"})
    assert answer.status_code == 409, answer.text
    message = answer.json()["error"]["message"]
    assert "Write with cm/1" in message and "reembed" in message
    assert http.get(f"/v1/collections/{collection}/items/new").status_code == 404


def test_a_vector_query_with_a_compatible_model_is_refused(http, collection):
    answer = search(http, collection, {"vector": [0.1] * 32}, model="cm/2")
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "queries[0].vector"


def test_the_collection_lists_its_compatible_versions(http, collection):
    info = http.get(f"/v1/collections/{collection}").json()
    assert info["compatible_models"] == [{"model": "cm/2", "mapped": True, "metrics": METRICS}]


def put_alias(http, name: str, alias: str, version: int, require: bool) -> httpx.Response:
    body = {"version": version, "require_compatible": require}
    return http.put(f"/v1/models/{name}/aliases/{alias}", json=body)


def test_alias_move_requiring_compatibility(http):
    refused = put_alias(http, "al", "production", 3, require=True)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "alias_move_refused"
    assert "al/3 is not registered compatible with al/1" in refused.json()["error"]["message"]
    assert http.get("/v1/models/al/aliases").json()["production"] == 1

    assert put_alias(http, "al", "production", 2, require=True).status_code == 200
    assert put_alias(http, "al", "production", 2, require=True).status_code == 200  # the holder itself
    assert put_alias(http, "al", "staging", 3, require=True).status_code == 200  # nothing held it
    assert put_alias(http, "al", "production", 3, require=False).status_code == 200  # default: as before
    assert http.get("/v1/models/al/aliases").json() == {"production": 3, "staging": 3}
