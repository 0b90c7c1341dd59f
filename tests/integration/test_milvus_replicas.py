"""Two real `duet serve` processes on one Milvus: the milvus backend's promise that API replicas share
collections with no shared disk. Each replica has its own data dir (both register the default models,
so the pinned `minilm/1` resolves on both) and the same DUET_MILVUS_PREFIX.

What one replica does, the other sees right after the acknowledgement: a create, every write (searched
for through the other, round after round, alternating), a drop. And `kill -9` of a replica while a
client upserts through it loses nothing it acknowledged: every 200 is there through the other replica.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import free_port
from tests.integration.backends import milvus_prefix

pytestmark = pytest.mark.milvus

READY_SECONDS = 240  # two replicas start side by side on a 2-core machine: a guard, not a target
DIM = 16


class Replica:
    """`duet serve` in its own process group (kill -9 takes its job worker too)."""

    def __init__(self, name: str, root: Path, milvus_uri: str, prefix: str) -> None:
        self.name = name
        self.data_dir = root / name / "data"
        self.log = root / f"{name}.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_") and k != "REDIS_URL"}
        env.update(
            DUET_DATA_DIR=str(self.data_dir),
            DUET_PORT=str(self.port),
            DUET_PRELOAD_MODELS='["minilm"]',
            DUET_COLLECTIONS_BACKEND="milvus",
            DUET_MILVUS_URI=milvus_uri,
            DUET_MILVUS_PREFIX=prefix,
            DUET_FAISS_GPU="false",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
        )
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "duet.cli", "serve", "--port", str(self.port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"{self.name} exited: {self.tail()}"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise AssertionError(f"{self.name} not ready in {READY_SECONDS} s: {self.tail()}")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, milvus_uri) -> Iterator[tuple[Replica, Replica]]:
    root = tmp_path_factory.mktemp("replicas")
    prefix = milvus_prefix()  # the two share it; no other server of any session does
    a = Replica("a", root, milvus_uri, prefix)
    b = Replica("b", root, milvus_uri, prefix)
    try:
        deadline = time.monotonic() + READY_SECONDS
        a.wait_ready(deadline)
        b.wait_ready(deadline)
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture(scope="module")
def clients(replicas) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        yield ca, cb


def _name() -> str:
    return "r" + uuid.uuid4().hex[:10]


def test_a_collection_created_on_one_replica_is_listed_and_served_by_the_other(clients):
    a, b = clients
    name = _name()
    created = a.post("/v1/collections", json={"name": name, "model": "minilm"})
    assert created.status_code == 201, created.text
    assert name in {c["name"] for c in b.get("/v1/collections").json()["data"]}
    info = b.get(f"/v1/collections/{name}")
    assert info.status_code == 200 and info.json()["model"] == "minilm/1", info.text
    again = b.post("/v1/collections", json={"name": name, "model": "minilm"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "collection_exists"


def test_a_write_through_one_replica_is_found_through_the_other_right_after_the_ack(clients):
    a, b = clients
    name = _name()
    assert a.post("/v1/collections", json={"name": name, "model": "minilm"}).status_code == 201
    texts = [
        "A man is playing a guitar.",
        "The chef cooks a vegetable soup.",
        "A plane takes off from the runway.",
        "Kids play football in the park.",
        "It is raining heavily tonight.",
        "She reads a book by the window.",
    ]
    for i, text in enumerate(texts):
        writer, reader = (a, b) if i % 2 == 0 else (b, a)  # alternating: each replica writes and reads
        item_id = f"t{i}"
        written = writer.put(f"/v1/collections/{name}/items", json={"items": [{"id": item_id, "text": text}]})
        assert written.status_code == 200, written.text
        got = reader.get(f"/v1/collections/{name}/items/{item_id}")  # no sleep: right after the 200
        assert got.status_code == 200 and got.json()["content"] == text, got.text
        hits = reader.post(f"/v1/collections/{name}/search", json={"query": {"text": text}, "k": 3})
        assert hits.status_code == 200, hits.text
        top = hits.json()["results"][0]
        assert top["id"] == item_id and top["score"] == pytest.approx(1.0, abs=1e-3), hits.json()
        assert reader.get(f"/v1/collections/{name}").json()["count"] == i + 1
    # A replace and a delete through one are seen through the other too.
    replaced = b.put(f"/v1/collections/{name}/items", json={"items": [{"id": "t0", "text": "A cat sleeps."}]})
    assert replaced.status_code == 200
    assert a.get(f"/v1/collections/{name}/items/t0").json()["content"] == "A cat sleeps."
    assert a.post(f"/v1/collections/{name}/items/delete", json={"ids": ["t1"]}).json()["deleted"] == 1
    assert b.get(f"/v1/collections/{name}/items/t1").status_code == 404
    assert b.get(f"/v1/collections/{name}").json()["count"] == len(texts) - 1


def test_a_drop_on_one_replica_is_seen_by_the_other(clients):
    a, b = clients
    name = _name()
    assert b.post("/v1/collections", json={"name": name, "dimension": DIM}).status_code == 201
    item = {"id": "x", "vector": [1.0] * DIM}
    assert a.put(f"/v1/collections/{name}/items", json={"items": [item]}).status_code == 200
    assert a.delete(f"/v1/collections/{name}").status_code == 200
    assert b.get(f"/v1/collections/{name}").status_code == 404
    assert name not in {c["name"] for c in b.get("/v1/collections").json()["data"]}
    assert b.put(f"/v1/collections/{name}/items", json={"items": [item]}).status_code == 404
    search = b.post(f"/v1/collections/{name}/search", json={"query": {"vector": [1.0] * DIM}})
    assert search.status_code == 404
    assert b.post("/v1/collections", json={"name": name, "dimension": DIM}).status_code == 201  # the name is free
    assert a.get(f"/v1/collections/{name}").json()["count"] == 0


def test_kill_9_of_a_replica_mid_upserts_loses_no_acknowledged_item(replicas, clients):
    """Last in this module: it kills replica a."""
    replica_a, _ = replicas
    _, b = clients
    name = _name()
    assert b.post("/v1/collections", json={"name": name, "dimension": DIM, "metric": "dot"}).status_code == 201
    rng = np.random.default_rng(0)
    acked: dict[str, list[float]] = {}
    in_flight: dict[str, list[float]] = {}  # the batch sent when the replica died (its outcome unknown)
    errors: list[str] = []
    stop = threading.Event()

    def upsert_loop() -> None:
        with httpx.Client(base_url=replica_a.url, timeout=30) as client:
            for batch in range(100_000):
                if stop.is_set():
                    return
                items = {f"b{batch}-{j}": rng.normal(size=DIM).astype(np.float32).tolist() for j in range(8)}
                in_flight.clear()
                in_flight.update(items)
                body = {"items": [{"id": k, "vector": v, "payload": {"batch": batch}} for k, v in items.items()]}
                try:
                    response = client.put(f"/v1/collections/{name}/items", json=body)
                except httpx.TransportError:
                    return  # the replica is gone
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    return
                acked.update(items)
                in_flight.clear()

    writer = threading.Thread(target=upsert_loop, daemon=True)
    writer.start()
    deadline = time.monotonic() + 60
    while len(acked) < 8 * 25 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    replica_a.kill()
    stop.set()
    writer.join(30)
    assert not writer.is_alive() and errors == [], errors
    assert len(acked) >= 8 * 25, f"only {len(acked)} items acknowledged before the kill"

    present: dict[str, list[float]] = {}
    cursor = None
    while True:
        params = {"limit": 1000, "with_vector": "true"} | ({"cursor": cursor} if cursor else {})
        page = b.get(f"/v1/collections/{name}/items", params=params)
        assert page.status_code == 200, page.text
        present |= {item["id"]: item["vector"] for item in page.json()["items"]}
        if not (cursor := page.json()["next_cursor"]):
            break
    lost = sorted(set(acked) - set(present))
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged items lost, e.g. {lost[:5]}"
    phantoms = sorted(set(present) - set(acked) - set(in_flight))
    assert phantoms == [], phantoms
    assert all(present[k] == acked[k] for k in acked)  # dot: stored as sent, bit for bit through float32
    count = b.get(f"/v1/collections/{name}").json()["count"]
    assert count == len(present), (count, len(present))
    for item_id in list(acked)[:: max(1, len(acked) // 40)]:  # single GETs on a sample, too
        assert b.get(f"/v1/collections/{name}/items/{item_id}").status_code == 200
