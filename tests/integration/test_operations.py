"""Limits and failure modes on servers with small, deliberate limits."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.helpers import RunningServer, make_settings


@pytest.fixture(scope="module")
def tight(bootstrapped_data_dir):
    settings = make_settings(
        bootstrapped_data_dir,
        max_body_bytes=100_000,
        max_inputs_per_request=4,
        max_queue_items=4,
        model_memory_budget_mb=150,  # minilm (~87 MB) and minilm-dual (~99 MB) do not fit together
    )
    with RunningServer(settings) as running:
        yield running


def test_oversized_body_is_413_by_content_length(tight):
    response = httpx.post(f"{tight.url}/v1/embeddings", json={"input": "a" * 150_000}, timeout=30)
    assert response.status_code == 413
    assert "DUET_MAX_BODY_BYTES" in response.json()["error"]["message"]


def test_oversized_chunked_body_is_413(tight):
    def chunks():
        yield b'{"input": "'
        for _ in range(30):
            yield b"a" * 10_000
        yield b'"}'

    response = httpx.post(
        f"{tight.url}/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"}, timeout=30
    )
    assert response.status_code == 413


def test_full_queue_answers_429_with_retry_after(tight):
    batcher = tight.state.pool.loaded["minilm/1"].batcher
    gate = threading.Event()
    original = batcher.encode
    batcher.encode = lambda payloads, modality: (gate.wait(10), original(payloads, modality))[1]
    results = {}

    def first_request():
        results["first"] = httpx.post(f"{tight.url}/v1/embeddings", json={"input": ["a", "b", "c"]}, timeout=30)

    thread = threading.Thread(target=first_request)
    try:
        thread.start()
        for _ in range(200):
            if batcher.pending == 3:
                break
            threading.Event().wait(0.01)
        assert batcher.pending == 3
        refused = httpx.post(f"{tight.url}/v1/embeddings", json={"input": ["d", "e"]}, timeout=30)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["type"] == "rate_limit_error"
    finally:
        gate.set()
        thread.join(30)
        batcher.encode = original
    assert results["first"].status_code == 200
    assert httpx.get(f"{tight.url}/health").json()["status"] == "ok"


def test_models_share_a_memory_budget_least_recently_used_unloads(tight):
    assert "minilm/1" in tight.state.pool.loaded
    dual = httpx.post(f"{tight.url}/v1/embeddings", json={"input": ["x"], "model": "minilm-dual"}, timeout=60)
    assert dual.status_code == 200
    assert httpx.get(f"{tight.url}/health").json()["loaded_models"] == ["minilm-dual/1"]
    back = httpx.post(f"{tight.url}/v1/embeddings", json={"input": ["x"], "model": "minilm"}, timeout=60)
    assert back.status_code == 200
    assert httpx.get(f"{tight.url}/health").json()["loaded_models"] == ["minilm/1"]
    metrics = httpx.get(f"{tight.url}/metrics").text
    assert "duet_models_loaded 1.0" in metrics


def test_a_model_larger_than_the_whole_budget_is_507(bootstrapped_data_dir):
    settings = make_settings(bootstrapped_data_dir, model_memory_budget_mb=50, preload_models=[])
    with RunningServer(settings) as small:
        response = httpx.post(f"{small.url}/v1/embeddings", json={"input": "x"}, timeout=60)
        assert response.status_code == 507
        assert "DUET_MODEL_MEMORY_BUDGET_MB" in response.json()["error"]["message"]


def test_several_versions_are_served_side_by_side(bootstrapped_data_dir, tmp_path, tiny_model_dir):
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Manifest
    from service.state import open_registry

    settings = make_settings(tmp_path / "data", preload_models=[])
    registry = open_registry(settings)
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
    registry.register("tiny", tiny_model_dir, manifest)
    with RunningServer(settings.model_copy(update={"register_default_models": False})) as running:
        one = httpx.post(f"{running.url}/v1/embeddings", json={"input": "x", "model": "tiny/1"}).json()
        two = httpx.post(f"{running.url}/v1/embeddings", json={"input": "x", "model": "tiny@latest"}).json()
        assert (one["model"], two["model"]) == ("tiny/1", "tiny/2")
        assert sorted(running.state.pool.loaded) == ["tiny/1", "tiny/2"]
        # Moving the alias over HTTP changes what the bare name serves (alias cache is 0 s here).
        moved = httpx.put(f"{running.url}/v1/models/tiny/aliases/production", json={"version": 2})
        assert moved.status_code == 200 and moved.json()["aliases"] == ["production"]
        assert (
            httpx.post(f"{running.url}/v1/embeddings", json={"input": "x", "model": "tiny"}).json()["model"] == "tiny/2"
        )
        bad = httpx.put(f"{running.url}/v1/models/tiny/aliases/v3", json={"version": 2})
        assert bad.status_code == 400


def test_dead_batch_worker_turns_health_red(bootstrapped_data_dir):
    with RunningServer(make_settings(bootstrapped_data_dir)) as running:
        running.state.pool.loaded["minilm/1"].batcher.stop()
        health = httpx.get(f"{running.url}/health")
        assert health.status_code == 503 and health.json()["dead_workers"] == ["minilm/1"]
        assert httpx.get(f"{running.url}/ready").status_code == 503
        response = httpx.post(f"{running.url}/v1/embeddings", json={"input": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "worker_dead"
