"""/v1/embeddings against a real uvicorn server, with the official `openai` client too."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from tests.helpers import cosine, png_data_uri

TEXTS = ["A man is playing a guitar.", "Ein Mann spielt Gitarre.", "The cat sleeps on the mat.", "short"]


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _decode(embedding) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
@pytest.mark.parametrize("dimensions", [None, 128])
def test_openai_client_matches_sentence_transformers(client, reference_model, encoding_format, dimensions):
    extra = {"dimensions": dimensions} if dimensions else {}
    response = client.embeddings.create(model="minilm", input=TEXTS, encoding_format=encoding_format, **extra)
    got = np.stack([_decode(d.embedding) for d in response.data])
    expected = reference_model.encode(TEXTS, normalize_embeddings=True)
    if dimensions:
        expected = expected[:, :dimensions] / np.linalg.norm(expected[:, :dimensions], axis=1, keepdims=True)
    assert got.shape == (len(TEXTS), dimensions or 384)
    assert cosine(got, expected).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    assert [d.index for d in response.data] == list(range(len(TEXTS)))
    assert response.model == "minilm/1"
    assert response.usage.prompt_tokens == response.usage.total_tokens > 0


def test_openai_client_default_format_and_single_string(client, reference_model):
    response = client.embeddings.create(model="minilm", input="hello world")
    assert cosine(np.array(response.data[0].embedding), reference_model.encode(["hello world"]))[0] >= 0.9999


def test_raw_response_shape_is_exactly_openais(http):
    body = http.post("/v1/embeddings", json={"input": "hello", "model": "minilm"}).json()
    assert body["object"] == "list"
    assert set(body) == {"object", "data", "model", "usage"}
    item = body["data"][0]
    assert item["object"] == "embedding" and item["index"] == 0 and len(item["embedding"]) == 384
    assert body["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize("ref", ["minilm", "minilm@production", "minilm/1", "minilm@latest", None])
def test_model_reference_forms(http, ref):
    payload = {"input": "x"} if ref is None else {"input": "x", "model": ref}
    response = http.post("/v1/embeddings", json=payload)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "minilm/1"


def test_long_text_is_truncated_and_reported_not_refused(http, reference_model):
    long_text = " ".join(["retrieval"] * 2000)
    body = http.post("/v1/embeddings", json={"input": ["short", long_text], "model": "minilm"}).json()
    assert [d["truncated"] for d in body["data"]] == [False, True]
    assert body["usage"]["prompt_tokens"] == 3 + 256
    got = np.array(body["data"][1]["embedding"])
    assert cosine(got, reference_model.encode([long_text]))[0] >= 0.9999


def test_images_and_text_in_one_request_to_the_dual_encoder(http, reference_model):
    red, blue = png_data_uri(color=(255, 0, 0)), png_data_uri(color=(0, 0, 255))
    response = http.post("/v1/embeddings", json={"input": [red, "a red square", blue], "model": "minilm-dual"})
    assert response.status_code == 200, response.text
    assert response.headers["x-duet-warning"] == "minilm-dual/1 is untrained"
    body = response.json()
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert body["usage"]["images"] == 2
    alone = http.post("/v1/embeddings", json={"input": [blue], "model": "minilm-dual"}).json()
    assert cosine(vectors[2], np.array(alone["data"][0]["embedding"]))[0] > 0.9999
    assert cosine(vectors[1], reference_model.encode(["a red square"]))[0] > 0.9999
    assert cosine(vectors[0], vectors[2])[0] < 0.9999


def test_modality_text_embeds_a_data_uri_as_text(http):
    response = http.post("/v1/embeddings", json={"input": png_data_uri(), "model": "minilm", "modality": "text"})
    assert response.status_code == 200 and response.json()["data"][0]["truncated"] in (True, False)


def test_models_endpoints(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {m["id"]: m for m in models["data"]}
    assert cards["minilm"]["aliases"]["production"] == 1
    version = http.get("/v1/models/minilm").json()
    assert version["ref"] == "minilm/1" and version["trained"] is True and version["loaded"] is True
    assert version["contract"]["dimension"] == 384
    assert len(version["lineage"]["weights_sha256"]) == 64
    dual = http.get("/v1/models/minilm-dual/versions/1").json()
    assert dual["trained"] is False and dual["contract"]["modalities"] == ["text", "image"]
    assert http.get("/v1/models/minilm/aliases").json() == {"production": 1}
    assert [v["version"] for v in http.get("/v1/models/minilm/versions").json()["data"]] == [1]


def test_openai_client_lists_models(client):
    assert {"minilm", "minilm-dual"} <= {m.id for m in client.models.list()}


def test_health_ready_metrics(http):
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/ready").json()["status"] == "ready"
    http.post("/v1/embeddings", json={"input": ["a", "b"], "model": "minilm"})
    metrics = http.get("/metrics").text
    for name in (
        "duet_queue_depth",
        "duet_batch_size_bucket",
        "duet_request_latency_seconds_bucket",
        "duet_inference_latency_seconds_bucket",
        "duet_errors_total",
        "duet_models_loaded",
    ):
        assert name in metrics
    assert 'duet_requests_total{route="/v1/embeddings",status="200"}' in metrics


def test_openapi_docs_are_served(http):
    schema = http.get("/openapi.json").json()
    assert "/v1/embeddings" in schema["paths"]
    assert http.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("raw_input", "param"),
    [('"abc\\ud800def"', "input[0]"), ('["fine", "abc\\udfffdef"]', "input[1]"), ('["\\udc00"]', "input[0]")],
)
def test_lone_surrogate_is_a_400_naming_the_input(http, raw_input, param):
    # The JSON escape of a lone surrogate is legal JSON but no Unicode character; it used to
    # reach the Rust tokenizer, which raised a TypeError: 500.
    body = ('{"model": "minilm", "input": ' + raw_input + "}").encode()
    response = http.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_text"
    assert "surrogate" in error["message"]


def test_surrogate_pairs_and_nul_are_text(http):
    # A high+low pair is one character (an emoji here); NUL is a valid character too.
    body = b'{"model": "minilm", "input": ["smile \\ud83d\\ude00", "a\\u0000b"]}'
    response = http.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 2


def _jpeg_data_uri(width: int, height: int) -> str:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(buffer, "JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_many_large_images_wait_for_the_model_reduced_to_its_input_size(http, server):
    """Issue 11: 512 images of 1024 x 1024 in one request held +2.3 GB, because the batch queue held
    them at full size. Now each is reduced to the model's input size (64 px) as it is decoded, and
    its memory is counted against DUET_MAX_IMAGE_MEMORY_BYTES and given back after the response."""
    from service.limits import memory_budget

    assert http.post("/v1/embeddings", json={"input": [png_data_uri()], "model": "minilm-dual"}).status_code == 200
    model = server.state.pool.loaded["minilm-dual/1"]
    seen: list[tuple[int, int]] = []
    original = model.batcher.encode

    def recording(payloads, modality):
        if modality == "image":
            seen.extend(p.size for p in payloads)
        return original(payloads, modality)

    images = [png_data_uri(1024, 1024, color=(4 * i, 0, 0)) for i in range(48)] + [_jpeg_data_uri(1024, 768)]
    model.batcher.encode = recording
    try:
        response = http.post("/v1/embeddings", json={"input": images, "model": "minilm-dual"})
    finally:
        model.batcher.encode = original
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == len(images) == len(seen)
    assert set(seen) == {(64, 64), (85, 64)}  # nothing full-size ever reached the queue
    assert memory_budget(server.state.settings.max_image_memory_bytes).used == 0


def test_overload_is_refused_at_entry_before_tokens_are_counted(http, server):
    """Issue 11: at 4x capacity nothing was refused and requests waited 13.5 s (p50) in front of the
    queue. Admission now refuses a request whose estimated wait (work ahead / measured throughput)
    passes DUET_MAX_QUEUE_WAIT_MS (2 s here) before any of its tokens are counted. The throughput
    is pinned, so nothing depends on this machine's speed."""
    import threading

    from service.batching import Throughput

    class Pinned(Throughput):
        def update(self, count: int, seconds: float) -> None:
            pass

    model = server.state.pool.loaded["minilm/1"]
    batcher, encoder = model.batcher, model.encoder
    gate, counted = threading.Event(), []
    original_encode, original_throughput = batcher.encode, batcher.throughput
    original_count = encoder.count_tokens

    def count_tokens(texts):
        counted.append(len(texts))
        return original_count(texts)

    batcher.encode = lambda payloads, modality: (gate.wait(30), original_encode(payloads, modality))[1]
    batcher.throughput = Pinned(rate=1.0)  # 1 input/s: 3 inputs ahead are a 3 s wait
    encoder.count_tokens = count_tokens
    results = {}
    first = threading.Thread(
        target=lambda: results.setdefault("first", http.post("/v1/embeddings", json={"input": ["a", "b", "c"]}))
    )
    try:
        first.start()
        for _ in range(500):
            if batcher.pending == 3:
                break
            threading.Event().wait(0.01)
        assert batcher.pending == 3
        counted.clear()
        with httpx.Client(base_url=server.url, timeout=30) as other:
            refused = other.post("/v1/embeddings", json={"input": ["d"]})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"  # 3 s ahead, 2 s budget: back in 1 s
        assert "DUET_MAX_QUEUE_WAIT_MS" in refused.json()["error"]["message"]
        assert counted == []  # refused before its tokens were counted
    finally:
        gate.set()
        first.join(30)
        batcher.encode, batcher.throughput = original_encode, original_throughput
        del encoder.count_tokens
    assert results["first"].status_code == 200
