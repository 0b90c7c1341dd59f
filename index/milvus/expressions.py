"""Duet filters compiled to Milvus boolean expressions over the `payload` JSON field.

The filter language, its validation and its error messages are those of `index.filters` (the
faiss backend compiles the same filters to SQL), so a filter is refused, or matches, the same
items on either backend. What is specific to Milvus:

- Values are rendered as literals, never spliced: strings as double-quoted literals in which only
  `\\`, `"`, newline, tab and carriage return are escaped (Milvus's expression parser knows those
  escapes and no others: `\\uXXXX` is a syntax error there, so JSON's escaping cannot be used; any
  other character, control characters and non-ASCII included, is taken literally), numbers by
  `repr` of a finite int or float, bools as `true`/`false`.
- Field names must match `index.filters.FIELD` (letters, digits, `_`) and be in the collection's
  schema, so one can never close the `payload["..."]` it sits in.
- `$in` is an OR-chain of equalities: Milvus accepts `in [...]` only on scalar fields, not on JSON
  paths.
- `$ne` is `(not exists payload["f"] or payload["f"] != v)`: Milvus's `!=` is false where the key is
  missing (or null), SQLite's `IS NULL OR !=` is true there; this makes both match the same items.
- Number equality is numeric (`3 == 3.0`), as in SQLite.
"""

from __future__ import annotations

import math
from typing import Any

from index.config import MODALITIES
from index.errors import FilterError
from index.filters import FIELD, parse_filter

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def string_literal(value: str) -> str:
    """`value` as a Milvus string literal that reads back as exactly `value`."""
    if not isinstance(value, str):
        raise TypeError(f"not a string: {type(value).__name__}")
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


def literal(value: Any) -> str:
    """A checked filter value (bool, int, float or str) as a Milvus literal."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))  # int(...): a bool subclass or IntEnum renders as its number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise FilterError(f"{value} is not a finite number")
        return repr(float(value))
    if isinstance(value, str):
        return string_literal(value)
    raise FilterError(f"a filter value must be a string, number or bool, got {type(value).__name__}")


def _path(field: str) -> str:
    if not isinstance(field, str) or not FIELD.match(field):  # (parse_filter checked it: never splice)
        raise FilterError(f"invalid filter field {repr(field)[:80]}")
    return f'payload["{field}"]'


def compile_filter(spec: Any, schema: dict[str, str]) -> str:
    """A Milvus boolean expression for a Duet filter over a collection with payload `schema`."""
    clauses: list[str] = []
    for condition in parse_filter(spec, schema):
        path = _path(condition.field)
        values = list(dict.fromkeys(literal(v) for v in condition.values))
        if condition.op == "in":
            clauses.append("(" + " or ".join(f"{path} == {v}" for v in values) + ")")
        elif condition.op == "!=":
            clauses.append(f"(not exists {path} or {path} != {values[0]})")
        else:
            clauses.append(f"{path} {condition.op} {values[0]}")
    return " and ".join(f"({c})" for c in clauses)


def modality_clause(modality: str) -> str:
    if modality not in MODALITIES:
        raise FilterError(f"unknown modality filter {modality!r}: use text, image or vector")
    return f"modality == {string_literal(modality)}"


def ids_clause(ids: list[str]) -> str:
    """`id in [...]` over the primary key (ids validated by the caller; rendered as literals anyway)."""
    return "id in [" + ", ".join(string_literal(i) for i in ids) + "]"


def after_clause(cursor: str) -> str:
    return f"id > {string_literal(cursor)}"


def conjunction(*clauses: str | None) -> str:
    """AND of the non-empty clauses, each parenthesised; "" when there are none."""
    present = [c for c in clauses if c]
    if len(present) == 1:
        return present[0]
    return " and ".join(f"({c})" for c in present)
