"""Re-embedding at the index level: a new generation beside the old, one atomic flip, restarts
that see one whole generation, failures that leave the old one as it was. Vectors come from a
deterministic stand-in for a model (a hash of the content), so these run without torch."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import replace

import numpy as np
import pytest

from index.config import CollectionConfig
from index.errors import CollectionBusyError, ReembedRefusedError
from index.items import StoredItem
from index.layout import STORE_FILE
from index.manager import CollectionManager

TEXTS = {f"id{i}": f"text number {i}" for i in range(7)}


def vector_of(content: str, dim: int) -> np.ndarray:
    seed = int(hashlib.sha256(f"{dim}:{content}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def embedder(dim: int):
    return lambda items: np.stack([vector_of(item.content, dim) for item in items])


@pytest.fixture()
def manager(tmp_path):
    manager = CollectionManager(tmp_path / "collections")
    config = CollectionConfig(name="docs", dim=8, model="m/1")
    collection = manager.create(config)
    collection.upsert(
        [
            StoredItem(id=k, modality="text", vector=collection.prepare_vectors(vector_of(t, 8))[0], content=t)
            for k, t in TEXTS.items()
        ]
    )
    yield manager
    manager.close()


def reembed(manager, dim=16, model="m/2", embed=None):
    old = manager.get("docs")
    job = manager.start_reembed(replace(old.config, model=model, dim=dim), embed or embedder(dim))
    return old, job


def test_flip_installs_the_new_generation_and_a_restart_sees_it(manager, tmp_path):
    old, job = reembed(manager)
    job._thread.join(60)
    assert job.progress.state == "done" and job.progress.done == job.progress.total == len(TEXTS)
    new = manager.get("docs")
    assert new is not old and (new.config.model, new.config.dim, new.config.generation) == ("m/2", 16, 1)
    hits = new.search(new.prepare_vectors(vector_of(TEXTS["id3"], 16)), 1)
    assert hits[0][0].id == "id3" and hits[0][0].content == TEXTS["id3"]
    assert old.search(old.prepare_vectors(vector_of(TEXTS["id3"], 8)), 1)[0][0].id == "id3"  # old still answers
    with pytest.raises(CollectionBusyError):  # a write that still holds the old collection is refused, not lost
        old.upsert([StoredItem(id="late", modality="text", vector=old.prepare_vectors(np.ones(8))[0], content="x")])
    folder = new.folder
    assert (folder / "gen-1" / STORE_FILE).exists() and (folder / STORE_FILE).exists()  # old kept for a grace
    manager.close()
    assert not (folder / STORE_FILE).exists()  # ... and deleted after it

    reopened = CollectionManager(tmp_path / "collections").get("docs")
    assert (reopened.config.model, reopened.store.count()) == ("m/2", len(TEXTS))
    reopened.store.close()


def test_a_restart_removes_generations_that_never_flipped(manager, tmp_path):
    folder = manager.get("docs").folder
    (folder / "gen-4").mkdir()
    (folder / "gen-4" / STORE_FILE).write_bytes(b"half-built")
    manager.close()
    reopened = CollectionManager(tmp_path / "collections")
    assert reopened.get("docs").store.count() == len(TEXTS) and not (folder / "gen-4").exists()
    reopened.close()


def test_a_failure_leaves_the_old_generation_untouched(manager, monkeypatch):
    monkeypatch.setattr("index.reembed.BATCH_ITEMS", 2)
    calls = []

    def failing(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise RuntimeError("the model fell over")
        return embedder(16)(items)

    old, job = reembed(manager, embed=failing)
    job._thread.join(60)
    assert job.progress.state == "failed" and job.progress.error == "the model fell over"
    assert manager.get("docs") is old and old.config.generation == 0
    assert not (old.folder / "gen-1").exists()
    old.upsert([StoredItem(id="after", modality="text", vector=old.prepare_vectors(np.ones(8))[0], content="ok")])


def test_one_at_a_time_and_writes_are_refused_while_it_runs(manager):
    gate = threading.Event()

    def slow(items):
        gate.wait(60)
        return embedder(16)(items)

    old, job = reembed(manager, embed=slow)
    try:
        with pytest.raises(CollectionBusyError, match="is being re-embedded into m/2"):
            reembed(manager)
        with pytest.raises(CollectionBusyError):
            old.upsert([StoredItem(id="x", modality="text", vector=old.prepare_vectors(np.ones(8))[0], content="x")])
        with pytest.raises(CollectionBusyError):
            old.delete(ids=["id1"])
        with pytest.raises(CollectionBusyError):
            manager.drop("docs")
    finally:
        gate.set()
    job._thread.join(60)
    assert manager.get("docs").config.model == "m/2"


def test_refusals(manager):
    with pytest.raises(ReembedRefusedError, match="already holds vectors of m/1"):
        reembed(manager, dim=8, model="m/1")
    with pytest.raises(ReembedRefusedError, match="does not embed"):
        old = manager.get("docs")
        manager.start_reembed(replace(old.config, model="img/1", modalities=("image",)), embedder(8))
    old = manager.get("docs")
    old.upsert([StoredItem(id="bare", modality="vector", vector=old.prepare_vectors(np.ones(8))[0])])
    with pytest.raises(ReembedRefusedError, match="1 items .* were stored as vectors"):
        reembed(manager)
    old.upsert([StoredItem(id="still", modality="text", vector=old.prepare_vectors(np.ones(8))[0], content="ok")])
