"""CollectionsService without HTTP: the background re-embed's embed function waits out a full queue
(the batcher's own QueueFullError), and fails on anything else; a live request gets the batcher's
errors as they are, which service/errors.py's table answers (429 + Retry-After, 503)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import anyio
import numpy as np
import pytest

from index.items import StoredItem
from service.batching import QueueFullError, WorkerStoppedError
from service.collections_service import CollectionsService, parse_filter
from service.errors import ApiError, domain_error
from service.settings import Settings


class Encoder:
    def count_tokens(self, texts):
        return [(len(t.split()), False) for t in texts]


class Batcher:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0

    async def embed(self, payloads, modality, costs, admission=None):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return np.ones((len(payloads), 3), dtype=np.float32)


class Pool:
    def __init__(self, batcher: Batcher) -> None:
        self.model = SimpleNamespace(
            ref="tiny/1",
            encoder=Encoder(),
            batcher=batcher,
            info=SimpleNamespace(manifest=SimpleNamespace(contract=SimpleNamespace(dimension=3))),
        )

    async def get(self, ref):
        return self.model


def service(batcher: Batcher) -> CollectionsService:
    return CollectionsService(None, Pool(batcher), None, Settings(), None)  # type: ignore[arg-type]


ITEMS = [StoredItem(id=f"i{n}", modality="text", vector=np.zeros(3, np.float32), content=f"text {n}") for n in range(4)]


def test_the_reembed_embed_function_waits_out_a_full_queue():
    batcher = Batcher(
        [
            QueueFullError(9000, 8192, retry_after=0, model="tiny/1"),
            QueueFullError(9000, 8192, retry_after=0, model="tiny/1"),
        ]
    )
    collections = service(batcher)

    async def main():
        embed = collections._reembedder(asyncio.get_running_loop(), "tiny/1")
        return await anyio.to_thread.run_sync(embed, ITEMS)  # the job calls it from its own thread

    vectors = asyncio.run(main())
    assert vectors.shape == (4, 3)
    assert batcher.calls == 3  # two full queues, then done


def test_the_reembed_embed_function_fails_on_a_dead_worker():
    collections = service(Batcher([WorkerStoppedError("worker of tiny/1 stopped")]))
    with pytest.raises(WorkerStoppedError) as raised:
        asyncio.run(collections._embed_stored("tiny/1", ITEMS))
    assert (domain_error(raised.value).status, domain_error(raised.value).code) == (503, "worker_dead")


def test_a_live_request_still_gets_429_with_retry_after_for_a_full_queue():
    collections = service(Batcher([QueueFullError(9000, 8192, retry_after=7, model="tiny/1")]))
    collection = SimpleNamespace(name="docs", config=SimpleNamespace(model="tiny/1"))
    collections.pool.model.info.manifest.contract.accepts = lambda modality: True
    with pytest.raises(QueueFullError) as raised:
        asyncio.run(collections._embed_contents(collection, [("text", "hello")], ["items[0].text"]))
    answer = domain_error(raised.value)
    assert (answer.status, answer.code, answer.headers) == (429, "queue_full", {"Retry-After": "7"})


def test_filters_are_parsed_from_json():
    assert parse_filter(None) is None
    assert parse_filter('{"lang": "en"}') == {"lang": "en"}
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_filter("{")


def test_a_collection_view_names_its_backend():
    from service.collections_service import _view

    class Handle:
        config = SimpleNamespace(name="docs")

        def __init__(self, index):
            self.index = index

        def stats(self):
            return {"count": 0, "index": dict(self.index)}

    assert _view(Handle({"kind": "flat"}), "faiss").stats["index"] == {"kind": "flat", "backend": "faiss"}
    assert _view(Handle({"backend": "milvus"}), "milvus").stats["index"] == {"backend": "milvus"}  # its own word
