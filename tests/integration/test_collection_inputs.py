"""Issue 11's attacks on collections through the HTTP API: values SQLite or float32 cannot hold
(NaN, Infinity, integers past int64, huge vectors), payloads that grow a collection's schema
without bound, and item ids a URL must address. Each is a 4xx naming what is wrong, and the
collection keeps serving afterwards (a 500 here was the bug). Both collection backends keep this
contract (tests/integration/backends.py); what SQLite itself stores is the faiss backend's own."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest

from tests.helpers import RunningServer, make_settings

DIM = 4


@pytest.fixture(scope="module")
def api(backend, backend_servers) -> Iterator[httpx.Client]:
    """A client of the backend's contract server (vector-only collections, named in0, in1, ...)."""
    with httpx.Client(base_url=backend_servers.get(backend).url, timeout=60) as client:
        yield client


_names = iter(range(10_000))


def _collection(api: httpx.Client, metric: str = "cosine") -> str:
    name = f"in{next(_names)}"
    assert api.post("/v1/collections", json={"name": name, "dimension": DIM, "metric": metric}).status_code == 201
    items = [{"id": "seed", "vector": [1, 0, 0, 0], "payload": {"year": 2020, "s": 1.5, "lang": "en"}}]
    assert api.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    return name


def _raw(api: httpx.Client, method: str, url: str, body: str) -> httpx.Response:
    """A body written by hand: NaN, Infinity and 2**63 as JSON text, as an attacker sends them."""
    return api.request(method, url, content=body.encode(), headers={"Content-Type": "application/json"})


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error["message"]


def _still_serves(api: httpx.Client, name: str) -> None:
    assert api.get(f"/v1/collections/{name}/items/seed").status_code == 200
    assert api.get(f"/v1/collections/{name}/items", params={"filter": '{"year": 2020}'}).json()["items"]
    hits = api.post(
        f"/v1/collections/{name}/search", json={"query": {"vector": [1, 0, 0, 0]}, "filter": {"year": 2020}}
    )
    assert hits.status_code == 200 and hits.json()["results"][0]["id"] == "seed"


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ('{"s": NaN}', "items[0].payload.s"),
        ('{"s": Infinity}', "items[0].payload.s"),
        ('{"a": {"b": [1, -Infinity]}}', "items[0].payload.a.b[1]"),
        ('{"big": 9223372036854775808}', "items[0].payload.big"),
        ('{"small": -9223372036854775809}', "items[0].payload.small"),
        ('{"huge": 1e400}', "items[0].payload.huge"),
    ],
)
def test_payload_numbers_sqlite_cannot_read_are_a_400_naming_the_field(api, payload, field):
    """Before: `{"s": NaN}` was stored, and GET, every filter and searches hitting it answered 500."""
    name = _collection(api)
    body = f'{{"items": [{{"id": "bad", "vector": [0, 1, 0, 0], "payload": {payload}}}]}}'
    message = _error(_raw(api, "PUT", f"/v1/collections/{name}/items", body), 400, "invalid_payload")
    assert field in message
    assert api.get(f"/v1/collections/{name}/items/bad").status_code == 404
    _still_serves(api, name)


def test_deep_payloads_are_refused(api):
    name = _collection(api)
    deep = "{}"
    for _ in range(40):
        deep = f'{{"a": {deep}}}'
    body = f'{{"items": [{{"id": "deep", "vector": [0, 1, 0, 0], "payload": {deep}}}]}}'
    assert "nested deeper than 32" in _error(
        _raw(api, "PUT", f"/v1/collections/{name}/items", body), 400, "invalid_payload"
    )
    _still_serves(api, name)


@pytest.mark.parametrize(
    ("filter_json", "field"),
    [
        ('{"year": 9223372036854775808}', "year"),
        ('{"year": -9223372036854775809}', "year"),
        ('{"year": {"$gt": 1e400}}', "year"),
        ('{"year": {"$in": [2020, NaN]}}', "year"),
        ('{"s": {"$lt": Infinity}}', "s"),
    ],
)
def test_filter_numbers_out_of_range_are_a_400_everywhere(api, filter_json, field):
    """Before: a filter value past int64 raised OverflowError in sqlite3 (a 500)."""
    name = _collection(api)
    search = _raw(
        api,
        "POST",
        f"/v1/collections/{name}/search",
        f'{{"query": {{"vector": [1, 0, 0, 0]}}, "filter": {filter_json}}}',
    )
    listing = api.get(f"/v1/collections/{name}/items", params={"filter": filter_json})
    delete = _raw(api, "POST", f"/v1/collections/{name}/items/delete", f'{{"filter": {filter_json}}}')
    for response in (search, listing, delete):
        assert f"filter on '{field}'" in _error(response, 400, "invalid_filter")
    _still_serves(api, name)


def test_a_deeply_nested_filter_is_a_4xx(api):
    name = _collection(api)
    listing = api.get(f"/v1/collections/{name}/items", params={"filter": "[" * 5000 + "]" * 5000})
    assert listing.status_code == 400, listing.text
    search = _raw(
        api,
        "POST",
        f"/v1/collections/{name}/search",
        '{"query": {"vector": [1,0,0,0]}, "filter": ' + "[" * 5000 + "]" * 5000 + "}",
    )
    assert 400 <= search.status_code < 500, search.text


@pytest.mark.faiss_only("rewrites a row of the faiss backend's SQLite store behind its back")
def test_rows_with_nan_from_an_older_version_are_served_after_a_restart(tmp_path):
    """A store written before payloads were checked: the row is repaired on open, nothing answers 500."""
    settings = make_settings(tmp_path / "data", preload_models=[], register_default_models=False)
    items = [
        {"id": "poisoned", "vector": [1, 0, 0, 0], "payload": {"s": 1.0, "year": 2020}},
        {"id": "fine", "vector": [0.9, 0.1, 0, 0], "payload": {"s": 2.0, "year": 2021}},
    ]
    with RunningServer(settings) as running:
        httpx.post(f"{running.url}/v1/collections", json={"name": "c", "dimension": DIM})
        assert httpx.put(f"{running.url}/v1/collections/c/items", json={"items": items}).status_code == 200
    with sqlite3.connect(tmp_path / "data" / "collections" / "c" / "store.sqlite") as conn:
        conn.execute("""UPDATE items SET payload = '{"s":NaN,"year":2020}' WHERE id = 'poisoned'""")
        conn.execute("DELETE FROM meta WHERE key = 'payloads_strict_json'")  # as an older version left it
    with RunningServer(settings) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        item = client.get("/v1/collections/c/items/poisoned")
        assert item.status_code == 200 and item.json()["payload"] == {"s": None, "year": 2020}
        listed = client.get("/v1/collections/c/items", params={"filter": '{"year": {"$gte": 2020}}'})
        assert [i["id"] for i in listed.json()["items"]] == ["fine", "poisoned"]
        hits = client.post("/v1/collections/c/search", json={"query": {"vector": [1, 0, 0, 0]}, "k": 2})
        assert [h["id"] for h in hits.json()["results"]] == ["poisoned", "fine"]
        deleted = client.post("/v1/collections/c/items/delete", json={"filter": {"s": {"$gt": 1.5}}})
        assert deleted.json()["ids"] == ["fine"]


def test_huge_vectors_are_normalised_in_float64(api):
    """Before: the float32 norm of [3e38]*4 overflowed and the stored vector was all zeros."""
    name = _collection(api)
    huge = {"id": "huge", "vector": [3e38] * 4}
    assert api.put(f"/v1/collections/{name}/items", json={"items": [huge]}).status_code == 200
    stored = api.get(f"/v1/collections/{name}/items/huge", params={"with_vector": "true"}).json()["vector"]
    assert stored == pytest.approx([0.5] * 4)
    hits = api.post(f"/v1/collections/{name}/search", json={"query": {"vector": [3e38] * 4}, "k": 1}).json()
    assert hits["results"][0]["id"] == "huge" and hits["results"][0]["score"] == pytest.approx(1.0)


def test_dot_vectors_whose_inner_products_overflow_are_refused(api):
    name = _collection(api, metric="dot")
    upsert = api.put(f"/v1/collections/{name}/items", json={"items": [{"id": "x", "vector": [3e38] * 4}]})
    assert "norm" in _error(upsert, 400, "invalid_vector")
    search = api.post(f"/v1/collections/{name}/search", json={"query": {"vector": [3e38] * 4}})
    assert "norm" in _error(search, 400, "invalid_vector")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"query": {"vector": [NaN, 1, 0, 0]}}', "queries[0].vector"),
        ('{"query": {"vector": [1e39, 1, 0, 0]}}', "queries[0].vector"),
        ('{"query": {"vector": [1, 0, 0, 0]}, "k": NaN}', "k"),
        ('{"query": {"vector": [1, 0, 0, 0]}, "k": 1e400}', "k"),
        ('{"query": {"vector": [1, 0, 0, 0]}, "k": 9223372036854775808}', "k"),
        ('{"query": {"vector": [1, 0, 0, 0]}, "nprobe": Infinity}', "nprobe"),
    ],
)
def test_non_finite_search_numbers_are_4xx(api, body, param):
    name = _collection(api)
    response = _raw(api, "POST", f"/v1/collections/{name}/search", body)
    assert response.status_code in (400, 422) and response.json()["error"]["param"] == param, response.text


def test_list_limit_must_be_a_small_integer(api):
    name = _collection(api)
    for limit in ("NaN", "1e400", "9223372036854775808", "-1"):
        response = api.get(f"/v1/collections/{name}/items", params={"limit": limit})
        assert response.status_code in (400, 422) and response.json()["error"]["param"] == "limit", response.text


# -- item 12: payloads cannot grow a collection's schema without bound ----------------------------


def _upsert_payload(api: httpx.Client, name: str, item_id: str, payload: dict) -> httpx.Response:
    return api.put(
        f"/v1/collections/{name}/items", json={"items": [{"id": item_id, "vector": [0, 1, 0, 0], "payload": payload}]}
    )


def test_payload_size_limits_are_400s_naming_the_limit(api):
    """Before: a payload of 10k keys was accepted (and 40 of them made every later upsert ~100x slower)."""
    name = _collection(api)
    many = _upsert_payload(api, name, "many", {f"k{i}": i for i in range(10_000)})
    assert "items[0].payload has 10000 fields; at most 64" in _error(many, 400, "invalid_payload")
    big = _upsert_payload(api, name, "big", {"text": "x" * 70_000})
    assert "at most 65536" in _error(big, 400, "invalid_payload")
    long_key = _upsert_payload(api, name, "key", {"nested": {"k" * 1000: 1}})
    assert "items[0].payload.nested: key" in _error(long_key, 400, "invalid_payload")
    assert _upsert_payload(api, name, "ok", {f"k{i}": i for i in range(64)}).status_code == 200
    _still_serves(api, name)


def test_distinct_fields_per_collection_are_bounded_and_errors_stay_short(api):
    name = _collection(api)  # 3 fields: year, s, lang
    for batch in range(4):
        fields = {f"b{batch}_{i}": i for i in range(64 if batch < 3 else 61)}
        assert _upsert_payload(api, name, f"i{batch}", fields).status_code == 200
    info = api.get(f"/v1/collections/{name}").json()
    assert len(info["stats"]["payload_fields"]) == 256
    over = _upsert_payload(api, name, "over", {"year": 2021, "one_more": 1})
    assert "already has 256 filterable fields (at most 256)" in _error(over, 400, "invalid_payload")
    assert _upsert_payload(api, name, "known", {"year": 2021, "b0_0": 5, "free": {"x": 1}}).status_code == 200
    unknown = api.post(
        f"/v1/collections/{name}/search", json={"query": {"vector": [1, 0, 0, 0]}, "filter": {"nope": 1}}
    )
    message = _error(unknown, 400, "invalid_filter")
    assert "and 236 more" in message and len(message) < 600


# -- item 13: every id that can be stored can be fetched by URL ----------------------------------

ADDRESSABLE_IDS = [
    "a/b",
    "docs/readme.md",
    "/lead",
    "trail/",
    "a//b",
    "50%",
    "%2F",
    "q?x=1",
    "x#y",
    "a b",
    "ünï/cødé",
    "...",
    "delete",
]


@pytest.mark.parametrize("item_id", ADDRESSABLE_IDS)
def test_ids_round_trip_through_the_url(api, item_id):
    """Before: an id with '/' was stored, but GET /items/{id} answered 404 (the route took one segment)."""
    name = _collection(api)
    assert _upsert_payload(api, name, item_id, {"year": 2021}).status_code == 200
    fetched = api.get(f"/v1/collections/{name}/items/{quote(item_id, safe='')}")
    assert fetched.status_code == 200 and fetched.json()["id"] == item_id, fetched.text
    if "/" in item_id and "//" not in item_id and not item_id.startswith("/"):
        plain = api.get(f"/v1/collections/{name}/items/{quote(item_id, safe='/')}")  # '/' unescaped works too
        assert plain.status_code == 200 and plain.json()["id"] == item_id
    hits = api.post(f"/v1/collections/{name}/search", json={"query": {"id": item_id}, "k": 1}).json()["results"]
    assert [h["id"] for h in hits] == ["seed"]
    deleted = api.post(f"/v1/collections/{name}/items/delete", json={"ids": [item_id]}).json()
    assert deleted["ids"] == [item_id]
    assert api.get(f"/v1/collections/{name}/items/{quote(item_id, safe='')}").status_code == 404


@pytest.mark.parametrize("item_id", [".", "..", "a/../b", "./a", "a/."])
def test_ids_a_url_would_resolve_away_are_refused_at_write(api, item_id):
    name = _collection(api)
    message = _error(_upsert_payload(api, name, item_id, {}), 400, "invalid_collection_request")
    assert "'.' and '..' cannot be parts of an id" in message


@pytest.mark.parametrize(
    ("method", "path", "body", "code"),
    [
        ("POST", "items/delete", '{"ids": ["\\ud800"]}', "invalid_collection_request"),
        ("POST", "items/delete", '{"filter": {"lang": "\\ud800"}}', "invalid_filter"),
        (
            "POST",
            "search",
            '{"query": {"vector": [1, 0, 0, 0]}, "filter": {"lang": {"$in": ["\\udfff"]}}}',
            "invalid_request_body",
        ),
        ("GET", "items?filter=%7B%22lang%22%3A%20%22%5Cud800%22%7D", "", "invalid_filter"),
    ],
)
def test_lone_surrogates_sqlite_cannot_bind_are_400s(api, method, path, body, code):
    """Before: Python's json accepts "\\ud800"; sqlite3 could not encode it (UnicodeEncodeError, a 500)."""
    name = _collection(api)
    response = _raw(api, method, f"/v1/collections/{name}/{path}", body)
    assert "surrogate" in _error(response, 400, code)
    _still_serves(api, name)


def test_a_page_of_items_is_what_the_items_say_one_by_one(api):
    """Pages are serialised off the event loop with orjson (a 1000-item page of 4096-d vectors and
    64 KiB payloads, ~95 MB, stalled every request for ~1 s through pydantic on the loop): what they
    hold must not change, float32 vectors and nested payloads included, nor the paging."""
    name = _collection(api)
    items = [
        {"id": f"p/{i}", "vector": [0.1 * (i + 1), -1e-7, 3.3e38 / (i + 1), 1], "payload": {"n": i, "x": {"y": [i]}}}
        for i in range(5)
    ]
    assert api.put(f"/v1/collections/{name}/items", json={"items": items}).status_code == 200
    pages, cursor = [], None
    while True:
        params = {"limit": 2, "with_vector": "true"} | ({"cursor": cursor} if cursor else {})
        page = api.get(f"/v1/collections/{name}/items", params=params)
        assert page.status_code == 200 and page.headers["content-type"] == "application/json", page.text
        pages.append(page.json())
        if not (cursor := page.json()["next_cursor"]):
            break
    assert [len(p["items"]) for p in pages] == [2, 2, 2]  # 6 items: seed and p/0..p/4
    listed = [item for p in pages for item in p["items"]]
    for item in listed:
        one = api.get(f"/v1/collections/{name}/items/{quote(item['id'], safe='')}", params={"with_vector": True})
        assert one.json() == item
    plain = api.get(f"/v1/collections/{name}/items", params={"filter": '{"year": 2020}'}).json()
    assert plain == {
        "items": [
            {
                "id": "seed",
                "modality": "vector",
                "payload": {"year": 2020, "s": 1.5, "lang": "en"},
                "content": None,
                "vector": None,
            }
        ],
        "next_cursor": None,
    }
