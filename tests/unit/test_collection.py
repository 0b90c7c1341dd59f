"""The index package on its own: store + FAISS kept in step, snapshots, replay, filters."""

from __future__ import annotations

import numpy as np
import pytest

from index.config import CollectionConfig, validate_collection_name, validate_item_id
from index.engine import IndexSpec
from index.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    InvalidCollectionError,
    InvalidVectorError,
    PayloadError,
)
from index.items import StoredItem
from index.manager import CollectionManager

DIM = 16


def clustered(n: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM))
    points = centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def items(vectors: np.ndarray, start: int = 0, **payload) -> list[StoredItem]:
    return [
        StoredItem(id=f"i{start + i}", modality="vector", vector=v, payload={"n": start + i, **payload})
        for i, v in enumerate(vectors)
    ]


@pytest.fixture()
def manager(tmp_path):
    m = CollectionManager(tmp_path / "collections")
    yield m
    m.close()


def test_upsert_replaces_never_duplicates(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    vectors = clustered(10)
    c.upsert(items(vectors))
    c.upsert([StoredItem(id="i3", modality="vector", vector=vectors[7], payload={"n": 99})])
    assert c.store.count() == 10 and c.index.index.ntotal == 10
    hits = c.search(vectors[7:8], 2)[0]
    assert {h.id for h in hits} == {"i3", "i7"}
    assert c.get("i3").payload == {"n": 99}
    # Duplicate ids within one batch: the last one wins.
    c.upsert([StoredItem("dup", "vector", vectors[0]), StoredItem("dup", "vector", vectors[1], {"n": 1})])
    assert c.get("dup").payload == {"n": 1} and c.index.index.ntotal == 11


def test_filter_applies_before_ranking(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    vectors = clustered(200)
    c.upsert(items(vectors[:100], group="a") + items(vectors[100:], start=100, group="b"))
    hits = c.search(vectors[:1], 10, filter={"group": "b"})[0]
    assert len(hits) == 10  # all from b, although a's vectors are nearer: no over-fetch-and-drop
    assert all(h.payload["group"] == "b" for h in hits)
    assert c.search(vectors[:1], 5, filter={"n": {"$gte": 195}})[0][0].payload["n"] >= 195
    assert c.search(vectors[:1], 5, filter={"group": "nope"}) == [[]]


def test_delete_by_ids_and_by_filter(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    c.upsert(items(clustered(20)))
    _, deleted = c.delete(ids=["i1", "i2", "missing"])
    assert deleted == ["i1", "i2"]
    _, deleted = c.delete(filter={"n": {"$gte": 15}})
    assert sorted(deleted) == ["i15", "i16", "i17", "i18", "i19"]
    assert c.store.count() == 13 and c.index.index.ntotal == 13
    with pytest.raises(InvalidCollectionError):
        c.delete()


def test_snapshot_then_replay_of_later_writes(tmp_path):
    c = CollectionManager(tmp_path / "collections").create(CollectionConfig(name="c", dim=DIM))
    vectors = clustered(50)
    c.upsert(items(vectors[:30]))
    c.snapshot()
    c.upsert(items(vectors[30:], start=30))  # after the snapshot: only in the store
    c.delete(ids=["i0"])
    # Simulate a crash: the process ends here, without the closing snapshot.
    reopened = CollectionManager(tmp_path / "collections").get("c")
    assert reopened.index.index.ntotal == 49
    assert reopened.search(vectors[40:41], 1)[0][0].id == "i40"
    assert "i0" not in {h.id for h in reopened.search(vectors[0:1], 5)[0]}


def test_corrupt_snapshot_is_rebuilt_from_the_store(manager, tmp_path, caplog):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    vectors = clustered(40)
    c.upsert(items(vectors))
    manager.close()
    (tmp_path / "collections" / "c" / "index.snapshot").write_bytes(b"DUETIDX1garbage")
    with caplog.at_level("WARNING"):
        reopened = CollectionManager(tmp_path / "collections").get("c")
    assert "rebuilding from the store" in caplog.text
    assert reopened.index.index.ntotal == 40
    assert reopened.search(vectors[5:6], 1)[0][0].id == "i5"


def test_auto_index_switches_to_ivf_with_good_recall(manager):
    spec = IndexSpec(kind="auto", auto_ivf_threshold=5000, nlist=32, nprobe=8)
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=spec))
    vectors = clustered(6000)
    for start in range(0, 6000, 2000):
        c.upsert(items(vectors[start : start + 2000], start=start))
    assert c.index.factory == "IVF32,Flat"
    queries = clustered(50, seed=1)
    exact = queries @ vectors.T
    truth = np.argsort(-exact, axis=1)[:, :10]
    found = c.search(queries, 10)
    recall = np.mean([len({f"i{t}" for t in row} & {h.id for h in hits}) / 10 for row, hits in zip(truth, found)])
    assert recall >= 0.9


def test_hnsw_deletes_are_tombstones_excluded_from_results(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=IndexSpec(kind="hnsw")))
    vectors = clustered(300)
    c.upsert(items(vectors))
    c.delete(ids=["i10"])
    c.upsert([StoredItem("i11", "vector", vectors[200], {"n": -1})])
    assert "i10" not in {h.id for h in c.search(vectors[10:11], 5)[0]}
    top = c.search(vectors[11:12], 5)[0]
    assert "i11" not in {h.id for h in top[:1]}
    assert c.stats()["index"]["tombstones"] == 2


def test_modality_gap_correction_ranks_across_modalities():
    """Synthetic paired data with a constant offset per modality (the modality gap): without
    correction a text query finds texts first; with per-modality mean removal it finds the
    matching image first."""
    import tempfile
    from pathlib import Path

    rng = np.random.default_rng(0)
    topics = rng.normal(size=(30, DIM))
    offset = rng.normal(size=DIM) * 3

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    texts = unit(topics + offset + 0.1 * rng.normal(size=topics.shape))
    images = unit(topics - offset + 0.1 * rng.normal(size=topics.shape))
    query = unit(topics[7] + offset + 0.1 * rng.normal(size=DIM))[None, :]
    stored = [StoredItem(f"t{i}", "text", v) for i, v in enumerate(texts)]
    stored += [StoredItem(f"img{i}", "image", v) for i, v in enumerate(images)]
    with tempfile.TemporaryDirectory() as tmp:
        manager = CollectionManager(Path(tmp))
        for correct in (False, True):
            c = manager.create(CollectionConfig(name=f"gap{int(correct)}", dim=DIM, modality_gap_correction=correct))
            c.upsert(stored)
            c.rebuild()  # centroids are computed at build time
            best_image = c.search(query, 1, query_modalities=["text"], modality="image")[0][0].id
            top = [h.id for h in c.search(query, 5, query_modalities=["text"])[0]]
            if correct:
                assert best_image == "img7"
                assert top.index("img7") < 2  # the image now competes with the matching text
                assert c.stats()["modality_gap"] > 1.0
            else:
                assert all(t.startswith("t") for t in top)  # the gap: texts crowd out every image
        manager.close()


def test_bad_vectors_and_payloads_are_refused(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    with pytest.raises(InvalidVectorError, match="16 dimensions"):
        c.prepare_vectors([1.0, 2.0])
    with pytest.raises(InvalidVectorError, match="NaN"):
        c.prepare_vectors([float("nan")] * DIM)
    with pytest.raises(InvalidVectorError, match="zero vector"):
        c.prepare_vectors([0.0] * DIM)
    c.upsert([StoredItem("a", "vector", clustered(1)[0], {"year": 2020})])
    with pytest.raises(PayloadError, match="'year' is a number"):
        c.upsert([StoredItem("b", "vector", clustered(1)[0], {"year": "2020"})])
    assert c.store.count() == 1  # the refused batch left nothing behind


def test_manager_names_and_errors(manager):
    manager.create(CollectionConfig(name="one", dim=4))
    with pytest.raises(CollectionExistsError):
        manager.create(CollectionConfig(name="one", dim=4))
    with pytest.raises(CollectionNotFoundError):
        manager.get("two")
    with pytest.raises(InvalidCollectionError):
        manager.get("../etc")
    for name in ("one\n", "", "-x", "a" * 101):  # "one\n" passed a `$`-anchored rule
        with pytest.raises(InvalidCollectionError):
            validate_collection_name(name)
    with pytest.raises(InvalidCollectionError):
        validate_item_id("id\n")
    with pytest.raises(InvalidCollectionError):
        CollectionConfig(name="x", dim=4, metric="l2")
    assert manager.names() == ["one"]
    manager.drop("one")
    assert manager.names() == []


def test_hnsw_compacts_when_a_quarter_is_tombstones(manager):
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=IndexSpec(kind="hnsw")))
    c.upsert(items(clustered(4000)))
    c.delete(filter={"n": {"$lt": 900}})
    assert len(c.index.deleted) == 900  # under the threshold: still tombstones
    c.delete(filter={"n": {"$lt": 1100}})
    assert len(c.index.deleted) == 0 and c.index.index.ntotal == 2900  # rebuilt without them


def test_searches_run_concurrently_with_writes(manager):
    import threading

    c = manager.create(CollectionConfig(name="c", dim=DIM))
    vectors = clustered(3000)
    c.upsert(items(vectors[:1000]))
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                for hits in c.search(vectors[:8], 5):
                    assert len(hits) == 5 and all(h.id.startswith("i") for h in hits)
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors.append(exc)
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(1000, 3000, 100):
        c.upsert(items(vectors[start : start + 100], start=start))
        c.delete(ids=[f"i{start}"])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert c.store.count() == c.index.index.ntotal == 2980
