"""The milvus backend (index.milvus) against a real milvus-lite server: what the faiss backend does,
replicas sharing collections, re-embed with an alias flip, injection attempts, and outages.

Every test has its own Milvus name prefix, so tests never see each other's collections."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from index.backend import MilvusOptions
from index.config import CollectionConfig
from index.engine import IndexSpec
from index.errors import (
    BackendUnavailableError,
    CollectionBusyError,
    CollectionExistsError,
    CollectionNotFoundError,
    FilterError,
    InvalidCollectionError,
    InvalidVectorError,
    ItemNotFoundError,
    PayloadError,
    ReembedRefusedError,
)
from index.items import StoredItem
from index.manager import CollectionManager
from index.milvus import names
from index.milvus.manager import MilvusBackend
from tests.helpers import MilvusLiteServer

pytestmark = pytest.mark.milvus

DIM = 8


def vector_of(content: str, dim: int = DIM) -> np.ndarray:
    seed = int(hashlib.sha256(f"{dim}:{content}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=dim).astype(np.float32)


def embedder(dim: int):
    def embed(items: list[StoredItem]) -> np.ndarray:
        return np.stack([vector_of(item.content or "", dim) for item in items])

    return embed


def make_backend(uri: str, prefix: str | None = None, timeout: float = 5.0) -> MilvusBackend:
    return MilvusBackend(MilvusOptions(uri=uri, prefix=prefix or "t" + uuid.uuid4().hex[:8], timeout_seconds=timeout))


@pytest.fixture()
def backend(milvus_uri) -> Iterator[MilvusBackend]:
    b = make_backend(milvus_uri)
    yield b
    b.close()


def items_for(collection, n: int = 20, prefix: str = "i") -> list[StoredItem]:
    out = []
    for i in range(n):
        content = f"{prefix} content {i}"
        payload = {"n": i, "tag": "even" if i % 2 == 0 else "odd"}
        if i % 3 == 0:
            payload["flag"] = i % 2 == 0
        out.append(
            StoredItem(
                id=f"{prefix}{i:03d}",
                modality="text" if i % 4 else "image",
                vector=collection.prepare_vectors(vector_of(content))[0],
                payload=payload,
                content=content,
            )
        )
    return out


def test_create_write_read_page_search_delete(backend):
    c = backend.create(CollectionConfig(name="docs-a_1", dim=DIM, model="m/1", modalities=("text", "image")))
    with pytest.raises(CollectionExistsError):
        backend.create(CollectionConfig(name="docs-a_1", dim=DIM))
    with pytest.raises(CollectionNotFoundError):
        backend.get("missing")
    with pytest.raises(CollectionNotFoundError):
        backend.drop("missing")
    items = items_for(c)
    seq1 = c.upsert(items)
    c = backend.get("docs-a_1")
    assert c.count() == 20
    got = c.get("i003")
    assert got.payload == {"n": 3, "tag": "odd", "flag": False} and got.content == "i content 3"
    assert np.allclose(got.vector, items[3].vector, atol=1e-6)
    with pytest.raises(ItemNotFoundError):
        c.get("nope")

    # page: id order, cursor, filter
    first = c.page(None, 7, None)
    assert [i.id for i in first] == [f"i{n:03d}" for n in range(7)]
    rest = c.page(first[-1].id, 100, None)
    assert [i.id for i in rest] == [f"i{n:03d}" for n in range(7, 20)]
    assert [i.id for i in c.page("i004", 3, {"tag": "even"})] == ["i006", "i008", "i010"]
    assert c.page("i019", 5, None) == []

    # search: self is the top hit; exclude skips it; filter and modality apply before ranking
    hits = c.search(items[5].vector[None, :], 3)[0]
    assert hits[0].id == "i005" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert hits[0].payload == items[5].payload and hits[0].content == "i content 5" and hits[0].modality == "text"
    excluded = c.search(np.stack([items[5].vector, items[6].vector]), 3, exclude=["i005", None])
    assert "i005" not in [h.id for h in excluded[0]] and len(excluded[0]) == 3
    assert excluded[1][0].id == "i006"
    filtered = c.search(items[5].vector[None, :], 20, filter={"n": {"$gte": 10}}, modality="image")[0]
    assert sorted(h.id for h in filtered) == ["i012", "i016"]
    assert c.search(items[5].vector[None, :], 5, filter={"n": {"$in": [1, 2.0, 7]}})[0][0].id in {
        "i001",
        "i002",
        "i007",
    }

    # errors the faiss backend raises
    with pytest.raises(FilterError, match="unknown filter field 'nope'"):
        c.search(items[0].vector[None, :], 3, filter={"nope": 1})
    with pytest.raises(FilterError, match="unknown modality"):
        c.search(items[0].vector[None, :], 3, modality="audio")
    with pytest.raises(PayloadError, match="'n' is a number"):
        c.upsert([StoredItem(id="x", modality="text", vector=items[0].vector, payload={"n": "one"})])
    with pytest.raises(InvalidVectorError):
        c.prepare_vectors([[0.0] * DIM])
    with pytest.raises(InvalidCollectionError, match="invalid item id"):
        c.upsert([StoredItem(id="a/../b", modality="text", vector=items[0].vector)])
    with pytest.raises(InvalidCollectionError, match="bytes"):
        c.upsert([StoredItem(id="big", modality="image", vector=items[0].vector, content="x" * 70_000)])
    assert c.count() == 20  # nothing of the refused writes landed

    # delete by ids and/or filter; upsert replaces
    seq2, deleted = c.delete(ids=["i001", "i002", "nope"], filter={"tag": "odd"})
    assert deleted == ["i001"] and seq2 > seq1
    _, deleted = c.delete(filter={"n": {"$lt": 4}})
    assert deleted == ["i000", "i002", "i003"]
    c.upsert([StoredItem(id="i010", modality="text", vector=items[10].vector, payload={"tag": "new"}, content="c")])
    assert c.get("i010").payload == {"tag": "new"}
    assert c.count() == 16

    stats = c.stats()
    assert stats["count"] == 16 and sum(stats["by_modality"].values()) == 16
    assert stats["payload_fields"] == {"n": "number", "tag": "string", "flag": "bool"}
    assert stats["modality_gap"] is not None and stats["modality_gap_correction"] is False
    assert stats["index"]["backend"] == "milvus" and stats["index"]["milvus_index"] == "AUTOINDEX"
    assert stats["index"]["collection"] == names.physical(backend.prefix, "docs-a_1", 0)
    assert c.rebuild() == "AUTOINDEX"
    assert c.search(items[5].vector[None, :], 1)[0][0].id == "i005"

    handles, broken = backend.listing()
    assert [h.name for h in handles] == ["docs-a_1"] and broken == {}
    backend.drop("docs-a_1")
    assert backend.listing() == ([], {})
    client = backend.conn.client()[0]
    assert not [n for n in client.list_collections() if n.startswith(backend.prefix + "_docs")]


def test_filters_match_the_faiss_backend(backend, tmp_path):
    """The same items and filters on both backends give the same ids ($ne matches items without the
    field, $in, 3 == 3.0, bools, ranges)."""
    faiss = CollectionManager(tmp_path)
    config = CollectionConfig(name="same", dim=DIM, modalities=("text", "image"))
    m, f = backend.create(config), faiss.create(config)
    items = items_for(m, 24)
    items.append(StoredItem(id="float", modality="text", vector=items[0].vector, payload={"n": 3.0, "tag": ""}))
    m.upsert(items)
    f.upsert([StoredItem(i.id, i.modality, i.vector.copy(), dict(i.payload), i.content) for i in items])
    filters = [
        {"tag": "even"},
        {"n": 3},
        {"n": 3.0},
        {"n": {"$ne": 3}},
        {"flag": True},
        {"flag": {"$ne": True}},
        {"flag": {"$eq": False}},
        {"tag": {"$in": ["odd", ""]}},
        {"n": {"$in": [1, 3, 5.0, 99]}},
        {"n": {"$gt": 4, "$lte": 9}, "tag": {"$ne": "odd"}},
        {"tag": {"$ne": "even"}, "flag": {"$ne": False}},
        {"n": {"$gte": 1e300}},
    ]
    try:
        for spec in filters:
            assert [i.id for i in m.page(None, 100, spec)] == [i.id for i in f.page(None, 100, spec)], spec
    finally:
        faiss.close()


@pytest.mark.parametrize(
    "kind,options",
    [("flat", {}), ("ivf", {"nlist": 4}), ("ivfpq", {"nlist": 4, "pq_m": 4}), ("hnsw", {"hnsw_m": 8, "ef_search": 4})],
)
def test_index_kinds(backend, kind, options):
    c = backend.create(CollectionConfig(name=f"k-{kind}", dim=DIM, index=IndexSpec(kind=kind, **options)))
    items = items_for(c, 40)
    c.upsert(items)
    assert c.stats()["index"]["milvus_index"] == {"flat": "FLAT", "ivf": "IVF_FLAT", "ivfpq": "IVF_PQ"}.get(
        kind, "HNSW"
    )
    hits = c.search(items[7].vector[None, :], 10, nprobe=4)[0]
    assert len(hits) == 10  # hnsw: ef is raised to k (Milvus returns nothing with ef < k)
    if kind != "ivfpq":  # PQ is approximate even for the item itself
        assert hits[0].id == "i007"
    assert c.rebuild() == c.stats()["index"]["milvus_index"]


def test_refused_creates_leave_nothing(backend):
    with pytest.raises(InvalidCollectionError, match="faiss backend"):
        backend.create(CollectionConfig(name="gap", dim=DIM, modality_gap_correction=True))
    assert backend.listing() == ([], {})
    client = backend.conn.client()[0]
    assert [n for n in client.list_collections() if n.startswith(backend.prefix + "_")] == [names.meta(backend.prefix)]


HOSTILE = [
    'x" or 1==1 or "',
    '" or true or "',
    "\\",
    '\\" or id != "',
    "]",
    '"]) or (payload["n"] > -1',
    ") or (",
    "line\nnext",
    "\x01\x7f",
    "é😀\u2028",
    "\\u0022 or 1==1",
]


def test_injection_attempts_are_data(backend):
    c = backend.create(CollectionConfig(name="inj", dim=DIM))
    items = [
        StoredItem(id=f"h{n:02d}", modality="text", vector=c.prepare_vectors(vector_of(str(n)))[0], payload={"s": v})
        for n, v in enumerate(HOSTILE)
    ]
    items.append(StoredItem(id='q"x\\', modality="text", vector=items[0].vector, payload={"s": "plain"}))
    c.upsert(items)
    for n, value in enumerate(HOSTILE):
        assert [i.id for i in c.page(None, 100, {"s": value})] == [f"h{n:02d}"], value
        assert [h.id for h in c.search(items[n].vector[None, :], 50, filter={"s": value})[0]] == [f"h{n:02d}"]
        assert len(c.page(None, 100, {"s": {"$ne": value}})) == len(items) - 1
        assert [i.id for i in c.page(None, 100, {"s": {"$in": [value, "nothing"]}})] == [f"h{n:02d}"]
        # as a cursor, an id, a delete: data, never an expression
        with pytest.raises(ItemNotFoundError):
            c.get(value if value.isprintable() else "zz")
        if value.isprintable():
            assert c.delete(ids=[value])[1] == []
    assert [i.id for i in c.page('h05"] or id != "', 100, None)] == [f"h{n:02d}" for n in range(6, len(HOSTILE))] + [
        'q"x\\'
    ]
    assert c.get('q"x\\').payload == {"s": "plain"}
    # paging in the server's iterator mode, across batch boundaries that fall on hostile ids
    every = [row["id"] for batch in c.conn.iterate(c.physical, "", ["id"], batch=2) for row in batch]
    assert every == sorted(i.id for i in items)
    for field in ['payload["s"]', 's"] or 1==1 or payload["s', "s\n", "s]"]:
        with pytest.raises(FilterError, match="invalid filter field"):
            c.page(None, 10, {field: "x"})
    assert c.count() == len(items)


def test_two_backends_are_replicas(milvus_uri):
    prefix = "t" + uuid.uuid4().hex[:8]
    a, b = make_backend(milvus_uri, prefix), make_backend(milvus_uri, prefix)
    try:
        ca = a.create(CollectionConfig(name="shared", dim=DIM, model="m/1"))
        assert [h.name for h in b.listing()[0]] == ["shared"]
        cb = b.get("shared")
        items = items_for(ca, 5)
        ca.upsert(items)
        assert cb.search(items[2].vector[None, :], 1)[0][0].id == "i002"  # at once: strong consistency
        cb.upsert([StoredItem(id="from-b", modality="text", vector=items[0].vector, payload={"extra": 1})])
        assert a.get("shared").page(None, 10, {"extra": 1})[0].id == "from-b"  # b's new field, seen by a
        with pytest.raises(CollectionExistsError):
            b.create(CollectionConfig(name="shared", dim=DIM))
        b.drop("shared")
        with pytest.raises(CollectionNotFoundError):
            a.get("shared")
        assert a.listing() == ([], {})
    finally:
        a.close()
        b.close()


def test_reembed_flips_and_refuses_writes_on_every_replica(milvus_uri):
    prefix = "t" + uuid.uuid4().hex[:8]
    a, b = make_backend(milvus_uri, prefix), make_backend(milvus_uri, prefix)
    try:
        c = a.create(CollectionConfig(name="re-emb", dim=DIM, model="m/1", modalities=("text", "image")))
        c.upsert(items_for(c, 30))
        with pytest.raises(ReembedRefusedError, match="already holds"):
            a.start_reembed(CollectionConfig(name="re-emb", dim=16, model="m/1", modalities=("text", "image")), None)
        with pytest.raises(ReembedRefusedError, match="does not embed"):
            a.start_reembed(CollectionConfig(name="re-emb", dim=16, model="m/2"), embedder(16))
        assert a.reembed_status("re-emb") is None
        c.upsert(items_for(c, 1, prefix="after-refusal"))  # refusals leave writes open

        started = time.monotonic()
        release = [False]

        def slow(items):
            while not release[0] and time.monotonic() - started < 20:
                time.sleep(0.05)
            return embedder(16)(items)

        job = a.start_reembed(CollectionConfig(name="re-emb", dim=16, model="m/2", modalities=("text", "image")), slow)
        job.settle_seconds = 0.2
        other = b.get("re-emb")
        with pytest.raises(CollectionBusyError, match="re-embedded"):
            other.upsert(items_for(other, 1, prefix="during"))
        with pytest.raises(CollectionBusyError):
            other.delete(ids=["i001"])
        with pytest.raises(CollectionBusyError):
            b.drop("re-emb")
        with pytest.raises(CollectionBusyError):
            b.start_reembed(CollectionConfig(name="re-emb", dim=16, model="m/3", modalities=("text", "image")), slow)
        assert b.reembed_status("re-emb")["state"] == "running"
        assert other.search(other.prepare_vectors(vector_of("i content 3")), 1)[0][0].id == "i003"  # old still serves
        release[0] = True
        job.join(30)
        assert job.progress.as_dict()["state"] == "done", job.progress.error
        status = b.reembed_status("re-emb")
        assert status["state"] == "done" and status["done"] == 31 and status["target_model"] == "m/2"

        new = b.get("re-emb")
        assert new.config.generation == 1 and new.config.model == "m/2" and new.config.dim == 16
        client = a.conn.client()[0]
        assert client.describe_alias(names.alias(prefix, "re-emb"))["collection_name"] == new.physical
        query = new.prepare_vectors(vector_of("i content 3", 16))
        assert new.search(query, 1)[0][0].id == "i003" and new.count() == 31
        assert new.stats()["payload_fields"] == {"n": "number", "tag": "string", "flag": "bool"}
        new.upsert([StoredItem(id="later", modality="text", vector=query[0], content="later")])  # writes open again
        # the old generation serves requests still on it until the grace ends, then is dropped
        assert other.count() == 31
        with pytest.raises(CollectionBusyError, match="re-embedded while"):  # it would land in the old generation
            other.upsert(items_for(other, 1, prefix="stale"))
        a.retired_grace_seconds = 0
        assert a.snapshot_dirty() == [names.physical(prefix, "re-emb", 0)]
        assert not client.has_collection(names.physical(prefix, "re-emb", 0))
        b.drop("re-emb")
        assert [n for n in client.list_collections() if n.startswith(prefix + "_re")] == []
    finally:
        a.close()
        b.close()


def test_a_failed_reembed_leaves_the_collection_as_it_was(backend):
    c = backend.create(CollectionConfig(name="fails", dim=DIM, model="m/1"))
    c.upsert(items_for(c, 5))

    def failing(items):
        raise RuntimeError("the model fell over")

    job = backend.start_reembed(
        CollectionConfig(name="fails", dim=16, model="m/2", modalities=("text", "image")), failing
    )
    job.join(30)
    status = backend.reembed_status("fails")
    assert status["state"] == "failed" and "fell over" in status["error"]
    same = backend.get("fails")
    assert same.config.generation == 0 and same.count() == 5
    same.upsert(items_for(same, 1, prefix="ok"))  # unfrozen
    client = backend.conn.client()[0]
    assert not client.has_collection(names.physical(backend.prefix, "fails", 1))

    vectors_only = backend.create(CollectionConfig(name="bare", dim=DIM, model="m/1"))
    vectors_only.upsert([StoredItem(id="v", modality="vector", vector=items_for(c, 1)[0].vector)])
    with pytest.raises(ReembedRefusedError, match="without the text or image"):
        backend.start_reembed(CollectionConfig(name="bare", dim=16, model="m/2"), embedder(16))


def test_outage_is_503_and_recovers(tmp_path):
    server = MilvusLiteServer(tmp_path / "milvus")
    b = make_backend(server.uri, timeout=2.0)  # Milvus is down: constructing and opening do not fail
    b.open_all()
    started = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=server.uri.replace(".", r"\.")):
        b.get("any")
    assert time.monotonic() - started < 5
    server.start()
    try:
        c = b.create(CollectionConfig(name="survives", dim=DIM))
        items = items_for(c, 5)
        c.upsert(items)
        server.stop()
        for call in (lambda: c.search(items[0].vector[None, :], 1), lambda: c.upsert(items), b.listing):
            started = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                call()
            assert time.monotonic() - started < 5
        server.start()
        again = b.get("survives")  # the collection is loaded again after the server's restart
        assert again.search(items[1].vector[None, :], 1)[0][0].id == "i001"
        assert [h.name for h in b.listing()[0]] == ["survives"]
    finally:
        b.close()
        server.stop()


def test_a_file_uri_runs_milvus_lite_embedded(tmp_path):
    b = make_backend(str(tmp_path / "lite.db"))
    try:
        c = b.create(CollectionConfig(name="local", dim=DIM))
        items = items_for(c, 3)
        c.upsert(items)
        assert c.search(items[2].vector[None, :], 1)[0][0].id == "i002"
    finally:
        b.close()


def test_pages_are_in_id_order_across_segments(backend):
    c = backend.create(CollectionConfig(name="many", dim=DIM))
    rng = np.random.default_rng(1)
    ids = [f"{rng.integers(10**9):09d}-{n}" for n in range(1500)]
    vector = c.prepare_vectors(vector_of("x"))[0]
    for start in range(0, len(ids), 300):  # several writes: several segments
        c.upsert(
            [
                StoredItem(id=i, modality="text", vector=vector, payload={"odd": int(i[-1]) % 2 == 1})
                for i in ids[start : start + 300]
            ]
        )
        if start == 600:
            c.conn.call("flush", c.physical)
    c.delete(ids=ids[:50])
    want = sorted(ids[50:])
    seen, cursor = [], None
    while True:
        page = c.page(cursor, 400, None)
        if not page:
            break
        seen.extend(i.id for i in page)
        cursor = page[-1].id
    assert seen == want
    odd = [i.id for i in c.page(want[100], 50, {"odd": True})]
    assert odd == [i for i in want if i > want[100] and int(i[-1]) % 2 == 1][:50]


def test_reembed_catches_up_writes_that_passed_the_check_before_the_freeze(backend):
    c = backend.create(CollectionConfig(name="late", dim=DIM, model="m/1"))
    items = items_for(c, 6)
    for item in items:
        item.modality = "text"
    c.upsert(items)
    gate = [False]

    def slow(batch):
        while not gate[0]:
            time.sleep(0.02)
        return embedder(16)(batch)

    job = backend.start_reembed(CollectionConfig(name="late", dim=16, model="m/2"), slow)
    job.settle_seconds = 0.5
    # Writes that read the collection as writable just before the freeze land now, straight in Milvus.
    late = {
        "id": "late",
        "vector": items[0].vector.tolist(),
        "modality": "text",
        "content": "late one",
        "payload": {"n": 99},
        "written_at": job.frozen_at + 1,
    }
    c.conn.call("upsert", c.physical, [late])
    c.conn.call("delete", c.physical, filter='id in ["i002"]')
    gate[0] = True
    job.join(30)
    assert job.progress.state == "done", job.progress.error
    new = backend.get("late")
    assert sorted(i.id for i in new.page(None, 100, None)) == ["i000", "i001", "i003", "i004", "i005", "late"]
    assert np.allclose(new.get("late").vector, new.prepare_vectors(vector_of("late one", 16))[0], atol=1e-5)


def test_close_cancels_a_running_reembed(milvus_uri):
    b = make_backend(milvus_uri)
    c = b.create(CollectionConfig(name="cut", dim=DIM, model="m/1"))
    c.upsert(items_for(c, 3))

    def never(batch):
        time.sleep(0.2)
        return embedder(16)(batch)

    job = b.start_reembed(CollectionConfig(name="cut", dim=16, model="m/2", modalities=("text", "image")), never)
    job.settle_seconds = 60
    b.close()
    assert job.progress.state == "failed" and "shutting down" in job.progress.error
    other = make_backend(milvus_uri, b.prefix)
    try:
        assert other.get("cut").config.generation == 0
        other.get("cut").upsert(items_for(c, 1, prefix="open"))  # writes open again
        assert not other.conn.call("has_collection", names.physical(b.prefix, "cut", 1))
    finally:
        other.close()
