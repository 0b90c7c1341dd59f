"""Collections appearing, disappearing and failing while in use: drop vs. writes and searches,
atomic creates, broken collections on disk, and snapshots that must prove every byte they hold."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from index.config import CollectionConfig
from index.engine import FaissIndex, IndexSpec
from index.errors import (
    CollectionBusyError,
    CollectionExistsError,
    CollectionNotFoundError,
    CollectionUnavailableError,
    InvalidCollectionError,
)
from index.items import StoredItem
from index.manager import CollectionManager

DIM = 8


def vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def items(vs: np.ndarray, start: int = 0) -> list[StoredItem]:
    return [
        StoredItem(id=f"i{start + i}", modality="vector", vector=v, payload={"n": start + i}) for i, v in enumerate(vs)
    ]


@pytest.fixture()
def root(tmp_path):
    return tmp_path / "collections"


@pytest.fixture()
def manager(root):
    m = CollectionManager(root)
    yield m
    m.close()


def _blocking_upsert(collection, release: threading.Event, entered: threading.Event):
    """Make the store's next upsert wait inside its call until `release` is set."""
    original = collection.store.upsert

    def upsert(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    collection.store.upsert = upsert


# -- drop ------------------------------------------------------------------------------


def test_drop_waits_for_an_in_flight_write_then_removes_everything(manager, root):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    release, entered = threading.Event(), threading.Event()
    _blocking_upsert(c, release, entered)
    results: dict[str, object] = {}

    def write():
        try:
            results["seq"] = c.upsert(items(vectors(3)))
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion below
            results["write_error"] = exc

    def drop():
        try:
            manager.drop("c")
            results["dropped"] = True
        except Exception as exc:  # noqa: BLE001
            results["drop_error"] = exc

    writer = threading.Thread(target=write)
    writer.start()
    assert entered.wait(5)
    dropper = threading.Thread(target=drop)
    dropper.start()
    time.sleep(0.3)
    assert dropper.is_alive(), "drop must wait for the write in flight"
    # While the drop waits, the collection is gone for new requests, cleanly.
    with pytest.raises(CollectionNotFoundError):
        manager.get("c")
    with pytest.raises(CollectionNotFoundError):
        c.search(vectors(1), 3)
    release.set()
    writer.join(10)
    dropper.join(10)
    assert results.get("seq") == 1 and results.get("dropped") is True, results
    assert not root.joinpath("c").exists() and [p.name for p in root.iterdir()] == []
    with pytest.raises(CollectionNotFoundError):
        c.upsert(items(vectors(1)))


def test_drop_refuses_with_busy_when_a_write_does_not_finish(manager, monkeypatch):
    import index.manager as module

    monkeypatch.setattr(module, "DROP_WAIT_SECONDS", 0.2)
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    release, entered = threading.Event(), threading.Event()
    _blocking_upsert(c, release, entered)
    writer = threading.Thread(target=lambda: c.upsert(items(vectors(2))))
    writer.start()
    assert entered.wait(5)
    with pytest.raises(CollectionBusyError):
        manager.drop("c")
    release.set()
    writer.join(10)
    assert manager.get("c") is c and c.stats()["count"] == 2  # still whole and usable
    manager.drop("c")


def test_concurrent_drops_one_wins_the_other_is_not_found(manager):
    for round_ in range(5):
        manager.create(CollectionConfig(name="c", dim=DIM)).upsert(items(vectors(20, seed=round_)))
        outcomes: list[str] = []
        barrier = threading.Barrier(2)

        def drop(barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes) -> None:
            barrier.wait()
            try:
                manager.drop("c")
                outcomes.append("ok")
            except CollectionNotFoundError:
                outcomes.append("404")

        threads = [threading.Thread(target=drop) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert sorted(outcomes) == ["404", "ok"]


def test_drop_leftovers_do_not_block_later_drops_and_go_at_start_up(root):
    root.mkdir(parents=True)
    for leftover in (".dropping-c", ".creating-c"):
        (root / leftover).mkdir()
        (root / leftover / "store.sqlite").write_bytes(b"x")
    manager = CollectionManager(root)
    assert sorted(p.name for p in root.iterdir()) == []  # start-up removes both
    (root / ".dropping-c").mkdir()  # a drop cut short after its rename, while this one runs
    (root / ".dropping-c" / "f").write_bytes(b"x")
    manager.create(CollectionConfig(name="c", dim=DIM)).upsert(items(vectors(3)))
    manager.drop("c")
    manager.create(CollectionConfig(name="c", dim=DIM))
    manager.drop("c")
    assert manager.names() == []
    manager.close()


def test_drop_races_writes_searches_and_listing_without_errors(manager):
    """Many rounds of one drop against writers and readers: only clean outcomes."""
    data = vectors(40)
    for _ in range(15):
        c = manager.create(CollectionConfig(name="c", dim=DIM))
        c.upsert(items(data[:10]))
        errors: list[BaseException] = []
        start = threading.Barrier(7)

        def work(kind: int, start: threading.Barrier = start, errors: list[BaseException] = errors) -> None:
            start.wait()
            for j in range(5):
                try:
                    target = manager.get("c")
                    if kind % 2:
                        target.upsert(items(data[j * 4 : j * 4 + 4], start=kind * 100))
                    else:
                        target.search(data[:2], 5)
                        target.stats()
                        manager.listing()
                except (CollectionNotFoundError, CollectionBusyError):
                    pass
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

        def drop(start: threading.Barrier = start, errors: list[BaseException] = errors) -> None:
            start.wait()
            try:
                manager.drop("c")
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(6)] + [threading.Thread(target=drop)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert manager.names() == []


# -- create ----------------------------------------------------------------------------


def test_refused_create_writes_nothing(manager, root):
    with pytest.raises(InvalidCollectionError, match="pq_m"):
        manager.create(CollectionConfig(name="p", dim=4, index=IndexSpec(kind="ivfpq", pq_m=3)))
    assert [p.name for p in root.iterdir()] == []
    assert manager.listing() == ([], {})
    manager.create(CollectionConfig(name="p", dim=4, index=IndexSpec(kind="ivfpq", pq_m=2)))
    assert manager.names() == ["p"]


def test_index_options_are_checked_against_the_dimension_before_anything_is_written():
    with pytest.raises(InvalidCollectionError, match="pq_m"):
        CollectionConfig(name="p", dim=4, index=IndexSpec(kind="ivfpq", pq_m=3))
    with pytest.raises(InvalidCollectionError, match="pq_m"):  # auto turns into IVF later, not into PQ: fine
        CollectionConfig(name="p", dim=6, index=IndexSpec(kind="ivfpq", pq_m=4))
    CollectionConfig(name="p", dim=6, index=IndexSpec(kind="auto", pq_m=4))


def test_concurrent_creates_of_one_name_exactly_one_wins(manager):
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def create():
        barrier.wait()
        try:
            manager.create(CollectionConfig(name="same", dim=DIM))
            outcomes.append("created")
        except (CollectionExistsError, CollectionBusyError):  # both 409: exists, or being created right now
            outcomes.append("exists")

    threads = [threading.Thread(target=create) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["created"] + ["exists"] * 5
    assert manager.names() == ["same"]


# -- broken collections ----------------------------------------------------------------


def _break_config(root, name: str, **changes) -> None:
    path = root / name / "collection.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if key == "index":
            config["index"].update(value)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_a_broken_collection_is_reported_not_fatal_and_can_be_dropped(root, caplog):
    manager = CollectionManager(root)
    manager.create(CollectionConfig(name="good", dim=4)).upsert(items(vectors(3)[:, :4] + 1))
    manager.create(CollectionConfig(name="p", dim=4))
    manager.create(CollectionConfig(name="q", dim=4))
    manager.close()
    _break_config(root, "p", index={"kind": "ivfpq", "pq_m": 3})  # what the refused create used to leave
    (root / "q" / "store.sqlite").write_bytes(b"this is not a database" * 100)
    (root / "stray").mkdir()

    restarted = CollectionManager(root)
    with caplog.at_level("ERROR"):
        restarted.open_all()  # does not raise: the service starts
    collections, broken = restarted.listing()
    assert [c.name for c in collections] == ["good"]
    assert set(broken) == {"p", "q", "stray"} and "pq_m" in broken["p"]
    assert "collection p" in caplog.text
    with pytest.raises(CollectionUnavailableError, match="pq_m"):
        restarted.get("p")
    with pytest.raises(CollectionExistsError):
        restarted.create(CollectionConfig(name="p", dim=4))
    for name in ("p", "q", "stray"):
        restarted.drop(name)
    assert restarted.listing()[1] == {} and restarted.names() == ["good"]
    restarted.create(CollectionConfig(name="p", dim=4))
    assert restarted.get("good").stats()["count"] == 3
    restarted.close()


# -- snapshots -------------------------------------------------------------------------


def _snapshot_then_crash(root, writes_after: int = 0):
    """A collection snapshotted at some seq, with `writes_after` more writes only in the store."""
    manager = CollectionManager(root)
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    data = vectors(300)
    for start in range(0, 300 - writes_after * 10, 10):
        c.upsert(items(data[start : start + 10], start=start))
    c.snapshot()
    for start in range(300 - writes_after * 10, 300, 10):
        c.upsert(items(data[start : start + 10], start=start))
    c.store.close()  # the process dies here: no closing snapshot
    return data, root / "c" / "index.snapshot"


def _all_findable(collection, data) -> bool:
    hits = collection.search(data, 1)
    return [h[0].id if h else None for h in hits] == [f"i{i}" for i in range(len(data))]


def test_a_flipped_bit_in_the_snapshot_trailer_means_rebuild(root, caplog):
    data, path = _snapshot_then_crash(root, writes_after=5)
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b'"applied_seq": ') + len(b'"applied_seq": ')
    assert raw[at] != ord("9")
    raw[at] = ord("9")  # one digit (as 1282 -> 9282): still valid JSON, a seq the replay would skip past
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        c = CollectionManager(root).get("c")
    assert "rebuilding" in caplog.text
    assert c.stats()["count"] == 300 and _all_findable(c, data)


def test_every_byte_of_a_snapshot_is_checked(tmp_path):
    index = FaissIndex(4, "IDMap2,Flat", IndexSpec())
    index.add(np.arange(1, 4, dtype=np.int64), np.eye(4, dtype=np.float32)[:3])
    index.applied_seq = 7
    path = tmp_path / "s"
    index.write_snapshot(path)
    raw = path.read_bytes()
    assert FaissIndex.read_snapshot(path, IndexSpec()).applied_seq == 7
    for position in range(len(raw)):
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        with pytest.raises(ValueError):
            FaissIndex.read_snapshot(path, IndexSpec())


def test_a_snapshot_claiming_writes_the_store_never_had_means_rebuild(root, caplog):
    data, path = _snapshot_then_crash(root)
    snapshot = FaissIndex.read_snapshot(path, IndexSpec())
    snapshot.applied_seq += 1000  # a consistent file, but ahead of the store: not to be trusted
    snapshot.write_snapshot(path)
    with caplog.at_level("WARNING"):
        c = CollectionManager(root).get("c")
    assert "rebuilding" in caplog.text and "seq" in caplog.text
    assert _all_findable(c, data)


def test_a_snapshot_that_disagrees_with_the_store_after_replay_means_rebuild(root, caplog):
    data, path = _snapshot_then_crash(root, writes_after=3)
    snapshot = FaissIndex.read_snapshot(path, IndexSpec())
    snapshot.remove(np.array([5, 6], dtype=np.int64))  # lost vectors the store says it holds
    snapshot.write_snapshot(path)
    with caplog.at_level("WARNING"):
        c = CollectionManager(root).get("c")
    assert "rebuilding" in caplog.text
    assert _all_findable(c, data)


def test_hnsw_replay_after_replacements_is_trusted_not_rebuilt(root, caplog):
    """HNSW's tombstones may name vectors added and replaced after the snapshot; the count check
    must count only tombstones of vectors the index holds, so a sound snapshot is kept."""
    manager = CollectionManager(root)
    c = manager.create(CollectionConfig(name="h", dim=DIM, index=IndexSpec(kind="hnsw")))
    data = vectors(60)
    c.upsert(items(data[:40]))
    c.delete(ids=["i0"])
    c.snapshot()
    c.upsert(items(data[40:50], start=40))
    c.upsert(items(data[50:60], start=40))  # replaces what the previous write added, after the snapshot
    c.delete(ids=["i1"])
    c.store.close()
    with caplog.at_level("WARNING"):
        reopened = CollectionManager(root).get("h")
    assert "rebuilding" not in caplog.text
    assert reopened.stats()["count"] == 48
    hits = reopened.search(data[50:60], 1)
    assert [h[0].id for h in hits] == [f"i{i}" for i in range(40, 50)]


def test_store_counters_behind_their_rows_are_raised_not_trusted(root, caplog):
    """A damaged `seq` or `next_vid` in the store's meta: writes would reuse FAISS ids (every upsert
    failing on the UNIQUE vid) and a snapshot could claim writes the store never numbered."""
    import sqlite3

    manager = CollectionManager(root)
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    data = vectors(30)
    for start in range(0, 30, 10):
        c.upsert(items(data[start : start + 10], start=start))
    manager.close()
    conn = sqlite3.connect(root / "c" / "store.sqlite")
    conn.execute("UPDATE meta SET value = '1' WHERE key IN ('seq', 'next_vid')")
    conn.commit()
    conn.close()
    with caplog.at_level("WARNING"):
        reopened = CollectionManager(root).get("c")
    assert "seq counter" in caplog.text and "next_vid" in caplog.text
    assert reopened.store.seq == 3
    assert reopened.upsert(items(vectors(5, seed=9), start=100)) == 4  # new ids, no clash
    assert _all_findable(reopened, data) and reopened.stats()["count"] == 35
