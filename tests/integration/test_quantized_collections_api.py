"""Quantised collections through HTTP, on both backends (tests/integration/backends.py): int8 and binary
collections are created, written, searched (float scores after rescoring), deleted from, and found
whole after a restart; bad quantisation options are a 400 naming the fix. On faiss: int8/binary FAISS
indexes; on milvus: IVF_SQ8 / IVF_RABITQ over the float field, rescored by Duet."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.integration.backends import backend_settings, serving

DIM = 64
N = 1200
K = 10


def clustered(n: int, seed: int) -> np.ndarray:
    """Unit vectors in clusters of sub-clusters (near neighbours at cosine ~0.85); the same centres for
    every seed, other points per seed."""
    centres = np.random.default_rng(0).normal(size=(20, 1, DIM))
    subs = (centres + 0.7 * np.random.default_rng(1).normal(size=(20, 15, DIM))).reshape(-1, DIM)
    rng = np.random.default_rng([seed, 2])
    points = subs[rng.integers(0, len(subs), n)] + 0.5 * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


DATA = clustered(N, seed=0)
QUERIES = clustered(30, seed=1)


def vector_only(backend, request, tmp_path_factory):
    """Settings of a server with no models (these collections hold bare vectors), in a fresh data dir."""
    data_dir = tmp_path_factory.mktemp("quantized") / "data"
    return backend_settings(backend, data_dir, request, preload_models=[], register_default_models=False)


@pytest.fixture(scope="module")
def server(request, backend, tmp_path_factory) -> Iterator:
    with serving(backend, vector_only(backend, request, tmp_path_factory)) as running:
        yield running


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def create(http: httpx.Client, **index) -> str:
    name = "q" + uuid.uuid4().hex[:10]
    response = http.post("/v1/collections", json={"name": name, "dimension": DIM, "index": index})
    assert response.status_code == 201, response.text
    return name


def fill(http: httpx.Client, name: str) -> None:
    for start in range(0, N, 400):
        items = [{"id": f"i{start + i}", "vector": v.tolist()} for i, v in enumerate(DATA[start : start + 400])]
        response = http.put(f"/v1/collections/{name}/items", json={"items": items})
        assert response.status_code == 200, response.text


def results(http: httpx.Client, name: str, **extra) -> list[list[dict]]:
    body = {"queries": [{"vector": q.tolist()} for q in QUERIES], "k": K, "nprobe": 16, **extra}
    response = http.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def recall(found: list[list[dict]]) -> float:
    truth = np.argsort(-(QUERIES @ DATA.T), axis=1)[:, :K]
    return float(np.mean([len({h["id"] for h in row} & {f"i{j}" for j in t}) / K for row, t in zip(found, truth)]))


def float_score(query: np.ndarray, hit: dict) -> float:
    return float(query @ DATA[int(hit["id"][1:])])


def searched_and_deleted_from(http: httpx.Client, quantization: str) -> tuple[str, list[list[str]]]:
    """A filled collection, checked (recall, float scores, stats), with two items deleted; its name and the
    ids of what the queries find now."""
    name = create(http, kind="flat", quantization=quantization, nlist=16)
    fill(http, name)
    info = http.get(f"/v1/collections/{name}").json()
    assert info["index"]["quantization"] == quantization and info["count"] == N
    stats = info["stats"]["index"]
    assert (stats["quantization"], stats["rescore"], stats["scores"]) == (quantization, True, "float (rescored)")
    found = results(http, name)
    assert recall(found) >= 0.9, recall(found)
    for query, row in zip(QUERIES, found):  # the reported score is the float inner product
        assert [h["score"] for h in row] == pytest.approx([float_score(query, h) for h in row], abs=1e-4)
    gone = sorted({found[0][0]["id"], found[1][0]["id"]})
    deleted = http.post(f"/v1/collections/{name}/items/delete", json={"ids": gone})
    assert deleted.status_code == 200 and deleted.json()["deleted"] == len(gone)
    after = [[h["id"] for h in row] for row in results(http, name)]
    assert not set(gone) & {i for row in after for i in row}
    assert http.get(f"/v1/collections/{name}").json()["count"] == N - len(gone)
    return name, after


@pytest.mark.parametrize("quantization", ["int8", "binary"])
def test_quantised_collection_searches_and_deletes(http, quantization):
    searched_and_deleted_from(http, quantization)


@pytest.mark.slow  # two server starts and two collections filled over HTTP: ~40 s on a busy 2-core machine
def test_quantised_collections_survive_a_restart(request, backend, tmp_path_factory):
    settings = vector_only(backend, request, tmp_path_factory)  # its own server, to restart
    with serving(backend, settings) as first, httpx.Client(base_url=first.url, timeout=120) as http:
        before = {q: searched_and_deleted_from(http, q) for q in ("int8", "binary")}
    with serving(backend, settings) as again, httpx.Client(base_url=again.url, timeout=120) as http:
        for quantization, (name, found) in before.items():
            info = http.get(f"/v1/collections/{name}").json()
            assert info["index"]["quantization"] == quantization and info["count"] == N - 2
            assert [[h["id"] for h in row] for row in results(http, name)] == found


def test_rescoring_improves_binary_recall(backend, http):
    rescored, raw = create(http, quantization="binary"), create(http, quantization="binary", rescore=False)
    fill(http, rescored)
    fill(http, raw)
    with_rescore, without = results(http, rescored), results(http, raw)
    assert recall(with_rescore) >= 0.9 and recall(with_rescore) >= recall(without)
    stats = http.get(f"/v1/collections/{raw}").json()["stats"]["index"]
    assert stats["rescore"] is False and "not rescored" in stats["scores"]
    # Per search, `rescore` overrides the collection's choice, both ways.
    for query, row in zip(QUERIES, results(http, raw, rescore=True)):
        assert [h["score"] for h in row] == pytest.approx([float_score(query, h) for h in row], abs=1e-4)
    unrescored = results(http, rescored, rescore=False)
    if backend == "faiss":  # a binary flat index has no training: the two collections' indexes are the same
        assert unrescored == without
    else:  # milvus-lite answers IVF_RABITQ searches of this size exactly (recall 1.0), rescored or not
        assert recall(unrescored) >= 0.9 and all(len(row) == K for row in unrescored)


@pytest.mark.parametrize(
    ("index", "words"),
    [
        ({"quantization": "int4"}, "'none', 'int8' or 'binary'"),
        ({"quantization": "int8", "kind": "ivfpq"}, "already quantised"),
        ({"quantization": "binary", "kind": "ivf"}, "flat, hnsw or auto"),
        ({"oversample": 0}, "oversample"),
        ({"recall_target": 1.5, "kind": "hnsw"}, "recall_target"),
        ({"recall_target": 0.9, "kind": "flat"}, "kind hnsw"),
    ],
)
def test_bad_quantisation_options_are_400(http, index, words):
    name = "bad" + uuid.uuid4().hex[:8]
    response = http.post("/v1/collections", json={"name": name, "dimension": DIM, "index": index})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    assert http.get(f"/v1/collections/{name}").status_code == 404


def test_binary_dimension_must_be_a_multiple_of_8(http):
    response = http.post("/v1/collections", json={"name": "b12", "dimension": 12, "index": {"quantization": "binary"}})
    assert response.status_code == 400 and "multiple of 8" in response.json()["error"]["message"]


def test_what_each_backend_offers_for_binary_hnsw_and_recall_targets(backend, http):
    binary_hnsw = {"kind": "hnsw", "quantization": "binary"}
    tuned = {"kind": "hnsw", "recall_target": 0.95}
    for index in (binary_hnsw, tuned):
        name = "o" + uuid.uuid4().hex[:8]
        response = http.post("/v1/collections", json={"name": name, "dimension": DIM, "index": index})
        if backend == "milvus":  # refused, naming what to use instead
            assert response.status_code == 400, response.text
            assert any(w in response.json()["error"]["message"] for w in ("IVF_RABITQ", "set ef_search instead"))
        else:
            assert response.status_code == 201, response.text
    if backend == "faiss":  # the recall target's efSearch is measured when the index is built
        fill(http, name)
        assert http.post(f"/v1/collections/{name}/rebuild").status_code == 200
        tuning = http.get(f"/v1/collections/{name}").json()["stats"]["index"]["tuning"]
        assert tuning["recall_target"] == 0.95 and tuning["recall"] >= 0.95 and tuning["count"] == N
