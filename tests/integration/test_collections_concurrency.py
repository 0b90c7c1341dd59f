"""Collections hammered from many threads through HTTP on a real server: create, drop, upsert, delete,
search, list, get and re-embed interleaved. Whatever the interleaving, every answer is a clean one
(2xx, 404 or 409, never a 5xx), the server stays up, and afterwards each collection's store and index
agree: every stored item is found by a search for its own vector.

Bounded by operation counts and a deadline (the deadline guards against hangs; it is no performance
assertion). Vectors are given directly, except for the one text collection that is re-embedded.
On both collection backends (tests/integration/backends.py), but for the faiss backend's files.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.helpers import RunningServer, make_settings, register_trained
from tests.integration.backends import backend_settings, milvus_generations, serving
from tests.integration.test_reembed import other_tiny_dir  # noqa: F401 - a fixture

DIM = 8
NAMES = ("k0", "k1", "k2")  # vector-only collections, created and dropped over and over
TEXT = "texts"  # a text collection re-embedded back and forth between cc/1 and cc/2
CLEAN = {200, 201, 202, 404, 409}
WORKERS = 8
OPS_PER_WORKER = 120
DEADLINE_SECONDS = 60


@pytest.fixture(scope="module")
def running(request, backend, tmp_path_factory, tiny_model_dir, other_tiny_dir) -> Iterator[RunningServer]:  # noqa: F811
    from service.state import open_registry

    settings = backend_settings(
        backend,
        tmp_path_factory.mktemp("concurrency") / "data",
        request,
        preload_models=["cc/1"],
        register_default_models=False,
    )
    registry = open_registry(settings)
    register_trained(registry, "cc", tiny_model_dir)
    register_trained(registry, "cc", other_tiny_dir)
    with serving(backend, settings) as server:
        yield server


def _vector(rng: random.Random) -> list[float]:
    return [rng.gauss(0, 1) for _ in range(DIM)]


class Hammer:
    """One worker's random operations; every answer that is not clean is recorded."""

    def __init__(self, url: str, seed: int, failures: list[str], seen: Counter[str], deadline: float) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.rng = random.Random(seed)
        self.failures = failures
        self.seen = seen  # "op status" -> count: shows which interleavings the run actually met
        self.deadline = deadline

    def check(self, what: str, response: httpx.Response, clean: set[int] = CLEAN) -> None:
        self.seen[f"{what} {response.status_code}"] += 1
        if response.status_code not in clean:
            self.failures.append(f"{what}: {response.status_code} {response.text[:300]}")

    def run(self) -> None:
        ops = [self.create, self.drop, self.upsert, self.upsert, self.delete, self.search, self.search,
               self.listing, self.info, self.page, self.text_write, self.text_search, self.reembed]  # fmt: skip
        with self.client:
            for _ in range(OPS_PER_WORKER):
                if time.monotonic() > self.deadline:
                    return
                self.rng.choice(ops)(self.rng.choice(NAMES))

    def create(self, name: str) -> None:
        response = self.client.post("/v1/collections", json={"name": name, "dimension": DIM})
        self.check("create", response, {201, 409})

    def drop(self, name: str) -> None:
        self.check("drop", self.client.delete(f"/v1/collections/{name}"))

    def upsert(self, name: str) -> None:
        items = [
            {"id": f"i{self.rng.randrange(30)}", "vector": _vector(self.rng), "payload": {"n": self.rng.randrange(9)}}
            for _ in range(self.rng.randint(1, 6))
        ]
        self.check("upsert", self.client.put(f"/v1/collections/{name}/items", json={"items": items}))

    def delete(self, name: str) -> None:
        ids = [f"i{self.rng.randrange(30)}" for _ in range(3)]
        self.check("delete", self.client.post(f"/v1/collections/{name}/items/delete", json={"ids": ids}))

    def search(self, name: str) -> None:
        body = {"query": {"vector": _vector(self.rng)}, "k": 5}
        self.check("search", self.client.post(f"/v1/collections/{name}/search", json=body))

    def listing(self, name: str) -> None:
        self.check("list", self.client.get("/v1/collections"), {200})

    def info(self, name: str) -> None:
        self.check("get", self.client.get(f"/v1/collections/{name}"))
        self.check("get item", self.client.get(f"/v1/collections/{name}/items/i{self.rng.randrange(30)}"))

    def page(self, name: str) -> None:
        self.check("page", self.client.get(f"/v1/collections/{name}/items", params={"limit": 7}))

    def text_write(self, name: str) -> None:
        n = self.rng.randrange(12)
        items = [{"id": f"t{n}", "text": f"item number {n} of {name} at {self.rng.random():.6f}"}]
        self.check("text upsert", self.client.put(f"/v1/collections/{TEXT}/items", json={"items": items}))

    def text_search(self, name: str) -> None:
        body = {"query": {"text": f"something about {name}"}, "k": 3}
        self.check("text search", self.client.post(f"/v1/collections/{TEXT}/search", json=body), {200})

    def reembed(self, name: str) -> None:
        target = self.rng.choice(["cc/1", "cc/2"])
        self.check("reembed", self.client.post(f"/v1/collections/{TEXT}/reembed", json={"model": target}))


def _hammer(url: str, seeds: range, deadline: float, seen: Counter[str]) -> list[str]:
    failures: list[str] = []
    threads = [threading.Thread(target=Hammer(url, seed, failures, seen, deadline).run) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_SECONDS + 60)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return failures


def _wait_for_reembed(http: httpx.Client, name: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        reembed = http.get(f"/v1/collections/{name}").json().get("reembed")
        if not reembed or reembed["state"] != "running":
            return
        time.sleep(0.1)
    raise AssertionError(f"re-embed of {name} did not finish")


def assert_store_and_index_agree(http: httpx.Client, name: str) -> int:
    """count == vectors in the index == items found by a search for their own stored vector."""
    info = http.get(f"/v1/collections/{name}").json()
    items, cursor = [], None
    while True:
        params = {"limit": 1000, "with_vector": True} | ({"cursor": cursor} if cursor else {})
        page = http.get(f"/v1/collections/{name}/items", params=params).json()
        items += page["items"]
        if not (cursor := page["next_cursor"]):
            break
    assert info["count"] == len(items), (name, info)
    index = info["stats"]["index"]
    if "tombstones" in index:  # the faiss index's own count: vectors held, less those deleted
        assert info["count"] == index["vectors"] - index["tombstones"], (name, info)
    for start in range(0, len(items), 16):
        chunk = items[start : start + 16]
        body = {"queries": [{"vector": item["vector"]} for item in chunk], "k": 3}
        response = http.post(f"/v1/collections/{name}/search", json=body)
        assert response.status_code == 200, response.text
        for item, hits in zip(chunk, response.json()["results"]):
            best = hits[0]["score"]
            assert item["id"] in {h["id"] for h in hits if h["score"] >= best - 1e-5}, (name, item["id"], hits)
    return len(items)


def test_interleaved_operations_answer_cleanly_and_leave_store_and_index_in_step(running):
    with httpx.Client(base_url=running.url, timeout=60) as http:
        assert http.post("/v1/collections", json={"name": TEXT, "model": "cc/1"}).status_code == 201
        seed_items = [{"id": f"t{n}", "text": f"seed item {n}"} for n in range(12)]
        assert http.put(f"/v1/collections/{TEXT}/items", json={"items": seed_items}).status_code == 200

        started = time.monotonic()
        seen: Counter[str] = Counter()
        failures = _hammer(running.url, range(WORKERS), started + DEADLINE_SECONDS, seen)
        elapsed = time.monotonic() - started

        assert failures == [], "\n".join(failures[:20])
        # The run met the races it is about: drops that happened, and calls that found a collection gone.
        assert seen["drop 200"] and seen["upsert 404"] and seen["search 404"], seen
        assert running.thread.is_alive() and http.get("/health").status_code == 200
        _wait_for_reembed(http, TEXT)
        listed = http.get("/v1/collections").json()
        assert listed["unavailable"] == []
        checked = {c["name"]: assert_store_and_index_agree(http, c["name"]) for c in listed["data"]}
        assert TEXT in checked
        print(f"{WORKERS} workers x {OPS_PER_WORKER} ops in {elapsed:.1f} s; items per collection: {checked}")
        print(dict(sorted(seen.items())))


def test_drop_against_six_concurrent_writes_never_crashes(running):
    """The red-team repro: one DELETE alongside 6 concurrent PUTs, round after round."""
    rng = random.Random(7)
    statuses: dict[str, list[int]] = {"drop": [], "put": []}
    with httpx.Client(base_url=running.url, timeout=60) as http:
        for _ in range(12):
            assert http.post("/v1/collections", json={"name": "race", "dimension": DIM}).status_code == 201
            barrier = threading.Barrier(7)

            def put(seed: int, barrier: threading.Barrier = barrier) -> None:
                local = random.Random(seed)
                items = [{"id": f"i{j}", "vector": _vector(local)} for j in range(25)]
                barrier.wait()
                with httpx.Client(base_url=running.url, timeout=60) as client:
                    statuses["put"].append(client.put("/v1/collections/race/items", json={"items": items}).status_code)

            def drop(barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                time.sleep(rng.random() * 0.05)
                with httpx.Client(base_url=running.url, timeout=60) as client:
                    statuses["drop"].append(client.delete("/v1/collections/race").status_code)

            threads = [threading.Thread(target=put, args=(rng.random(),)) for _ in range(6)]
            threads.append(threading.Thread(target=drop))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert running.thread.is_alive() and http.get("/health").status_code == 200
            assert http.get("/v1/collections/race").status_code == 404
    assert set(statuses["drop"]) == {200}, statuses
    assert set(statuses["put"]) <= {200, 404}, statuses


def test_concurrent_creates_and_drops_of_one_name(running):
    barrier = threading.Barrier(6)
    results: list[int] = []

    def call(method: str) -> None:
        with httpx.Client(base_url=running.url, timeout=60) as client:
            barrier.wait()
            if method == "create":
                results.append(client.post("/v1/collections", json={"name": "twin", "dimension": DIM}).status_code)
            else:
                results.append(client.delete("/v1/collections/twin").status_code)

    for method, expected in (("create", [201] + [409] * 5), ("drop", [200] + [404] * 5)):
        results.clear()
        threads = [threading.Thread(target=call, args=(method,)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(results) == expected, (method, results)


def test_refused_create_leaves_nothing_behind(running):
    with httpx.Client(base_url=running.url, timeout=60) as http:
        body = {"name": "p", "dimension": 4, "index": {"kind": "ivfpq", "pq_m": 3}}
        refused = http.post("/v1/collections", json=body)
        assert refused.status_code == 400 and "pq_m" in refused.text
        listed = http.get("/v1/collections")
        assert listed.status_code == 200 and "p" not in {c["name"] for c in listed.json()["data"]}
        if running.state.settings.collections_backend == "faiss":
            assert not (running.state.settings.collections_dir / "p").exists()
        else:
            assert milvus_generations(running, "p") == []
        assert http.post("/v1/collections", json={**body, "index": {"kind": "ivfpq", "pq_m": 2}}).status_code == 201
        assert http.delete("/v1/collections/p").status_code == 200


@pytest.mark.faiss_only("a collection folder written on the faiss backend's disk")
def test_a_broken_collection_on_disk_does_not_stop_the_service(tmp_path):
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, preload_models=[], register_default_models=False)
    broken = settings.collections_dir / "p"
    broken.mkdir(parents=True)
    config = {"name": "p", "dim": 4, "metric": "cosine", "model": None, "modalities": ["vector"],
              "index": {"kind": "ivfpq", "pq_m": 3}, "modality_gap_correction": False, "generation": 0,
              "created_at": "2026-01-01T00:00:00+00:00"}  # fmt: skip
    (broken / "collection.json").write_text(json.dumps(config))  # what the refused create used to leave
    with RunningServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/collections", json={"name": "ok", "dimension": 4}).status_code == 201
        listed = http.get("/v1/collections").json()
        assert [c["name"] for c in listed["data"]] == ["ok"]
        assert [u["name"] for u in listed["unavailable"]] == ["p"] and "pq_m" in listed["unavailable"][0]["error"]
        assert http.get("/v1/collections/p").status_code == 503
        assert http.post("/v1/collections", json={"name": "p", "dimension": 4}).status_code == 409
        assert http.delete("/v1/collections/p").status_code == 200
        assert http.post("/v1/collections", json={"name": "p", "dimension": 4}).status_code == 201
        assert http.get("/v1/collections").json()["unavailable"] == []


@pytest.mark.faiss_only("the faiss index snapshot's applied_seq, and a restart on its data dir")
def test_snapshot_with_a_flipped_seq_digit_is_rebuilt_at_start_up(tmp_path, caplog):
    """300 acknowledged items, a snapshot whose applied_seq lost a digit's worth of truth, a restart:
    all 300 are found by search, and the rebuild is logged."""
    settings = make_settings(tmp_path / "data", preload_models=[], register_default_models=False)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(300, DIM))
    with RunningServer(settings) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        assert http.post("/v1/collections", json={"name": "s", "dimension": DIM}).status_code == 201
        for start in range(0, 300, 10):
            if start == 150:
                server.state.collections.get("s").snapshot()
            items = [{"id": f"i{start + j}", "vector": vectors[start + j].tolist()} for j in range(10)]
            assert http.put("/v1/collections/s/items", json={"items": items}).status_code == 200
        server.state.collections.get("s").store.close()  # then "crash": the closing snapshot never happens
        server.state.collections._open.clear()
    path = settings.collections_dir / "s" / "index.snapshot"
    raw = bytearray(path.read_bytes())
    at = raw.rindex(b'"applied_seq": ') + len(b'"applied_seq": ')
    raw[at] = ord("9")  # 15 -> 95
    path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"), RunningServer(settings) as server, httpx.Client(base_url=server.url) as http:
        assert "rebuilding" in caplog.text
        assert assert_store_and_index_agree(http, "s") == 300
