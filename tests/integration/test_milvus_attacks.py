"""The milvus backend attacked the way a hostile (or merely unlucky) client would: two API replicas on one
Milvus racing each other, hostile ids, cursors and filters, garbage in the meta collection.

Every answer must be a 2xx, or a 4xx / 503 (+ Retry-After) in the API's JSON error shape: never a 500,
never a hang, never a lost acknowledged write. Two in-process servers (`RunningServer`) with the same
Milvus prefix are the two replicas; collections are vector-only, so no model loads.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import RunningServer
from tests.integration.backends import backend_settings, milvus_prefix, serving

pytestmark = pytest.mark.milvus

DIM = 4


def _name(tag: str = "x") -> str:
    return f"{tag}{uuid.uuid4().hex[:8]}"


def assert_clean(response: httpx.Response) -> httpx.Response:
    """A 2xx, or a 4xx/503 with the API's JSON error (503 with Retry-After): never a 500."""
    status = response.status_code
    assert status < 500 or status == 503, f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert error["message"] and error["code"], response.text
    if status == 503 and response.json()["error"]["code"] != "collection_unavailable":  # (a broken collection)
        assert "retry-after" in response.headers, response.headers
    return response


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, request) -> Iterator[tuple[RunningServer, RunningServer]]:
    prefix = milvus_prefix()
    settings = [
        backend_settings(
            "milvus", tmp_path_factory.mktemp(f"attack-{side}"), request, milvus_prefix=prefix, preload_models=[]
        )
        for side in "ab"
    ]
    with serving("milvus", settings[0]) as a, serving("milvus", settings[1]) as b:
        yield a, b


@pytest.fixture(scope="module")
def clients(replicas) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    a, b = replicas
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        yield ca, cb


def _create(client: httpx.Client, name: str) -> None:
    response = client.post("/v1/collections", json={"name": name, "dimension": DIM})
    assert response.status_code == 201, response.text


def _at_once(*calls):
    """Run the calls at the same instant (a barrier), each in its own thread; their results."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(run, call) for call in calls]]


# -- two replicas dropping one collection at once -------------------------------------------------------


def test_two_replicas_dropping_one_collection_at_once_never_500(clients, replicas):
    """Both replicas read the config row, both drop the physical collection: the loser's drop_collection
    failed ("No such file or directory" from milvus-lite) and came back as a 500."""
    ca, cb = clients
    for _ in range(4):
        name = _name("dd")
        _create(ca, name)
        ca.put(f"/v1/collections/{name}/items", json={"items": [{"id": "a", "vector": [1, 0, 0, 0]}]})
        url = f"/v1/collections/{name}"
        ra, rb = _at_once(lambda url=url: ca.delete(url), lambda url=url: cb.delete(url))
        assert_clean(ra), assert_clean(rb)
        assert {ra.status_code, rb.status_code} <= {200, 404}, (ra.text, rb.text)
        assert 200 in (ra.status_code, rb.status_code)
        assert ca.get(f"/v1/collections/{name}").status_code == 404
        assert cb.get(f"/v1/collections/{name}").status_code == 404
        listing = assert_clean(cb.get("/v1/collections")).json()
        assert name not in [c["name"] for c in listing["data"]] + [u["name"] for u in listing["unavailable"]]


# -- garbage in the meta collection ------------------------------------------------------------------


def _meta_put(running: RunningServer, rows: list[dict]) -> None:
    from pymilvus import MilvusClient

    settings = running.state.settings
    client = MilvusClient(uri=settings.milvus_uri, timeout=30)
    try:
        client.upsert(f"{settings.milvus_prefix}__meta", [{**row, "vector": [1.0, 0.0]} for row in rows])
    finally:
        client.close()


def test_garbage_meta_rows_are_unavailable_collections_not_a_500(clients, replicas):
    """Config rows that do not parse (not an object, missing keys, another collection's name), a field row
    without its keys, a re-embed row with a garbage heartbeat: the listing answered 500 for every
    collection (KeyError in the schema read), a lookup of the broken one 500 too."""
    ca, cb = clients
    good, bad_field, bad_reembed, bad_config, renamed, listy = (_name(t) for t in ("ok", "bf", "br", "bc", "rn", "ls"))
    for name in (good, bad_field, bad_reembed, bad_config, renamed):
        _create(ca, name)
        body = {"items": [{"id": "a", "vector": [1, 0, 0, 0], "payload": {"k": 1}}]}
        assert ca.put(f"/v1/collections/{name}/items", json=body).status_code == 200
    _meta_put(
        replicas[0],
        [
            {"key": f"field:{bad_field}:zz", "name": bad_field, "kind": "field", "value": {"nope": 1}},
            {
                "key": f"reembed:{bad_reembed}",
                "name": bad_reembed,
                "kind": "reembed",
                "value": {"state": "running", "heartbeat_ms": "soon", "total": "many"},
            },
            {"key": f"config:{bad_config}", "name": bad_config, "kind": "config", "value": {"garbage": True}},
            {"key": f"config:{renamed}", "name": "other", "kind": "config", "value": {"name": "other", "dim": 4}},
            {"key": f"config:{listy}", "name": listy, "kind": "config", "value": [1, 2]},
        ],
    )
    for client in (ca, cb):
        listing = assert_clean(client.get("/v1/collections"))
        assert listing.status_code == 200, listing.text
        body = listing.json()
        listed = {c["name"] for c in body["data"]}
        unavailable = {u["name"]: u["error"] for u in body["unavailable"]}
        assert {good, bad_field, bad_reembed} <= listed
        assert {bad_config, renamed, listy} <= set(unavailable), unavailable
        assert "config row" in unavailable[bad_config]
    for name in (bad_field, bad_reembed):  # still usable: the garbage row is skipped
        assert ca.get(f"/v1/collections/{name}").status_code == 200
        body = {"query": {"vector": [1, 0, 0, 0]}, "k": 3, "filter": {"k": 1}}
        assert [h["id"] for h in ca.post(f"/v1/collections/{name}/search", json=body).json()["results"]] == ["a"]
        up = {"items": [{"id": "b", "vector": [0, 1, 0, 0], "payload": {"zz": 2}}]}
        assert ca.put(f"/v1/collections/{name}/items", json=up).status_code == 200
    for name in (bad_config, renamed, listy):
        for response in (
            ca.get(f"/v1/collections/{name}"),
            ca.put(f"/v1/collections/{name}/items", json={"items": [{"id": "b", "vector": [1, 0, 0, 0]}]}),
            ca.post(f"/v1/collections/{name}/search", json={"query": {"vector": [1, 0, 0, 0]}, "k": 3}),
        ):
            assert response.status_code == 503 and response.json()["error"]["code"] == "collection_unavailable"
        assert ca.post("/v1/collections", json={"name": name, "dimension": DIM}).status_code == 409
        assert ca.delete(f"/v1/collections/{name}").status_code == 200  # a broken collection can be dropped
        assert ca.get(f"/v1/collections/{name}").status_code == 404


# -- milvus-lite embedded: two processes on one file --------------------------------------------------


def test_second_process_on_an_embedded_milvus_file_gets_a_clear_503(tmp_path):
    """milvus-lite locks its file: a second process (a second replica pointed at the same DUET_MILVUS_URI
    file) cannot open it. Nothing is damaged, but the error said 'a file path needs the milvus-lite package,
    pip install milvus-lite', with the package installed: a user would reinstall instead of stopping the
    other process or moving to a server."""
    import subprocess
    import sys

    from index.errors import BackendUnavailableError
    from index.milvus.client import MilvusConnection

    path = str(tmp_path / "milvus.db")
    hold = f"from pymilvus import MilvusClient; c = MilvusClient({path!r}); print('open', flush=True); "
    holder = subprocess.Popen(
        [sys.executable, "-c", hold + "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"open"
        conn = MilvusConnection(path, None, None, 5.0)
        with pytest.raises(BackendUnavailableError) as raised:
            conn.call("list_collections")
        text = str(raised.value)
        assert "one process" in text and "another process" in text and "pip install" not in text, text
        conn.close()
    finally:
        holder.communicate(b"", timeout=30)


# -- a write through replica A while replica B drops (and re-creates) the collection ----------------------


def test_write_of_a_request_that_outlived_a_drop_and_recreate_is_404(replicas):
    """A request on A looked the collection up; B dropped it and created it again (generation 0 again: the
    same Milvus collection name) before A wrote. The write landed in the new collection, which the request
    never saw (another dimension, other settings): acknowledged into the wrong collection."""
    import time

    import numpy as np

    from index.errors import CollectionNotFoundError
    from index.items import StoredItem

    a, b = (running.state.collections for running in replicas)
    name = _name("rc")
    from index.config import CollectionConfig

    b.create(CollectionConfig(name=name, dim=DIM, modalities=("vector",)))
    stale = a.get(name)
    b.drop(name)
    time.sleep(1.1)  # created_at has seconds
    b.create(CollectionConfig(name=name, dim=DIM, modalities=("vector",)))
    item = StoredItem(id="late", modality="vector", vector=np.ones(DIM, np.float32), payload={})
    with pytest.raises(CollectionNotFoundError, match="dropped"):
        stale.upsert([item])
    with pytest.raises(CollectionNotFoundError, match="dropped"):
        stale.delete(ids=["late"])
    assert b.get(name).count() == 0
    b.drop(name)


# -- re-embed started on A and on B at once ---------------------------------------------------------------


def test_reembed_started_on_two_replicas_at_once_runs_once_and_keeps_every_item(replicas):
    """Both replicas read "no re-embed running", both froze, both built generation N+1 under the same Milvus
    name: the second dropped the first's half-built target, a failed job's cleanup dropped the other's, and
    a flip could point the config at a generation that no longer exists (every item unreachable)."""
    import numpy as np

    from index.config import CollectionConfig
    from index.errors import CollectionBusyError
    from index.items import StoredItem

    a, b = (running.state.collections for running in replicas)
    name = _name("re")

    def embed(items):
        return np.stack([np.random.default_rng(len(i.content or "")).normal(size=8) for i in items]).astype(np.float32)

    a.create(CollectionConfig(name=name, dim=DIM, model="m/1", modalities=("text",)))
    items = [
        StoredItem(id=f"i{n}", modality="text", vector=np.eye(DIM, dtype=np.float32)[n % DIM], content=f"t{n}")
        for n in range(40)
    ]
    a.get(name).upsert(items)
    target = CollectionConfig(name=name, dim=8, model="m/2", modalities=("text",))
    for backend in (a, b):
        backend.options = type(backend.options)(**{**backend.options.__dict__, "timeout_seconds": 1.0})

    def start(backend):
        try:
            return backend.start_reembed(target, embed)
        except CollectionBusyError as exc:
            return exc

    outcomes = _at_once(lambda: start(a), lambda: start(b))
    jobs = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(jobs) == 1, outcomes
    jobs[0].join(60)
    assert jobs[0].progress.state == "done", jobs[0].progress.error
    for backend in (a, b):
        live = backend.get(name)
        assert live.config.model == "m/2" and live.count() == 40
    a.drop(name)
