"""Payload filters: the language, checked once here (`parse_filter`), then rendered by each backend:
SQL over the faiss backend's store (`compile_filter`, below) or a Milvus expression
(`index.milvus.expressions`). Either way they apply *before* ranking.

Grammar (all conditions AND-ed):
    {"field": value}                      equality (string, number or bool)
    {"field": {"$in": [v1, v2, ...]}}     membership
    {"field": {"$gt"|"$gte"|"$lt"|"$lte": number, ...}}   ranges (numbers only)
    {"field": {"$ne": value}}             inequality
Fields are top-level payload keys whose type the collection has seen ("number", "string",
"bool"); filtering on a field it has never seen, or with a value of another type, is an
error that names the known fields, never an empty result that hides the typo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from index.errors import FilterError
from index.payloads import not_utf8, number_problem

FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}\Z")  # \Z: $ would also match before a final newline
RangeOp = Literal[">", ">=", "<", "<="]
_RANGE_OPS: dict[str, RangeOp] = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
MAX_IN = 10_000
MAX_LISTED_FIELDS = 20  # an error lists at most this many known fields (a collection may have hundreds)


def value_type(value: Any) -> str | None:
    """The filterable type of a payload value, or None for values that are not filterable."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return None


def _column(field: str) -> str:
    return f"json_extract(payload, '$.\"{field}\"')"


def _sql_value(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value  # SQLite's JSON stores bools as 0/1


def _check_value(field: str, expected: str, value: Any) -> Any:
    """`value` itself, if it is a filterable value of the field's type (else FilterError)."""
    actual = value_type(value)
    if actual != expected:
        raise FilterError(f"filter on '{field}' expects a {expected}, got {type(value).__name__} {repr(value)[:80]}")
    if actual == "string" and not_utf8(value):
        raise FilterError(f"filter on '{field}': a string with a lone surrogate (not valid UTF-8)")
    problem = number_problem(value) if actual == "number" else None
    if problem:  # SQLite would raise OverflowError, or compare against NaN
        raise FilterError(f"filter on '{field}': {problem}")
    return value


@dataclass(frozen=True)
class Condition:
    """One checked condition of a filter: `field op value(s)`. Each backend renders these (SQL here,
    Milvus expressions in index.milvus.expressions), so the language and its refusals live once."""

    field: str
    op: Literal["==", "!=", "in", ">", ">=", "<", "<="]
    values: tuple[Any, ...]  # one value; several for "in" (checked against the field's type)


def parse_filter(spec: Any, schema: dict[str, str]) -> list[Condition]:
    """The conditions of a filter (all AND-ed), checked against the collection's payload `schema`."""
    if not isinstance(spec, dict) or not spec:
        raise FilterError('filter must be a non-empty object like {"field": value}')
    conditions: list[Condition] = []
    for field, condition in spec.items():
        if not isinstance(field, str) or not FIELD.match(field):
            raise FilterError(f"invalid filter field {repr(field)[:80]}")
        if field not in schema:
            raise FilterError(f"unknown filter field '{field}' (filterable fields: {known_fields(schema)})")
        expected = schema[field]
        if not isinstance(condition, dict):
            conditions.append(Condition(field, "==", (_check_value(field, expected, condition),)))
            continue
        if not condition:
            raise FilterError(f"filter on '{field}' has an empty condition")
        for op, operand in condition.items():
            if op in _RANGE_OPS:
                if expected != "number":
                    raise FilterError(f"range operator {op} needs a number field; '{field}' is a {expected}")
                conditions.append(Condition(field, _RANGE_OPS[op], (_check_value(field, expected, operand),)))
            elif op == "$in":
                if not isinstance(operand, list) or not operand or len(operand) > MAX_IN:
                    raise FilterError(f"$in on '{field}' needs a list of 1 to {MAX_IN} values")
                conditions.append(Condition(field, "in", tuple(_check_value(field, expected, v) for v in operand)))
            elif op == "$ne":
                conditions.append(Condition(field, "!=", (_check_value(field, expected, operand),)))
            elif op == "$eq":
                conditions.append(Condition(field, "==", (_check_value(field, expected, operand),)))
            else:
                raise FilterError(f"unknown filter operator {repr(op)[:80]} (use $eq, $ne, $in, $gt, $gte, $lt, $lte)")
    return conditions


def known_fields(schema: dict[str, str]) -> str:
    """The schema's fields for an error message, at most MAX_LISTED_FIELDS of them."""
    names = sorted(schema)
    if not names:
        return "none yet"
    listed = ", ".join(names[:MAX_LISTED_FIELDS])
    more = len(names) - MAX_LISTED_FIELDS
    return f"{listed} and {more} more (GET the collection for all)" if more > 0 else listed


def compile_filter(spec: Any, schema: dict[str, str]) -> tuple[str, list[Any]]:
    """Return a SQL boolean expression over the `payload` column and its parameters."""
    clauses: list[str] = []
    params: list[Any] = []
    for condition in parse_filter(spec, schema):
        column = _column(condition.field)
        values = [_sql_value(v) for v in condition.values]
        if condition.op == "in":
            clauses.append(f"{column} IN ({','.join('?' * len(values))})")
        elif condition.op == "!=":
            clauses.append(f"({column} IS NULL OR {column} != ?)")
        elif condition.op == "==":
            clauses.append(f"{column} = ?")
        else:
            clauses.append(f"{column} {condition.op} ?")
        params.extend(values)
    return " AND ".join(clauses), params
