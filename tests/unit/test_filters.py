from __future__ import annotations

import sqlite3

import pytest

from index.errors import FilterError
from index.filters import compile_filter

SCHEMA = {"lang": "string", "year": "number", "draft": "bool"}
ROWS = [
    '{"lang": "en", "year": 2020, "draft": false}',
    '{"lang": "de", "year": 2019, "draft": true}',
    '{"lang": "fr", "year": 2023}',
]


def _select(spec) -> list[int]:
    where, params = compile_filter(spec, SCHEMA)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE items (n INTEGER, payload TEXT)")
    conn.executemany("INSERT INTO items VALUES (?, ?)", list(enumerate(ROWS)))
    return [r[0] for r in conn.execute(f"SELECT n FROM items WHERE {where} ORDER BY n", params)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"lang": "en"}, [0]),
        ({"year": {"$gte": 2020}}, [0, 2]),
        ({"year": {"$gt": 2019, "$lt": 2023}}, [0]),
        ({"lang": {"$in": ["de", "fr"]}}, [1, 2]),
        ({"lang": {"$ne": "en"}}, [1, 2]),
        ({"draft": True}, [1]),
        ({"draft": {"$ne": True}}, [0, 2]),
        ({"lang": "en", "year": 2019}, []),
        ({"year": {"$eq": 2023}}, [2]),
    ],
)
def test_filters_select_the_right_rows(spec, expected):
    assert _select(spec) == expected


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"colour": "red"}, "unknown filter field 'colour' (filterable fields: draft, lang, year)"),
        ({"year": "2020"}, "expects a number"),
        ({"lang": 3}, "expects a string"),
        ({"lang": {"$gt": "a"}}, "needs a number field"),
        ({"year": {"$regex": "x"}}, "unknown filter operator"),
        ({"year": {}}, "empty condition"),
        ({"lang": {"$in": []}}, "$in"),
        ({"lang": {"$in": "en"}}, "$in"),
        ([], "non-empty object"),
        ({}, "non-empty object"),
        ({"bad field": 1}, "invalid filter field"),
        ({"x') OR 1=1 --": 1}, "invalid filter field"),
    ],
)
def test_bad_filters_say_what_is_wrong(spec, words):
    with pytest.raises(FilterError) as error:
        compile_filter(spec, SCHEMA)
    assert words in str(error.value)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"year": 9223372036854775808}, "outside the 64-bit integer range"),
        ({"year": -9223372036854775809}, "outside the 64-bit integer range"),
        ({"year": {"$gt": 2**70}}, "outside the 64-bit integer range"),
        ({"year": {"$in": [2020, 2**64]}}, "outside the 64-bit integer range"),
        ({"year": float("nan")}, "not a finite number"),
        ({"year": {"$lt": float("inf")}}, "not a finite number"),
        ({"year": {"$ne": float("-inf")}}, "not a finite number"),
    ],
)
def test_numbers_sqlite_cannot_compare_are_refused(spec, words):
    """Before: sqlite3 raised OverflowError past int64 (a 500), and NaN/inf compared as nothing."""
    with pytest.raises(FilterError) as error:
        compile_filter(spec, SCHEMA)
    assert words in str(error.value) and "'year'" in str(error.value)


def test_int64_bounds_and_big_finite_floats_still_filter():
    assert _select({"year": {"$lt": 2**63 - 1, "$gt": -(2**63)}}) == [0, 1, 2]
    assert _select({"year": {"$lt": 1e308}}) == [0, 1, 2]


def test_unknown_field_errors_list_a_bounded_number_of_fields():
    schema = {f"field_{i:04d}": "number" for i in range(10_000)}
    with pytest.raises(FilterError) as error:
        compile_filter({"nope": 1}, schema)
    message = str(error.value)
    assert len(message) < 600, len(message)
    assert "field_0000" in message and "and 9980 more" in message


def test_strings_sqlite_cannot_encode_are_refused():
    with pytest.raises(FilterError, match="lone surrogate"):
        compile_filter({"lang": {"$in": ["en", "\ud800"]}}, SCHEMA)
    assert _select({"lang": {"$in": ["en", "ünï😀"]}}) == [0]


def test_a_field_name_with_a_final_newline_is_refused():
    """`$` also matches before a final newline; the field rule must not."""
    with pytest.raises(FilterError, match="invalid filter field"):
        compile_filter({"a\n": 1}, {"a\n": "number", "a": "number"})
