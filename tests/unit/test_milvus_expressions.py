"""Duet filters compiled to Milvus expressions (index.milvus.expressions): the same validation and
messages as the SQL compiler, and no way for a field name or value to leave its literal."""

from __future__ import annotations

import math

import pytest

from index.errors import FilterError
from index.filters import compile_filter as compile_sql
from index.milvus import names
from index.milvus.expressions import (
    after_clause,
    compile_filter,
    conjunction,
    ids_clause,
    literal,
    modality_clause,
    string_literal,
)

SCHEMA = {"tag": "string", "n": "number", "ok": "bool"}

HOSTILE = [
    'x" or 1==1 or "',
    '" or true or "',
    "\\",
    '\\"',
    '\\" or 1==1 or \\"',
    "]",
    '"]) or (payload["n"] > 0',
    ") or (",
    "line\nnext",
    "tab\there\r",
    "\x00\x01\x1f\x7f",
    "é😀\u2028\u2029",
    "\\u0022 or 1==1",
    "'; drop collection x; --",
    'payload["tag"]',
]


def _unescape(text: str) -> str:
    """Read a Milvus string literal the way its parser does (only these escapes exist there)."""
    assert text[0] == '"' and text[-1] == '"'
    out, i, body = [], 0, text[1:-1]
    table = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "r": "\r"}
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            out.append(table[body[i + 1]])
            i += 2
            continue
        assert ch != '"', f"an unescaped quote ends the literal early: {text!r}"
        out.append(ch)
        i += 1
    return "".join(out)


@pytest.mark.parametrize("value", HOSTILE)
def test_string_literals_read_back_as_the_value(value: str) -> None:
    lit = string_literal(value)
    assert _unescape(lit) == value
    # No escape the server does not know (\u, \x, \0 ... are syntax errors there).
    assert "\\u" not in lit.replace("\\\\", "")


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_stay_one_literal(value: str) -> None:
    expr = compile_filter({"tag": value}, SCHEMA)
    assert expr.startswith('(payload["tag"] == "') and expr.endswith('")')
    assert _unescape(expr[len('(payload["tag"] == ') : -1]) == value


@pytest.mark.parametrize(
    "field",
    ['payload["a"]', 'a"] or 1==1 or payload["a', "a b", "a]", "a)", "a\n", "", "1abc", "a" * 65, "é"],
)
def test_hostile_field_names_are_refused(field: str) -> None:
    with pytest.raises(FilterError) as milvus:
        compile_filter({field: "x"}, {**SCHEMA, field: "string"})
    assert str(milvus.value).startswith("invalid filter field")
    if field != "a\n":  # index.filters.FIELD ends in `$`, which lets a final newline through (SQL params are safe)
        with pytest.raises(FilterError) as sql:
            compile_sql({field: "x"}, {**SCHEMA, field: "string"})
        assert str(milvus.value) == str(sql.value)


@pytest.mark.parametrize(
    "spec",
    [
        None,
        {},
        [],
        "tag",
        {"unknown": 1},
        {"tag": 1},
        {"n": "1"},
        {"n": True},
        {"ok": 1},
        {"n": math.nan},
        {"n": math.inf},
        {"n": 2**64},
        {"tag": "\ud800"},
        {"tag": {}},
        {"tag": {"$gt": "a"}},
        {"n": {"$in": []}},
        {"n": {"$in": "1"}},
        {"n": {"$in": [1, "2"]}},
        {"n": {"$regex": "."}},
        {"tag": None},
        {"tag": ["a"]},
    ],
)
def test_refusals_match_the_sql_compiler(spec) -> None:
    with pytest.raises(FilterError) as sql:
        compile_sql(spec, SCHEMA)
    with pytest.raises(FilterError) as milvus:
        compile_filter(spec, SCHEMA)
    assert str(milvus.value) == str(sql.value)


def test_operators() -> None:
    assert compile_filter({"tag": "a"}, SCHEMA) == '(payload["tag"] == "a")'
    assert compile_filter({"n": 3}, SCHEMA) == '(payload["n"] == 3)'
    assert compile_filter({"n": 2.5}, SCHEMA) == '(payload["n"] == 2.5)'
    assert compile_filter({"ok": True}, SCHEMA) == '(payload["ok"] == true)'
    assert compile_filter({"ok": {"$eq": False}}, SCHEMA) == '(payload["ok"] == false)'
    assert compile_filter({"n": {"$gte": 1, "$lt": 5}}, SCHEMA) == '(payload["n"] >= 1) and (payload["n"] < 5)'
    # $in: an OR-chain (Milvus has no `in` on JSON paths), duplicates once
    assert compile_filter({"tag": {"$in": ["a", "b", "a"]}}, SCHEMA) == (
        '((payload["tag"] == "a" or payload["tag"] == "b"))'
    )
    # $ne: items without the field match too, as in SQLite
    assert compile_filter({"tag": {"$ne": "a"}}, SCHEMA) == ('((not exists payload["tag"] or payload["tag"] != "a"))')
    assert compile_filter({"tag": "a", "n": 1}, SCHEMA) == '(payload["tag"] == "a") and (payload["n"] == 1)'


def test_literals() -> None:
    assert literal(True) == "true" and literal(False) == "false"
    assert literal(-3) == "-3"
    assert literal(1e-7) == "1e-07"
    assert literal(1e300) == "1e+300"
    assert literal(2**63 - 1) == "9223372036854775807"
    with pytest.raises(FilterError):
        literal(math.inf)
    with pytest.raises(FilterError):
        literal(None)


def test_other_clauses() -> None:
    assert modality_clause("image") == 'modality == "image"'
    with pytest.raises(FilterError, match="unknown modality"):
        modality_clause('text" or "1')
    assert ids_clause(['a"b', "c\\"]) == 'id in ["a\\"b", "c\\\\"]'
    assert after_clause('x" or id != "') == 'id > "x\\" or id != \\""'
    assert conjunction(None, "") == ""
    assert conjunction("a == 1", None) == "a == 1"
    assert conjunction("a == 1", "b == 2") == "(a == 1) and (b == 2)"


@pytest.mark.parametrize("name", ["a", "a-b", "a_b", "a__b", "a-_b", "a_-b", "A1-2_3", "x" * 100])
def test_names_encode_reversibly(name: str) -> None:
    encoded = names.encode(name)
    assert names.decode(encoded) == name
    assert all(c.isalnum() or c == "_" for c in encoded)
    physical = names.physical("duet", name, 7)
    assert names.generation_of("duet", name, physical) == 7
    assert len(physical) <= 255


def test_names_do_not_collide() -> None:
    candidates = ["a-b", "a_b", "a_hb", "a_ub", "a__b", "a-_b", "a_-b", "a--b", "a_g1", "a", "a_h", "a_u"]
    encoded = {names.encode(n) for n in candidates}
    assert len(encoded) == len(candidates)
    aliases = {names.alias("p", n) for n in candidates}
    physicals = {names.physical("p", n, g) for n in candidates for g in (0, 1, 10)}
    assert not aliases & physicals
    assert names.meta("p") not in aliases | physicals
    # a generation of one name is never taken for one of another
    assert names.generation_of("p", "a", names.physical("p", "a_g1", 0)) is None
    assert names.generation_of("p", "a-b", names.physical("p", "a_b", 0)) is None


def test_prefix_rules() -> None:
    assert names.check_prefix("duet") == "duet"
    for bad in ["", "1x", "a-b", "a b", "x" * 41, 'a"', "p_1", "p_"]:
        with pytest.raises(ValueError):
            names.check_prefix(bad)
