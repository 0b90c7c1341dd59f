"""Search hits on the faiss backend: the batched row lookup (`CollectionStore.hit_rows`) against the
per-row reads it replaced, and `include` choosing what hits carry and what rows are read."""

from __future__ import annotations

import numpy as np
import pytest

from index.config import CollectionConfig
from index.engine import IndexSpec
from index.items import HIT_DEFAULT, StoredItem
from index.manager import CollectionManager

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture()
def collection(tmp_path):
    manager = CollectionManager(tmp_path / "collections")
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=IndexSpec(kind="flat")))
    vectors = unit_vectors(1200)  # past SQLite's 999-variable limit of old, and by_vids' 500-row chunks
    c.upsert(
        [
            StoredItem(
                id=f"i{i}",
                modality="text" if i % 3 else "vector",
                vector=v,
                payload={"n": i, "tags": ["a", {"deep": i}]},
                content=f"text {i}" if i % 3 else None,
            )
            for i, v in enumerate(vectors)
        ]
    )
    yield c
    manager.close()


def test_hit_rows_reads_what_by_vids_read(collection):
    store = collection.store
    vids = np.array([v for v in range(1, 1201, 1)] + [-1, -1, 5, 5], dtype=np.int64)  # padding and repeats
    batched = store.hit_rows(vids)
    single = store.by_vids(list(range(1, 1201)), with_vectors=False)
    assert batched.keys() == single.keys() and len(batched) == 1200
    for vid, item in single.items():
        got = batched[vid]
        assert (got.id, got.modality, got.payload, got.content, got.vid) == (
            item.id,
            item.modality,
            item.payload,
            item.content,
            item.vid,
        )


def test_hit_rows_reads_only_what_is_included(collection):
    store = collection.store
    vid = int(next(iter(store.by_vids([1, 2, 3], with_vectors=False))))
    bare = store.hit_rows(np.array([vid]), frozenset())[vid]
    assert bare.payload == {} and bare.content is None and bare.vector.size == 0 and bare.modality
    with_vector = store.hit_rows(np.array([vid]), frozenset({"vector"}))[vid]
    assert np.array_equal(with_vector.vector, store.by_vids([vid])[vid].vector) and with_vector.payload == {}
    assert store.hit_rows(np.array([-1, -1]), HIT_DEFAULT) == {}


@pytest.mark.parametrize(
    "include",
    [HIT_DEFAULT, frozenset(), frozenset({"payload"}), frozenset({"content", "vector"})],
    ids=["default", "none", "payload", "content+vector"],
)
def test_search_hits_carry_what_is_included(collection, include):
    queries = unit_vectors(4, seed=1)
    default = collection.search(queries, 10)
    hits = collection.search(queries, 10, include=include)
    assert [[(h.id, h.score, h.modality) for h in row] for row in hits] == [
        [(h.id, h.score, h.modality) for h in row] for row in default
    ]
    for row, default_row in zip(hits, default):
        for hit, plain in zip(row, default_row):
            assert hit.payload == (plain.payload if "payload" in include else {})
            assert hit.content == (plain.content if "content" in include else None)
            if "vector" in include:
                assert np.array_equal(hit.vector, collection.get(hit.id).vector)
            else:
                assert hit.vector is None


def test_deleted_first_hits_fall_back_to_the_spare_candidates(collection):
    """A hit deleted between the FAISS search and the row lookup: the spare candidates fill the top k."""
    query = unit_vectors(1, seed=2)
    before = [h.id for h in collection.search(query, 5)[0]]
    collection.store.delete("id = ?", [before[0]])  # the store only: the index still returns it
    after = [h.id for h in collection.search(query, 5, include=frozenset())[0]]
    assert after == before[1:] + after[4:] and len(after) == 5 and before[0] not in after
