"""Quantised collections on the faiss backend (int8 scalar quantiser, binary sign bits) with float
rescoring, and HNSW's efSearch picked from a recall target: built, searched, deleted from,
snapshotted, reopened, re-embedded; bad options refused before anything is written."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from index.config import CollectionConfig
from index.engine import FaissIndex, IndexSpec
from index.errors import InvalidCollectionError
from index.items import StoredItem
from index.manager import CollectionManager
from index.quantization import SQ_TRAIN_MIN, hamming_scores, rescore, to_bits

DIM = 64
N = 1500  # past SQ_TRAIN_MIN, so int8 collections train their ranges


def clustered(n: int, seed: int = 0) -> np.ndarray:
    """Unit vectors in clusters of sub-clusters (near neighbours at cosine ~0.85, like paraphrases), the
    same centres for every seed; `seed` draws other points (queries) around them."""
    centres = np.random.default_rng(0).normal(size=(30, 1, DIM))
    subs = (centres + 0.7 * np.random.default_rng(1).normal(size=(30, 20, DIM))).reshape(-1, DIM)
    rng = np.random.default_rng([seed, 2])
    points = subs[rng.integers(0, len(subs), n)] + 0.5 * rng.normal(size=(n, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def items(vectors: np.ndarray, start: int = 0) -> list[StoredItem]:
    return [
        StoredItem(id=f"i{start + i}", modality="text", vector=v, payload={"n": start + i}, content=f"c{start + i}")
        for i, v in enumerate(vectors)
    ]


def exact_ids(data: np.ndarray, queries: np.ndarray, k: int) -> list[list[str]]:
    top = np.argsort(-(queries @ data.T), axis=1)[:, :k]
    return [[f"i{j}" for j in row] for row in top]


def recall(hits, truth) -> float:
    return float(np.mean([len({h.id for h in got} & set(want)) / len(want) for got, want in zip(hits, truth)]))


@pytest.fixture()
def manager(tmp_path):
    m = CollectionManager(tmp_path / "collections")
    yield m
    m.close()


def make(manager, name: str, **spec) -> tuple:
    c = manager.create(CollectionConfig(name=name, dim=DIM, index=IndexSpec(**spec)))
    data = clustered(N)
    for start in range(0, N, 500):
        c.upsert(items(data[start : start + 500], start))
    return c, data


def test_int8_starts_exact_then_trains_and_rescores_to_float_scores(manager):
    c = manager.create(CollectionConfig(name="q8", dim=DIM, index=IndexSpec(kind="flat", quantization="int8")))
    data = clustered(N)
    c.upsert(items(data[: SQ_TRAIN_MIN - 1]))
    assert c.index.factory == "IDMap2,Flat"  # too few vectors to train the int8 ranges yet
    c.upsert(items(data[SQ_TRAIN_MIN - 1 :], SQ_TRAIN_MIN - 1))
    assert c.index.factory == "IDMap2,SQ8" and c.index.index.ntotal == N
    queries = clustered(40, seed=1)
    truth = exact_ids(data, queries, 10)
    hits = c.search(queries, 10)
    assert recall(hits, truth) >= 0.98
    # The reported score is the float inner product, to float32 precision.
    first = hits[0][0]
    assert first.score == pytest.approx(float(queries[0] @ data[int(first.id[1:])]), abs=1e-5)
    raw = c.search(queries, 10, rescore=False)
    assert raw[0][0].score != pytest.approx(float(queries[0] @ data[int(raw[0][0].id[1:])]), abs=1e-6)
    stats = c.stats()["index"]
    assert (stats["quantization"], stats["scores"]) == ("int8", "float (rescored)")


def test_binary_rescoring_improves_recall_and_reports_float_scores(manager):
    c, data = make(manager, "b", quantization="binary")
    assert c.index.factory == "BIDMap2,BFlat" and c.index.binary
    queries = clustered(60, seed=2)
    truth = exact_ids(data, queries, 10)
    rescored, raw = recall(c.search(queries, 10), truth), recall(c.search(queries, 10, rescore=False), truth)
    assert rescored > raw and rescored >= 0.9, (rescored, raw)
    hit = c.search(queries[:1], 1)[0][0]
    assert hit.score == pytest.approx(float(queries[0] @ data[int(hit.id[1:])]), abs=1e-5)
    no_rescore = manager.create(
        CollectionConfig(name="b2", dim=DIM, index=IndexSpec(quantization="binary", rescore=False))
    )
    assert no_rescore.stats()["index"]["scores"].startswith("binary estimate")


def test_quantised_deletes_snapshots_replay_and_reopen(manager, tmp_path):
    made = {q: make(manager, f"c{q}", quantization=q, kind=k) for q, k in (("int8", "flat"), ("binary", "hnsw"))}
    queries = clustered(20, seed=3)
    before = {}
    for q, (c, _) in made.items():
        c.delete(ids=["i0", "i1"])
        c.snapshot()
        c.upsert(items(clustered(5, seed=9), N))  # after the snapshot: replayed on reopen
        c.delete(ids=["i2"])
        before[q] = [[h.id for h in row] for row in c.search(queries, 10)]
        assert not {"i0", "i1", "i2"} & {i for row in before[q] for i in row}
    manager.close()
    reopened = CollectionManager(tmp_path / "collections")
    try:
        for q, (c, _) in made.items():
            again = reopened.get(c.name)
            assert again.index.factory == c.index.factory and again.count() == N - 3 + 5
            assert [[h.id for h in row] for row in again.search(queries, 10)] == before[q]
    finally:
        reopened.close()


def test_reembed_keeps_the_quantisation(manager):
    c, data = make(manager, "re", quantization="int8")
    job = manager.start_reembed(
        replace(c.config, model="m/2"), lambda batch: np.stack([data[int(i.id[1:])][::-1] for i in batch])
    )
    job._thread.join(120)
    assert job.progress.state == "done", job.progress.error
    new = manager.get("re")
    assert new.config.index.quantization == "int8" and new.index.factory == "IDMap2,SQ8"
    hit = new.search(new.prepare_vectors(data[7][::-1]), 1)[0][0]
    assert hit.id == "i7" and hit.score == pytest.approx(1.0, abs=1e-5)


def test_int8_ranges_are_retrained_as_the_collection_grows(manager, tmp_path):
    c = manager.create(CollectionConfig(name="grow", dim=DIM, index=IndexSpec(kind="flat", quantization="int8")))
    data = clustered(10_000, seed=8)
    c.upsert(items(data[:SQ_TRAIN_MIN]))
    assert (c.index.factory, c.index.trained_on) == ("IDMap2,SQ8", SQ_TRAIN_MIN)
    c.upsert(items(data[SQ_TRAIN_MIN : 10 * SQ_TRAIN_MIN - 1], SQ_TRAIN_MIN))
    assert c.index.trained_on == SQ_TRAIN_MIN  # not yet 10x
    c.upsert(items(data[10 * SQ_TRAIN_MIN - 1 :], 10 * SQ_TRAIN_MIN - 1))
    assert c.index.trained_on == 10 * SQ_TRAIN_MIN and c.index.index.ntotal == 10_000
    manager.close()
    reopened = CollectionManager(tmp_path / "collections")
    try:
        assert reopened.get("grow").index.trained_on == 10 * SQ_TRAIN_MIN  # kept in the snapshot
    finally:
        reopened.close()


def test_auto_int8_grows_into_ivf_sq8(manager):
    c, _ = make(manager, "auto8", quantization="int8", auto_ivf_threshold=1200, nlist=16)
    assert c.index.factory == "IVF16,SQ8"


def test_recall_target_picks_ef_search_and_survives_a_reopen(manager, tmp_path):
    c, data = make(manager, "h", kind="hnsw", hnsw_m=8, recall_target=0.97)
    c.rebuild()  # measured when the index is built from the store
    tuning = c.index.tuning
    assert tuning is not None and tuning["reached"] and tuning["recall"] >= 0.97 and tuning["count"] == N
    stats = c.stats()["index"]
    assert stats["ef_search"] == tuning["ef_search"] and stats["tuning"] == tuning
    queries = clustered(50, seed=4)
    assert recall(c.search(queries, 10), exact_ids(data, queries, 10)) >= 0.9
    manager.close()
    reopened = CollectionManager(tmp_path / "collections")
    try:
        assert reopened.get("h").index.tuning == tuning  # kept in the snapshot, not measured again
    finally:
        reopened.close()


def test_recall_target_is_measured_again_at_a_snapshot_once_the_size_moved(manager):
    c, _ = make(manager, "h2", kind="hnsw", hnsw_m=8, recall_target=0.9)
    c.snapshot()
    first = c.index.tuning
    assert first is not None and first["count"] == N
    c.snapshot()
    assert c.index.tuning is first  # nothing moved: not measured again
    c.upsert(items(clustered(600, seed=5), N))
    c.snapshot()
    assert c.index.tuning["count"] == N + 600


@pytest.mark.parametrize(
    ("spec", "dim", "words"),
    [
        ({"quantization": "int4"}, DIM, "use none, int8 or binary"),
        ({"quantization": "int8", "kind": "ivfpq"}, DIM, "already quantised"),
        ({"quantization": "binary", "kind": "ivf"}, DIM, "flat, hnsw or auto"),
        ({"quantization": "binary"}, 12, "multiple of 8"),
        ({"oversample": 0}, DIM, "between 1 and"),
        ({"rescore": "yes"}, DIM, "true or false"),
        ({"recall_target": 1.5, "kind": "hnsw"}, DIM, "(0, 1]"),
        ({"recall_target": 0.9, "kind": "flat"}, DIM, "kind hnsw"),
    ],
)
def test_bad_quantisation_options_are_refused_before_anything_is_written(manager, spec, dim, words):
    with pytest.raises(InvalidCollectionError, match=None) as refused:
        manager.create(CollectionConfig(name="bad", dim=dim, index=IndexSpec(**spec)))
    assert words in str(refused.value)
    assert manager.names() == []


def test_configs_written_before_quantisation_load_as_float():
    old = CollectionConfig(name="old", dim=8).to_json()
    for key in ("quantization", "rescore", "oversample", "recall_target"):
        del old["index"][key]
    spec = CollectionConfig.from_json(json.loads(json.dumps(old))).index
    assert (spec.quantization, spec.rescore) == ("none", True)


def test_rescore_drops_candidates_whose_rows_vanished():
    queries = np.eye(4, dtype=np.float32)[:2]
    stored = {1: np.array([1, 0, 0, 0], np.float32), 2: np.array([0.5, 0.5, 0, 0], np.float32)}
    vids = np.array([[2, 3, 1], [3, -1, 2]])  # vid 3 was deleted after the index search
    scores, ranked = rescore(queries, vids, lambda v: {int(i): stored[int(i)] for i in v if int(i) in stored}, 2)
    assert ranked.tolist() == [[1, 2], [2, -1]]
    assert scores[0].tolist() == [1.0, 0.5] and scores[1][0] == 0.5 and scores[1][1] == -np.inf


def test_binary_codes_and_scores():
    vectors = np.array([[0.3, -0.1, 0.0, 2.0, -1, 1, 1, -1]], dtype=np.float32)
    assert to_bits(vectors).tolist() == [[0b10010110]]
    assert hamming_scores(np.array([[0, 4, 8]]), 8).tolist() == [[1.0, 0.0, -1.0]]


def test_binary_snapshot_round_trip(tmp_path):
    index = FaissIndex(DIM, "BIDMap2,BHNSW8", IndexSpec(kind="hnsw", quantization="binary"))
    index.add(np.arange(10, 30), clustered(20))
    index.remove(np.array([10]))
    index.tuning = {"ef_search": 48, "recall": 0.99}
    index.write_snapshot(tmp_path / "s")
    loaded = FaissIndex.read_snapshot(tmp_path / "s", index.spec)
    assert loaded.binary and loaded.index.ntotal == 20 and loaded.deleted == {10} and loaded.ef_search == 48
    _, found = loaded.search(clustered(20)[1:2], 1)
    assert found.tolist() == [[11]]


@pytest.mark.parametrize(
    ("spec", "milvus_index", "params"),
    [
        ({"quantization": "int8"}, "IVF_SQ8", {"nlist": 128}),
        ({"quantization": "int8", "kind": "ivf", "nlist": 64}, "IVF_SQ8", {"nlist": 64}),
        ({"quantization": "int8", "kind": "hnsw", "hnsw_m": 16}, "HNSW_SQ", {"M": 16, "sq_type": "SQ8"}),
        ({"quantization": "binary", "kind": "flat"}, "IVF_RABITQ", {"nlist": 128}),
        ({"kind": "flat"}, "FLAT", {}),
    ],
)
def test_milvus_maps_quantisation_to_the_servers_indexes(spec, milvus_index, params):
    from index.milvus.schema import index_params, index_type, search_params

    index = IndexSpec(**spec)
    assert index_type(index) == milvus_index
    assert params.items() <= index_params(index).items()
    searched = search_params(index, 72, None)["params"]
    assert ("nprobe" in searched) == milvus_index.startswith("IVF") and ("ef" in searched) == ("HNSW" in milvus_index)


@pytest.mark.parametrize(
    ("spec", "words"),
    [({"quantization": "binary", "kind": "hnsw"}, "IVF_RABITQ"), ({"kind": "hnsw", "recall_target": 0.9}, "ef_search")],
)
def test_milvus_refuses_what_it_cannot_offer(spec, words):
    from index.milvus.schema import build_schema, check_supported

    with pytest.raises(InvalidCollectionError, match=words):
        check_supported(IndexSpec(**spec))
    with pytest.raises(InvalidCollectionError, match=words):  # before the server is asked for anything
        build_schema(CollectionConfig(name="m", dim=DIM, index=IndexSpec(**spec)))


def test_rescoring_work_is_bounded_per_call(monkeypatch):
    from index import quantization
    from index.quantization import MAX_RESCORE_ROWS, rescore_candidates

    assert rescore_candidates(18, 4, 256) == 72
    assert rescore_candidates(1008, 100, 256) == MAX_RESCORE_ROWS // 256  # 1024: k x 100 x 256 queries is cut
    assert rescore_candidates(1008, 4, 256) == 1024 and rescore_candidates(1008, 1, 256) == 1008
    # Many candidates per query: gathered a few queries at a time (here 2), the same answer as all at once.
    monkeypatch.setattr(quantization, "_GATHER_FLOATS", 2 * 3000 * DIM)
    rng = np.random.default_rng(0)
    stored = {v: rng.normal(size=DIM).astype(np.float32) for v in range(3000)}
    queries = rng.normal(size=(5, DIM)).astype(np.float32)
    vids = np.stack([rng.permutation(3000) for _ in range(5)])
    scores, ranked = rescore(queries, vids, lambda v: {int(i): stored[int(i)] for i in v}, 3)
    matrix = np.stack([stored[v] for v in range(3000)])
    assert ranked.tolist() == np.argsort(-(queries @ matrix.T), axis=1)[:, :3].tolist()


def test_calibration_queries_are_new_points_at_the_datas_spacing():
    from index.recall import held_out_like

    points, nearest = clustered(50, seed=6), clustered(50, seed=7)
    moved = held_out_like(points * 3.0, nearest)  # any norm (the dot metric): only the direction moves
    cos_moved = np.sum(points * moved, axis=1) / np.linalg.norm(moved, axis=1)
    expected = np.clip(np.sum(points * nearest, axis=1), 0.05, 0.9999)
    assert cos_moved == pytest.approx(expected, abs=1e-4)
