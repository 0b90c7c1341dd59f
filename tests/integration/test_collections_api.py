"""Collections through HTTP on a real server: pinned models, search, filters, bad input. The contract
both collection backends keep: each test that takes `http` runs on faiss and on milvus
(tests/integration/backends.py)."""

from __future__ import annotations

import uuid

import httpx
import numpy as np
import pytest

from tests.helpers import RunningServer, make_settings, png_data_uri

DOCS = {
    "guitar": ("A man is playing a guitar.", {"lang": "en", "year": 2020}),
    "onions": ("A woman is slicing onions.", {"lang": "en", "year": 2021}),
    "gitarre": ("Ein Mann spielt Gitarre.", {"lang": "de", "year": 2019}),
    "piano": ("Someone plays the piano on stage.", {"lang": "en", "year": 2022}),
    "soup": ("The chef cooks a vegetable soup.", {"lang": "en", "year": 2018}),
}


def _name() -> str:
    return "c" + uuid.uuid4().hex[:10]


@pytest.fixture()
def http(backend_http):
    """This module's client talks to the contract server of the backend under test."""
    return backend_http


@pytest.fixture()
def docs(http):
    name = _name()
    created = http.post("/v1/collections", json={"name": name, "model": "minilm"})
    assert created.status_code == 201, created.text
    items = [{"id": k, "text": t, "payload": p} for k, (t, p) in DOCS.items()]
    upserted = http.put(f"/v1/collections/{name}/items", json={"items": items})
    assert upserted.status_code == 200, upserted.text
    return name


def search(http, name, **body):
    response = http.post(f"/v1/collections/{name}/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_collection_is_pinned_to_the_resolved_version(http, docs):
    info = http.get(f"/v1/collections/{docs}").json()
    assert (info["model"], info["count"], info["dimension"]) == ("minilm/1", 5, 384)
    assert info["stats"]["payload_fields"] == {"lang": "string", "year": "number"}
    assert docs in {c["name"] for c in http.get("/v1/collections").json()["data"]}


def test_text_search_finds_the_relevant_items(http, docs):
    body = search(http, docs, query={"text": "a musician playing an instrument"}, k=3)
    assert body["model"] == "minilm/1" and body["collection"] == docs
    ids = [r["id"] for r in body["results"]]
    assert ids[0] in {"guitar", "piano"} and "soup" not in ids
    assert body["results"][0]["content"] in {DOCS["guitar"][0], DOCS["piano"][0]}
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_filters_modality_and_batched_queries(http, docs):
    only_de = search(http, docs, query={"text": "music"}, k=5, filter={"lang": "de"})["results"]
    assert [r["id"] for r in only_de] == ["gitarre"]
    recent = search(http, docs, query={"text": "food"}, k=5, filter={"year": {"$gte": 2021}})["results"]
    assert {r["id"] for r in recent} == {"onions", "piano"}
    batched = search(http, docs, queries=[{"text": "cooking"}, {"id": "guitar"}], k=2)["results"]
    assert len(batched) == 2 and batched[0][0]["id"] in {"soup", "onions"}
    assert "guitar" not in [r["id"] for r in batched[1]]  # a query by id skips itself
    assert search(http, docs, query={"text": "x"}, modality="image")["results"] == []


def test_upsert_replaces_pages_and_deletes(http, docs):
    replaced = http.put(
        f"/v1/collections/{docs}/items",
        json={"items": [{"id": "soup", "text": "A cat sleeps on the sofa.", "payload": {"lang": "en", "year": 2024}}]},
    )
    assert replaced.json()["upserted"] == 1
    assert http.get(f"/v1/collections/{docs}").json()["count"] == 5
    item = http.get(f"/v1/collections/{docs}/items/soup", params={"with_vector": True}).json()
    assert item["content"] == "A cat sleeps on the sofa." and len(item["vector"]) == 384
    page1 = http.get(f"/v1/collections/{docs}/items", params={"limit": 2}).json()
    page2 = http.get(f"/v1/collections/{docs}/items", params={"limit": 10, "cursor": page1["next_cursor"]}).json()
    assert [i["id"] for i in page1["items"] + page2["items"]] == sorted(DOCS)
    assert page2["next_cursor"] is None
    filtered = http.get(f"/v1/collections/{docs}/items", params={"filter": '{"lang": "de"}'}).json()
    assert [i["id"] for i in filtered["items"]] == ["gitarre"]
    deleted = http.post(f"/v1/collections/{docs}/items/delete", json={"ids": ["guitar"]}).json()
    assert deleted["deleted"] == 1
    by_filter = http.post(f"/v1/collections/{docs}/items/delete", json={"filter": {"year": {"$lt": 2020}}}).json()
    assert by_filter["ids"] == ["gitarre"]
    assert http.get(f"/v1/collections/{docs}/items/guitar").status_code == 404
    assert http.get(f"/v1/collections/{docs}").json()["count"] == 3


def test_other_model_versions_are_refused(http, docs):
    response = http.post(f"/v1/collections/{docs}/search", json={"query": {"text": "x"}, "model": "minilm-dual"})
    assert response.status_code == 409
    assert "minilm/1" in response.json()["error"]["message"]
    assert http.post(f"/v1/collections/{docs}/search", json={"query": {"text": "x"}, "model": "minilm/1"}).is_success


def test_vector_only_collection(http):
    name = _name()
    assert http.post("/v1/collections", json={"name": name, "dimension": 4, "metric": "dot"}).status_code == 201
    vectors = {"a": [1, 0, 0, 0], "b": [0, 1, 0, 0], "c": [0.9, 0.1, 0, 0]}
    http.put(f"/v1/collections/{name}/items", json={"items": [{"id": k, "vector": v} for k, v in vectors.items()]})
    results = search(http, name, query={"vector": [1, 0, 0, 0]}, k=2)["results"]
    assert [r["id"] for r in results] == ["a", "c"] and results[0]["score"] == pytest.approx(1.0)
    text = http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "t", "text": "hello"}]})
    assert text.status_code == 400 and text.json()["error"]["code"] == "no_model"


def test_images_and_texts_in_a_dual_encoder_collection(http):
    name = _name()
    assert http.post("/v1/collections", json={"name": name, "model": "minilm-dual"}).status_code == 201
    red, blue = png_data_uri(color=(255, 0, 0)), png_data_uri(color=(0, 0, 255))
    items = [
        {"id": "red", "image": red, "payload": {"colour": "red"}},
        {"id": "blue", "image": blue, "payload": {"colour": "blue"}},
        {"id": "caption", "text": "a red square"},
    ]
    assert http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    by_image = search(http, name, query={"image": red}, k=3, modality="image")["results"]
    assert by_image[0]["id"] == "red" and by_image[0]["score"] == pytest.approx(1.0, abs=1e-4)
    stats = http.get(f"/v1/collections/{name}").json()["stats"]
    assert stats["by_modality"] == {"image": 2, "text": 1}
    assert stats["modality_gap"] > 0


def test_modality_gap_correction_per_backend(http, backend):
    """The contract differs here, on purpose: the faiss backend removes each modality's mean at index and
    query time; the milvus backend does not (yet), and says so with a 400 at create rather than keeping a
    collection whose searches would silently go uncorrected."""
    name = _name()
    body = {"name": name, "model": "minilm-dual", "modality_gap_correction": True}
    created = http.post("/v1/collections", json=body)
    if backend == "milvus":
        assert created.status_code == 400, created.text
        error = created.json()["error"]
        assert error["code"] == "invalid_collection_request", error
        assert "modality_gap_correction" in error["message"] and "milvus" in error["message"], error
        assert http.get(f"/v1/collections/{name}").status_code == 404
        return
    assert created.status_code == 201, created.text
    assert created.json()["modality_gap_correction"] is True
    items = [
        {"id": "red", "image": png_data_uri(color=(255, 0, 0))},
        {"id": "blue", "image": png_data_uri(color=(0, 0, 255))},
        {"id": "caption", "text": "a red square"},
    ]
    assert http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    assert http.post(f"/v1/collections/{name}/rebuild").status_code == 200  # centroids are computed at build
    info = http.get(f"/v1/collections/{name}").json()
    assert info["modality_gap_correction"] is True and info["stats"]["modality_gap"] > 0
    hits = search(http, name, query={"text": "a red square"}, k=3)["results"]
    assert {h["id"] for h in hits} == {"red", "blue", "caption"}


# -- bad input ------------------------------------------------------------------------

BAD_SEARCHES = [
    ("k zero", {"query": {"text": "x"}, "k": 0}, 400, "invalid_k"),
    ("k huge", {"query": {"text": "x"}, "k": 1_000_000}, 400, "invalid_k"),
    ("unknown filter field", {"query": {"text": "x"}, "filter": {"colour": "red"}}, 400, "invalid_filter"),
    ("filter wrong type", {"query": {"text": "x"}, "filter": {"year": "2020"}}, 400, "invalid_filter"),
    ("malformed filter", {"query": {"text": "x"}, "filter": {"year": {"$between": [1, 2]}}}, 400, "invalid_filter"),
    ("filter not an object", {"query": {"text": "x"}, "filter": []}, 400, "invalid_request_body"),
    ("wrong dimension", {"query": {"vector": [0.1, 0.2]}}, 400, "invalid_vector"),
    ("image to text-only model", {"query": {"image": png_data_uri()}}, 400, "unsupported_modality"),
    ("two query kinds", {"query": {"text": "x", "id": "y"}}, 400, "invalid_request_body"),
    ("query and queries", {"query": {"text": "x"}, "queries": [{"text": "y"}]}, 400, "invalid_request_body"),
    ("unknown item id", {"query": {"id": "nope"}}, 404, "item_not_found"),
    ("empty text", {"query": {"text": ""}}, 400, "invalid_input"),
]


@pytest.mark.parametrize(("body", "status", "code"), [c[1:] for c in BAD_SEARCHES], ids=[c[0] for c in BAD_SEARCHES])
def test_bad_searches(http, docs, body, status, code):
    response = http.post(f"/v1/collections/{docs}/search", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_nan_vector_is_refused(http):
    name = _name()
    http.post("/v1/collections", json={"name": name, "dimension": 2})
    raw = b'{"items": [{"id": "a", "vector": [NaN, 1.0]}]}'
    response = http.put(f"/v1/collections/{name}/items", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "NaN" in response.json()["error"]["message"]
    assert http.get(f"/v1/collections/{name}").json()["count"] == 0


def test_collection_level_errors(http, docs):
    assert http.get("/v1/collections/nope").status_code == 404
    assert http.post("/v1/collections/nope/search", json={"query": {"text": "x"}}).status_code == 404
    duplicate = http.post("/v1/collections", json={"name": docs, "model": "minilm"})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "collection_exists"
    assert http.post("/v1/collections", json={"name": "../x", "model": "minilm"}).status_code == 400
    assert http.post("/v1/collections", json={"name": _name(), "model": "nope"}).status_code == 404
    mismatch = http.post("/v1/collections", json={"name": _name(), "model": "minilm", "dimension": 8})
    assert mismatch.status_code == 400
    bad_item = http.put(f"/v1/collections/{docs}/items", json={"items": [{"id": "x"}]})
    assert bad_item.status_code == 400 and "exactly one of" in bad_item.json()["error"]["message"]
    bad_payload = http.put(
        f"/v1/collections/{docs}/items", json={"items": [{"id": "x", "text": "t", "payload": {"year": "old"}}]}
    )
    assert bad_payload.status_code == 400 and bad_payload.json()["error"]["code"] == "invalid_payload"
    bad_filter_json = http.get(f"/v1/collections/{docs}/items", params={"filter": "{nope"})
    assert bad_filter_json.status_code == 400


def test_empty_collection_search_is_an_empty_result(http):
    name = _name()
    http.post("/v1/collections", json={"name": name, "model": "minilm"})
    assert search(http, name, query={"text": "anything"}, k=5)["results"] == []


def test_drop_collection(http):
    name = _name()
    http.post("/v1/collections", json={"name": name, "dimension": 2})
    assert http.delete(f"/v1/collections/{name}").status_code == 200
    assert http.get(f"/v1/collections/{name}").status_code == 404


@pytest.mark.faiss_only("the faiss index snapshot on disk is the faiss backend's own")
def test_restart_with_a_corrupt_snapshot_rebuilds_and_serves(bootstrapped_data_dir, tmp_path):
    settings = make_settings(tmp_path / "data", preload_models=[], register_default_models=False)
    vectors = np.random.default_rng(0).normal(size=(20, 8)).tolist()
    with RunningServer(settings) as running:
        httpx.post(f"{running.url}/v1/collections", json={"name": "v", "dimension": 8})
        items = [{"id": f"i{i}", "vector": v} for i, v in enumerate(vectors)]
        assert httpx.put(f"{running.url}/v1/collections/v/items", json={"items": items}).status_code == 200
    snapshot = tmp_path / "data" / "collections" / "v" / "index.snapshot"
    assert snapshot.exists()  # written on shutdown
    snapshot.write_bytes(b"\x00" * 100)
    with RunningServer(settings) as running:
        body = httpx.post(f"{running.url}/v1/collections/v/search", json={"query": {"vector": vectors[3]}, "k": 1})
        assert body.json()["results"][0]["id"] == "i3"
        assert httpx.get(f"{running.url}/v1/collections/v").json()["count"] == 20
