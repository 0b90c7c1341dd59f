"""Milvus goes down under a server on the milvus backend, then comes back.

While it is down, collection routes answer 503 + Retry-After with the API's JSON error, promptly (no
hang on a dead connection), and the rest of the service goes on: `/v1/embeddings` answers 200, `/health`
responds. When it is back, writes work again with no restart of the service, and nothing acknowledged is
missing. A batch that got a 503 is all or nothing; one sent while Milvus was wholly down is absent (the
503 says nothing was written, so a client may safely retry it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest

from tests.helpers import MilvusLiteServer, RunningServer, register_trained
from tests.integration.backends import backend_settings, milvus_prefix, serving

pytestmark = pytest.mark.milvus

DIM = 8
BATCH = 8
PROMPT_SECONDS = 5.0  # an answer during the outage comes this fast: a refused connection is not a timeout (10 s)
RECOVERY_SECONDS = 60.0  # Milvus back: writes work again within this (a guard, not a target)


@dataclass
class Batch:
    number: int
    items: dict[str, list[float]]
    sent_at: float
    status: int | None = None
    seconds: float = 0.0


@dataclass
class Writer:
    """Upserts batch after batch through the server; records what each got."""

    url: str
    name: str
    batches: list[Batch] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            for number in range(100_000):
                if self.stop.is_set():
                    return
                items = {f"b{number}-{j}": rng.normal(size=DIM).astype(np.float32).tolist() for j in range(BATCH)}
                batch = Batch(number, items, time.monotonic())
                body = {"items": [{"id": k, "vector": v, "payload": {"batch": number}} for k, v in items.items()]}
                try:
                    response = client.put(f"/v1/collections/{self.name}/items", json=body)
                except httpx.TransportError as exc:
                    self.errors.append(f"batch {number}: {exc!r}")
                    return
                batch.status, batch.seconds = response.status_code, time.monotonic() - batch.sent_at
                self.batches.append(batch)
                if response.status_code == 503:
                    try:
                        check_unavailable(response)
                    except AssertionError as exc:
                        self.errors.append(f"batch {number}: {exc}")
                        return
                    time.sleep(0.1)
                elif response.status_code != 200:
                    self.errors.append(f"batch {number}: {response.status_code} {response.text[:300]}")
                    return

    def count(self, status: int) -> int:
        return sum(1 for b in self.batches if b.status == status)


def check_unavailable(response: httpx.Response) -> None:
    """A 503 as the API answers it: Retry-After, and the OpenAI error shape naming the backend."""
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) >= 1, response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["code"] == "collection_backend_unavailable" and "Milvus" in error["message"], error


@pytest.fixture()
def milvus(tmp_path) -> Iterator[MilvusLiteServer]:
    with MilvusLiteServer(tmp_path / "milvus") as server:
        yield server


@pytest.fixture()
def running(request, tmp_path, milvus, tiny_model_dir) -> Iterator[RunningServer]:
    from service.state import open_registry

    settings = backend_settings(
        "milvus",
        tmp_path / "data",
        request,
        milvus_uri=milvus.uri,  # this test's own Milvus, which it stops
        milvus_prefix=milvus_prefix(),
        preload_models=["tiny/1"],
        register_default_models=False,
    )
    register_trained(open_registry(settings), "tiny", tiny_model_dir)
    with serving("milvus", settings) as server:
        yield server


def _wait(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen in {seconds} s")


def _timed(call) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_milvus_down_is_a_prompt_503_and_nothing_acknowledged_is_lost(running, milvus):
    http = httpx.Client(base_url=running.url, timeout=60)
    name = "outage"
    assert http.post("/v1/collections", json={"name": name, "dimension": DIM, "metric": "dot"}).status_code == 201
    writer = Writer(running.url, name)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: writer.count(200) >= 20 or not thread.is_alive(), 60, "20 acknowledged batches")

        milvus.stop()
        stopped_at = time.monotonic()
        _wait(lambda: writer.count(503) >= 3 or not thread.is_alive(), 30, "three 503s to the writer")
        assert writer.errors == [], writer.errors

        # Every collection route: a prompt 503 with Retry-After and the JSON error.
        calls = {
            "list": lambda: http.get("/v1/collections"),
            "get": lambda: http.get(f"/v1/collections/{name}"),
            "create": lambda: http.post("/v1/collections", json={"name": "other", "dimension": DIM}),
            "get item": lambda: http.get(f"/v1/collections/{name}/items/b0-0"),
            "page": lambda: http.get(f"/v1/collections/{name}/items"),
            "search": lambda: http.post(f"/v1/collections/{name}/search", json={"query": {"vector": [1.0] * DIM}}),
            "delete": lambda: http.post(f"/v1/collections/{name}/items/delete", json={"ids": ["b0-0"]}),
            "drop": lambda: http.delete(f"/v1/collections/{name}"),
        }
        seconds_by_route = {}
        for what, call in calls.items():
            response, seconds_by_route[what] = _timed(call)
            assert response.status_code == 503, (what, response.status_code, response.text)
            check_unavailable(response)
        slowest = max([b.seconds for b in writer.batches if b.status == 503] + list(seconds_by_route.values()))
        assert slowest < PROMPT_SECONDS, (slowest, seconds_by_route)

        # The rest of the service is unaffected.
        embedded, seconds = _timed(lambda: http.post("/v1/embeddings", json={"model": "tiny/1", "input": "still up"}))
        assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 32, embedded.text
        health, _ = _timed(lambda: http.get("/health"))
        assert health.status_code == 200, health.text

        milvus.start()  # same port, same data dir
        restarted_at = time.monotonic()
        acked_before = writer.count(200)
        _wait(lambda: writer.count(200) >= acked_before + 10 or not thread.is_alive(), RECOVERY_SECONDS, "recovery")
        print(f"writes worked again {time.monotonic() - restarted_at:.1f} s after Milvus restarted")
    finally:
        writer.stop.set()
        thread.join(60)
    assert not thread.is_alive() and writer.errors == [], writer.errors

    present: dict[str, list[float]] = {}
    cursor = None
    while True:
        params = {"limit": 1000, "with_vector": "true"} | ({"cursor": cursor} if cursor else {})
        page = http.get(f"/v1/collections/{name}/items", params=params)
        assert page.status_code == 200, page.text
        present |= {item["id"]: item["vector"] for item in page.json()["items"]}
        if not (cursor := page.json()["next_cursor"]):
            break
    acked = {k: v for b in writer.batches if b.status == 200 for k, v in b.items.items()}
    lost = sorted(set(acked) - set(present))
    assert lost == [], f"{len(lost)} of {len(acked)} acknowledged items lost, e.g. {lost[:5]}"
    assert all(present[k] == v for k, v in acked.items())  # dot: stored as sent
    refused = [b for b in writer.batches if b.status == 503]
    outcome = {}
    for batch in refused:
        held = [k for k in batch.items if k in present]
        assert len(held) in (0, BATCH), f"batch {batch.number} got 503 and is half written: {held}"
        outcome[batch.number] = "present" if held else "absent"
        if stopped_at < batch.sent_at and batch.sent_at + batch.seconds < restarted_at:  # wholly while it was down
            assert not held, f"batch {batch.number} got 503 while Milvus was down, yet it is stored"
    assert set(present) == set(acked) | {k for b in refused if outcome[b.number] == "present" for k in b.items}
    count = http.get(f"/v1/collections/{name}").json()["count"]
    assert count == len(present)
    print(f"{len(acked)} items acknowledged; {len(refused)} batches got 503 ({sorted(set(outcome.values()))})")
    print(f"slowest 503: {slowest:.2f} s")
    http.close()
