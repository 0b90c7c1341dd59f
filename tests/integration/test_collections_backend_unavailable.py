"""A collection store that cannot be reached (Milvus down) answers 503 + Retry-After on every collection
route, with code `collection_backend_unavailable`, while the rest of the service works: start-up does not
wait for it, /v1/embeddings answers, and no data-dir lock is taken with the milvus backend."""

from __future__ import annotations

import httpx
import pytest

import service.state
from common.lifetime import server_pid
from index.errors import BackendUnavailableError
from tests.helpers import RunningServer, make_settings


class UnreachableBackend:
    """A `CollectionBackend` whose store is down: every call raises, as the milvus backend's do."""

    kind = "milvus"

    def __init__(self, retry_after: float = 5) -> None:
        self.retry_after = retry_after
        self.closed = False

    def _down(self, *args, **kwargs):
        exc = BackendUnavailableError("Milvus at http://127.0.0.1:1 is unreachable: connection refused")
        exc.retry_after = self.retry_after
        raise exc

    create = get = listing = drop = start_reembed = reembed_status = open_all = snapshot_dirty = names = _down

    def close(self) -> None:
        self.closed = True


@pytest.fixture(scope="module")
def down(bootstrapped_data_dir, tmp_path_factory):
    import shutil

    data_dir = tmp_path_factory.mktemp("milvus-down")
    shutil.copytree(bootstrapped_data_dir / "registry", data_dir / "registry")  # the models, without their server
    backend = UnreachableBackend(retry_after=2.5)
    patch = pytest.MonkeyPatch()
    patch.setattr(service.state, "open_backend", lambda kind, **_: backend if kind == "milvus" else None)
    settings = make_settings(data_dir, collections_backend="milvus", register_default_models=False)
    try:
        with RunningServer(settings) as running:
            yield running, backend, data_dir
    finally:
        patch.undo()
    assert backend.closed


ROUTES = [
    ("GET", "/v1/collections", None),
    ("POST", "/v1/collections", {"name": "docs"}),
    ("GET", "/v1/collections/docs", None),
    ("DELETE", "/v1/collections/docs", None),
    ("POST", "/v1/collections/docs/rebuild", None),
    ("POST", "/v1/collections/docs/reembed", None),
    ("PUT", "/v1/collections/docs/items", {"items": [{"id": "a", "text": "hello"}]}),
    ("GET", "/v1/collections/docs/items", None),
    ("GET", "/v1/collections/docs/items/a", None),
    ("POST", "/v1/collections/docs/items/delete", {"ids": ["a"]}),
    ("POST", "/v1/collections/docs/search", {"query": {"text": "hello"}}),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_every_collection_route_answers_503_with_retry_after(down, method, path, body):
    running, _, _ = down
    response = httpx.request(method, running.url + path, json=body, timeout=60)
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "3"  # 2.5 s, in whole seconds, rounded up
    error = response.json()["error"]
    assert error["code"] == "collection_backend_unavailable"
    assert error["type"] == "server_error"
    assert "unreachable" in error["message"]


def test_the_service_started_and_embeds_without_its_collection_store(down):
    running, _, data_dir = down
    assert httpx.get(running.url + "/ready", timeout=10).status_code == 200
    response = httpx.post(running.url + "/v1/embeddings", json={"input": ["hello"], "model": "minilm"}, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == 384
    assert server_pid(data_dir) is None  # milvus: replicas share the data dir, so no lock was taken


def test_the_retry_after_of_the_error_is_the_header():
    from service.errors import domain_response

    exc = BackendUnavailableError("down")
    assert domain_response(exc) == (503, "collection_backend_unavailable", "down", {"Retry-After": "5"})
    exc.retry_after = 0.2
    assert domain_response(exc)[3] == {"Retry-After": "1"}


def test_the_milvus_backend_pointed_at_a_closed_port_starts_and_answers_503(bootstrapped_data_dir, tmp_path):
    """The real milvus backend with nothing listening: start-up completes, collections are 503 +
    Retry-After, embeddings work."""
    pytest.importorskip("pymilvus")
    pytest.importorskip("index.milvus.manager")
    import shutil

    from tests.helpers import free_port

    shutil.copytree(bootstrapped_data_dir / "registry", tmp_path / "registry")
    settings = make_settings(
        tmp_path,
        collections_backend="milvus",
        milvus_uri=f"http://127.0.0.1:{free_port()}",
        milvus_timeout_seconds=1,
        register_default_models=False,
    )
    with RunningServer(settings) as running:
        response = httpx.get(running.url + "/v1/collections", timeout=60)
        assert response.status_code == 503, response.text
        assert int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "collection_backend_unavailable"
        search = httpx.post(running.url + "/v1/collections/docs/search", json={"query": {"text": "hi"}}, timeout=60)
        assert search.status_code == 503, search.text
        embedded = httpx.post(running.url + "/v1/embeddings", json={"input": "hello", "model": "minilm"}, timeout=60)
        assert embedded.status_code == 200, embedded.text
        # The scrape reads collection gauges through the backend: with Milvus down it still renders.
        scrape = httpx.get(running.url + "/metrics", timeout=60)
        assert scrape.status_code == 200, scrape.text
        assert "duet_collections " in scrape.text
