"""Hits named from memory (`index.hit_names.HitNames`), for searches that carry no payload, content or
vector: they must answer exactly what the row lookup answers, through every write that changes names."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from index.config import CollectionConfig
from index.engine import IndexSpec
from index.hit_names import HitNames
from index.items import HIT_DEFAULT, StoredItem
from index.manager import CollectionManager

DIM = 8


def unit_vectors(n: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, DIM))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def items(start: int, n: int, seed: int = 0, modality: str = "text") -> list[StoredItem]:
    return [
        StoredItem(id=f"i{start + j}", modality=modality if j % 2 else "image", vector=v, payload={"n": start + j})
        for j, v in enumerate(unit_vectors(n, seed))
    ]


def named(results) -> list[list[tuple[str, float, str]]]:
    return [[(h.id, round(h.score, 5), h.modality) for h in row] for row in results]


def test_lookup_names_padding_gaps_and_removed():
    names = HitNames.from_rows([(1, "a", "text"), (3, "b", "image"), (5000, "c", "vector")])
    ids, modalities, present = names.lookup(np.array([[1, -1, 2], [3, 5000, 99999]]))
    assert ids.tolist() == [["a", None, None], ["b", "c", None]]
    assert present.tolist() == [[True, False, False], [True, True, False]]
    assert modalities.tolist() == [["text", None, None], ["image", "vector", None]]
    names.remove([3, -1, 10**9])  # unknown and negative vids are ignored
    names.add([7], ["d"], ["text"])
    assert names.lookup(np.array([3, 7]))[0].tolist() == [None, "d"]
    assert len(names) == 3


def test_add_refuses_unknown_modality_and_mismatched_lengths():
    names = HitNames()
    with pytest.raises(KeyError):
        names.add([1], ["a"], ["audio"])
    with pytest.raises(ValueError):
        names.add([1, 2], ["a"], ["text", "text"])


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_named_hits_equal_row_lookup_through_writes(tmp_path, kind):
    """Upserts, replacements (new vids), deletes, self-exclusion and a reopen: `include: []` answers the same
    ids, scores and modalities as the row lookup every time."""
    manager = CollectionManager(tmp_path / "collections")
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=IndexSpec(kind=kind)))
    queries = unit_vectors(7, seed=9)

    def check(exclude=None):
        plain = c.search(queries, 12, include=HIT_DEFAULT, exclude=exclude)
        fast = c.search(queries, 12, include=frozenset(), exclude=exclude)
        assert named(fast) == named(plain)
        assert all(h.payload == {} and h.content is None and h.vector is None for row in fast for h in row)
        return fast

    c.upsert(items(0, 300))
    check()  # the first search reads the names in
    c.upsert(items(100, 50, seed=1, modality="vector"))  # replaces i100..i149 under new vids and modality
    c.upsert(items(300, 40, seed=2))
    c.delete(ids=[f"i{n}" for n in range(0, 300, 3)])
    fast = check()
    seen = {h.id for row in fast for h in row}
    assert not any(f"i{n}" in seen for n in range(0, 300, 3))
    replaced = {f"i{100 + j}": ("vector" if j % 2 else "image") for j in range(50)}  # items(100, 50, ...)
    assert all(h.modality == replaced[h.id] for row in fast for h in row if h.id in replaced)
    excluded = fast[0][0].id
    assert excluded not in {h.id for h in check(exclude=[excluded] + [None] * 6)[0]}
    manager.close()
    reopened = CollectionManager(tmp_path / "collections")
    c = reopened.get("c")
    check()
    reopened.close()


def test_names_stay_right_while_writes_race_searches(tmp_path):
    """Searches without payload in one thread while another replaces and deletes: every hit a search names
    is an item that existed with that modality at some point, and after the writes stop the answers match
    the row lookup exactly."""
    manager = CollectionManager(tmp_path / "collections")
    c = manager.create(CollectionConfig(name="c", dim=DIM, index=IndexSpec(kind="flat")))
    c.upsert(items(0, 200))
    queries = unit_vectors(16, seed=5)
    stop = threading.Event()
    errors: list[BaseException] = []

    def search() -> None:
        try:
            while not stop.is_set():
                for row in c.search(queries, 10, include=frozenset()):
                    assert len(row) == 10
                    for hit in row:
                        assert hit.id.startswith("i") and hit.modality in {"text", "image", "vector"}
        except BaseException as e:  # reported below
            errors.append(e)

    reader = threading.Thread(target=search)
    reader.start()
    for round_ in range(30):
        c.upsert(items(round_ * 5, 20, seed=round_, modality="vector"))
        c.delete(ids=[f"i{round_ * 5 + 1}"])
    stop.set()
    reader.join()
    assert not errors, errors[0]
    assert named(c.search(queries, 10, include=frozenset())) == named(c.search(queries, 10))
    manager.close()
