"""What a collection accepts from a caller: payloads SQLite can read (and rows written before
that rule still read back), vectors whose norm float32 can hold, ids a URL can address."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from index.config import CollectionConfig, validate_item_id
from index.engine import as_matrix
from index.errors import InvalidCollectionError, InvalidVectorError, PayloadError
from index.items import StoredItem
from index.manager import CollectionManager
from index.payloads import MAX_DEPTH, PayloadLimits, check_payload, load_payload

DIM = 4
LIMITS = PayloadLimits(max_fields=8, max_bytes=512, max_key_chars=16, max_collection_fields=12)


def _nested(depth: int) -> dict:
    payload: dict = {"leaf": 1}
    for _ in range(depth):
        payload = {"a": payload}
    return payload


@pytest.fixture()
def manager(tmp_path):
    m = CollectionManager(tmp_path / "collections")
    yield m
    m.close()


def _item(item_id: str, payload: dict | None = None) -> StoredItem:
    return StoredItem(item_id, "vector", np.array([1, 0, 0, 0], np.float32), payload or {})


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"s": float("nan")}, "payload.s: nan is not a finite number"),
        ({"s": float("inf")}, "payload.s: inf is not a finite number"),
        ({"a": {"b": [1, float("-inf")]}}, "payload.a.b[1]: -inf is not a finite number"),
        ({"big": 2**63}, "payload.big: 9223372036854775808 is outside the 64-bit integer range"),
        ({"a": [-(2**63) - 1]}, "payload.a[0]:"),
        ({"t": ["ok", "\ud800"]}, "payload.t[1]: a string with a lone surrogate"),
        ({"\udfff": 1}, "keys must be UTF-8 strings"),
        (_nested(MAX_DEPTH), f"nested deeper than {MAX_DEPTH} levels"),
    ],
)
def test_payloads_sqlite_cannot_read_are_refused_naming_the_field(payload, words):
    with pytest.raises(PayloadError) as error:
        check_payload(payload, None)
    assert words in str(error.value)


def test_payload_limits():
    check_payload({f"k{i}": i for i in range(8)}, LIMITS)
    check_payload({"a": 2**63 - 1, "b": -(2**63), "c": 1e308, "d": None, "e": _nested(MAX_DEPTH - 2)}, LIMITS)
    check_payload(_nested(MAX_DEPTH - 1), LIMITS)  # MAX_DEPTH levels of objects, the payload included
    with pytest.raises(PayloadError, match="has 9 fields; at most 8"):
        check_payload({f"k{i}": i for i in range(9)}, LIMITS)
    with pytest.raises(PayloadError, match="bytes as JSON; at most 512"):
        check_payload({"text": "x" * 600}, LIMITS)
    with pytest.raises(PayloadError, match=r"payload\.outer: key 'k{17}\.\.\.' is 17 characters; at most 16"):
        check_payload({"outer": {"k" * 17: 1}}, LIMITS)


def test_collection_refuses_non_finite_payloads_and_stays_readable(manager):
    """Before: the row was written as `{"s":NaN}`, and GET, every filter and searches hitting it failed."""
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    c.upsert([_item("ok", {"year": 2020})])
    with pytest.raises(PayloadError, match=r"item 'bad' payload\.s: nan"):
        c.upsert([_item("bad", {"s": float("nan")})])
    assert c.store.count() == 1
    assert [i.id for i in c.page(None, 10, {"year": 2020})] == ["ok"]


def test_distinct_fields_per_collection_are_bounded(manager):
    """Before: 40 upserts of 10k new keys each grew the schema every upsert reads and rewrites (100x slower)."""
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    c.upsert([_item("a", {f"f{i}": i for i in range(8)})], LIMITS)
    c.upsert([_item("b", {f"g{i}": i for i in range(4)})], LIMITS)  # 12: the limit
    with pytest.raises(PayloadError, match="would be new, and this collection already has 12 filterable fields"):
        c.upsert([_item("c", {"f0": 1, "new": 1})], LIMITS)
    c.upsert([_item("c", {"f0": 1, "g3": 2, "nested": {"free": "form"}})], LIMITS)  # known fields, nested: fine
    assert len(c.store.schema) == 12 and c.store.count() == 3


def test_rows_with_nan_from_before_are_repaired_on_open(tmp_path):
    manager = CollectionManager(tmp_path)
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    c.upsert([_item("nan", {"s": 1.0, "year": 2020}), _item("fine", {"year": 2021})])
    manager.close()
    with sqlite3.connect(tmp_path / "c" / "store.sqlite") as conn:  # as an older version wrote it
        conn.execute("""UPDATE items SET payload = '{"s":NaN,"year":2020,"t":[Infinity]}' WHERE id = 'nan'""")
        conn.execute("DELETE FROM meta WHERE key = 'payloads_strict_json'")
    manager = CollectionManager(tmp_path)
    c = manager.get("c")
    assert c.get("nan").payload == {"s": None, "year": 2020, "t": [None]}
    assert [i.id for i in c.page(None, 10, {"year": {"$gte": 2020}})] == ["fine", "nan"]
    assert {h.id for h in c.search(as_matrix([1, 0, 0, 0], DIM, normalize=True), 2, filter={"year": 2020})[0]} == {
        "nan"
    }
    manager.close()


def test_unparseable_payloads_read_back_without_failing():
    assert load_payload('{"s":NaN,"n":[-Infinity]}') == {"s": None, "n": [None]}
    assert load_payload("not json") == {}


@pytest.mark.parametrize(
    ("vector", "normalize"),
    [([3e38] * 4, True), ([-3e38, 3e38, 0, 0], True), ([1e-45] * 4, True), ([1e-30, 0, 0, 0], True)],
)
def test_norms_are_computed_in_float64(vector, normalize):
    """Before: the float32 norm of [3e38]*4 overflowed to inf and the vector was stored as zeros."""
    out = as_matrix(vector, DIM, normalize=normalize)
    assert np.isfinite(out).all()
    assert abs(float(np.linalg.norm(out)) - 1.0) < 1e-6


def test_dot_vectors_whose_products_overflow_are_refused():
    as_matrix([1e17] * 4, DIM, normalize=False)
    with pytest.raises(InvalidVectorError, match="norm"):
        as_matrix([3e38] * 4, DIM, normalize=False)


@pytest.mark.parametrize(
    "item_id", ["a/b", "/lead", "trail/", "a//b", "50%", "q?", "x#y", "a b", "ünï/cødé", "...", "a..b"]
)
def test_ids_a_url_can_address_are_accepted(item_id):
    assert validate_item_id(item_id, new=True) == item_id


def test_ids_sqlite_cannot_encode_are_refused():
    with pytest.raises(InvalidCollectionError, match="lone surrogates"):
        validate_item_id("a\ud800")


@pytest.mark.parametrize("item_id", [".", "..", "a/../b", "./a", "a/."])
def test_ids_with_dot_segments_are_refused_at_write(manager, item_id):
    c = manager.create(CollectionConfig(name="c", dim=DIM))
    with pytest.raises(InvalidCollectionError, match="'.' and '..' cannot be parts of an id"):
        c.upsert([_item(item_id)])
    assert validate_item_id(item_id) == item_id  # still readable / deletable if stored before
