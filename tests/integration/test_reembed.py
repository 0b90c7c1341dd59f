"""Re-embedding a collection into a new model version: in the background, flipped whole when
done, one at a time, writes refused meanwhile, and a failure leaves the old collection as it was.
On both collection backends (tests/integration/backends.py)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from tests.helpers import RunningServer, cosine, perturbed_copy, register_trained
from tests.integration.backends import backend_settings, reembed_leftovers, serving

TEXTS = {
    "guitar": "A man is playing a guitar.",
    "onions": "A woman is slicing onions.",
    "piano": "Someone plays the piano on stage.",
    "soup": "The chef cooks a vegetable soup.",
    "cat": "A cat sleeps on the sofa.",
}
DEADLINE_SECONDS = 180  # a guard against hanging, not a performance assertion


@pytest.fixture(scope="module")
def other_tiny_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model's shape with other weights: same contract, different vectors."""
    return perturbed_copy(tiny_model_dir, tmp_path_factory.mktemp("other-tiny") / "model", seed=1234)


@pytest.fixture(scope="module")
def running(request, backend, tmp_path_factory, tiny_model_dir, other_tiny_dir) -> Iterator[RunningServer]:
    from service.state import open_registry

    settings = backend_settings(
        backend,
        tmp_path_factory.mktemp("reembed") / "data",
        request,
        preload_models=["re/1"],
        register_default_models=False,
        alias_refresh_seconds=0.5,
        # milvus: a re-embed waits out one RPC timeout before its catch-up (index/milvus/reembed.py);
        # 5 s instead of 10 keeps this module's milvus half short. Unused on faiss.
        milvus_timeout_seconds=5.0,
    )
    registry = open_registry(settings)
    register_trained(registry, "re", tiny_model_dir, aliases=("production",))
    register_trained(registry, "re", other_tiny_dir)
    broken = register_trained(registry, "re", tiny_model_dir)
    with (broken.path / "modules.json").open("a") as f:
        f.write(" ")  # re/3's files no longer match their registered hash: it will not load
    register_trained(registry, "plain", tiny_model_dir)  # no production alias: re-embeds default to @latest
    register_trained(registry, "plain", other_tiny_dir)
    with serving(backend, settings) as server:
        yield server


@pytest.fixture()
def http(running) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=running.url, timeout=60) as client:
        yield client


def make_collection(http, model: str) -> str:
    name = "c" + uuid.uuid4().hex[:10]
    assert http.post("/v1/collections", json={"name": name, "model": model}).status_code == 201
    items = [{"id": k, "text": t, "payload": {"n": i}} for i, (k, t) in enumerate(TEXTS.items())]
    assert http.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    return name


def wait_until_finished(http, name: str) -> dict:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        info = http.get(f"/v1/collections/{name}").json()
        if info["reembed"]["state"] != "running":
            return info
        time.sleep(0.05)
    raise AssertionError(f"re-embed of {name} did not finish")


def top_hit(http, name: str, text: str) -> dict:
    response = http.post(f"/v1/collections/{name}/search", json={"query": {"text": text}, "k": 3})
    assert response.status_code == 200, response.text
    return response.json()["results"][0]


def test_reembed_flips_the_collection_to_the_new_version(running, http):
    name, untouched = make_collection(http, "re/1"), make_collection(http, "re/1")
    before = np.array(http.get(f"/v1/collections/{name}/items/guitar", params={"with_vector": True}).json()["vector"])
    running.state.registry.set_alias("re", "production", 2)

    started = http.post(f"/v1/collections/{name}/reembed")  # no body: re@production
    assert started.status_code == 202, started.text
    assert (started.json()["source_model"], started.json()["target_model"]) == ("re/1", "re/2")
    assert started.json()["total"] == len(TEXTS)

    info = wait_until_finished(http, name)
    assert info["reembed"]["state"] == "done" and info["reembed"]["done"] == len(TEXTS), info["reembed"]
    assert (info["model"], info["count"], info["dimension"]) == ("re/2", len(TEXTS), 32)
    after = np.array(http.get(f"/v1/collections/{name}/items/guitar", params={"with_vector": True}).json()["vector"])
    fresh = http.post("/v1/embeddings", json={"model": "re/2", "input": TEXTS["guitar"]}).json()["data"][0]
    assert cosine(after, np.array(fresh["embedding"]))[0] > 0.999  # embedded by re/2 from the stored text
    assert cosine(after, before)[0] < 0.99  # ... which really is another space
    hit = top_hit(http, name, TEXTS["soup"])
    assert hit["id"] == "soup" and hit["content"] == TEXTS["soup"] and hit["payload"] == {"n": 3}
    old_model = http.post(f"/v1/collections/{name}/search", json={"query": {"text": "x"}, "model": "re/1"})
    assert old_model.status_code == 409
    assert http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "new", "text": "hi"}]}).status_code == 200
    # A collection pinned to the old version keeps working on it.
    assert http.get(f"/v1/collections/{untouched}").json()["model"] == "re/1"
    assert top_hit(http, untouched, TEXTS["piano"])["id"] == "piano"
    assert reembed_leftovers(running, name) == []


def test_default_target_falls_back_to_latest(http):
    name = make_collection(http, "plain/1")
    started = http.post(f"/v1/collections/{name}/reembed", json={})
    assert started.status_code == 202 and started.json()["target_model"] == "plain/2"
    assert wait_until_finished(http, name)["model"] == "plain/2"


def test_one_reembed_at_a_time_and_writes_wait_for_it(running, http, monkeypatch):
    name = make_collection(http, "re/1")
    pool, gate = running.state.pool, threading.Event()
    original_get = pool.get

    async def gated_get(ref):  # holds the re-embed at its first batch until the test lets it go
        if ref == "re/2":
            await anyio.to_thread.run_sync(gate.wait)
        return await original_get(ref)

    monkeypatch.setattr(pool, "get", gated_get)
    try:
        assert http.post(f"/v1/collections/{name}/reembed", json={"model": "re/2"}).status_code == 202
        second = http.post(f"/v1/collections/{name}/reembed", json={"model": "re/2"})
        assert second.status_code == 409 and "is being re-embedded" in second.json()["error"]["message"]
        write = http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "x", "text": "new"}]})
        assert write.status_code == 409 and write.json()["error"]["code"] == "collection_busy"
        delete = http.post(f"/v1/collections/{name}/items/delete", json={"ids": ["cat"]})
        assert delete.status_code == 409
        assert http.delete(f"/v1/collections/{name}").status_code == 409
        assert top_hit(http, name, TEXTS["cat"])["id"] == "cat"  # searches go on, on the old version
        status = http.get(f"/v1/collections/{name}").json()
        assert status["model"] == "re/1" and status["reembed"]["state"] == "running"
        assert status["reembed"]["target_model"] == "re/2"
    finally:
        gate.set()
    assert wait_until_finished(http, name)["model"] == "re/2"
    assert http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "x", "text": "new"}]}).status_code == 200


def test_a_failed_reembed_leaves_the_old_collection_as_it_was(running, http):
    name = make_collection(http, "re/1")
    started = http.post(f"/v1/collections/{name}/reembed", json={"model": "re/3"})  # re/3's files were altered
    assert started.status_code == 202, started.text
    info = wait_until_finished(http, name)
    assert info["reembed"]["state"] == "failed"
    assert "modified after registration" in info["reembed"]["error"]
    assert (info["model"], info["count"], info["dimension"]) == ("re/1", len(TEXTS), 32)
    assert top_hit(http, name, TEXTS["onions"])["id"] == "onions"
    assert http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "y", "text": "ok"}]}).status_code == 200
    assert reembed_leftovers(running, name) == []


def test_bad_reembed_requests_are_clear_4xx(http):
    name = make_collection(http, "re/1")
    cases = [
        ({"json": {"model": "re/1"}}, 409, "already holds vectors of re/1"),
        ({"json": {"model": "nosuchmodel"}}, 404, "no model named"),
        ({"json": {"model": "re/99"}}, 404, "no version 99"),
        ({"json": {"modle": "re/2"}}, 400, "modle"),
        ({"content": b"model=re/2", "headers": {"Content-Type": "text/plain"}}, 415, "content type"),
    ]
    for kwargs, status, message in cases:
        response = http.post(f"/v1/collections/{name}/reembed", **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert message in response.json()["error"]["message"], response.text
    assert http.post("/v1/collections/nope/reembed").status_code == 404

    raw = {"items": [{"id": "raw", "vector": np.ones(32).tolist()}]}
    assert http.put(f"/v1/collections/{name}/items", json=raw).status_code == 200
    refused = http.post(f"/v1/collections/{name}/reembed", json={"model": "re/2"})
    assert refused.status_code == 409 and "1 items" in refused.json()["error"]["message"]
    assert http.put(f"/v1/collections/{name}/items", json={"items": [{"id": "z", "text": "ok"}]}).status_code == 200

    vectors_only = "v" + uuid.uuid4().hex[:10]
    assert http.post("/v1/collections", json={"name": vectors_only, "dimension": 4}).status_code == 201
    response = http.post(f"/v1/collections/{vectors_only}/reembed")
    assert response.status_code == 409 and "vector-only" in response.json()["error"]["message"]
