"""Item payloads: what a payload may hold, how it is written to the store and read back.

A payload is stored as JSON text and filtered with SQLite's JSON functions, so it must be
strict JSON: Python's `json` (and pydantic) accept `NaN` and `Infinity`, SQLite does not, and
one such row made every filtered query over the collection fail ("malformed JSON"). Integers
must fit SQLite's int64 (beyond it `json_extract` silently turns them into lossy reals).
These rules hold for every write. The size limits (fields, bytes, key length, fields per
collection) are the service's settings; they keep a caller from growing a collection's schema,
which every upsert reads and writes, without bound.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from dataclasses import dataclass
from typing import Any

import orjson

from index.errors import PayloadError

logger = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # levels of objects and lists in one payload, itself included
_REPAIRED_META = "payloads_strict_json"


@dataclass(frozen=True)
class PayloadLimits:
    """Size limits of payloads; `None` where a write is not limited (copies of stored items)."""

    max_fields: int = 64  # top-level keys of one payload
    max_bytes: int = 64 * 1024  # one payload, as compact JSON
    max_key_chars: int = 128  # any key, nested ones too
    max_collection_fields: int = 256  # distinct filterable fields a collection records


def number_problem(value: int | float) -> str | None:
    """Why a JSON number cannot be stored or compared in SQLite, or None if it can."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{value} is not a finite number (JSON has no NaN or Infinity)"
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        return f"{value} is outside the 64-bit integer range [-2^63, 2^63 - 1]"
    return None


def not_utf8(text: str) -> bool:
    """A str SQLite cannot store: a lone surrogate (a JSON "\\ud800" parsed by Python's json)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_payload(payload: Any, limits: PayloadLimits | None, label: str = "payload") -> None:
    """Refuse a payload SQLite's JSON functions could not read, or one past the limits,
    with a PayloadError naming the offending field (`label.a.b[2]`)."""
    if not isinstance(payload, dict):
        raise PayloadError(f"{label} must be a JSON object, got {type(payload).__name__}")
    if limits is not None and len(payload) > limits.max_fields:
        raise PayloadError(f"{label} has {len(payload)} fields; at most {limits.max_fields} are allowed")
    _check_value(payload, label, 0, limits)
    if limits is not None:
        size = len(orjson.dumps(payload))
        if size > limits.max_bytes:
            raise PayloadError(f"{label} is {size} bytes as JSON; at most {limits.max_bytes} are allowed")


def _check_value(value: Any, path: str, depth: int, limits: PayloadLimits | None) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, str):
        if not_utf8(value):
            raise PayloadError(f"{_short(path)}: a string with a lone surrogate (not valid UTF-8)")
        return
    if isinstance(value, (int, float)):
        problem = number_problem(value)
        if problem:
            raise PayloadError(f"{_short(path)}: {problem}")
        return
    if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
        raise PayloadError(f"{_short(path)}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, child in value.items():
            if not isinstance(key, str) or not_utf8(key):
                raise PayloadError(f"{_short(path)}: keys must be UTF-8 strings, got {key!r}")
            if limits is not None and len(key) > limits.max_key_chars:
                raise PayloadError(
                    f"{_short(path)}: key '{key[:40]}...' is {len(key)} characters; at most {limits.max_key_chars}"
                )
            _check_value(child, f"{path}.{key}", depth + 1, limits)
    elif isinstance(value, list):
        for i, child in enumerate(value):
            _check_value(child, f"{path}[{i}]", depth + 1, limits)
    else:
        raise PayloadError(f"{_short(path)}: {type(value).__name__} is not a JSON value")


def _short(path: str) -> str:
    return path if len(path) <= 200 else f"{path[:90]}...{path[-90:]}"


def dump_payload(payload: dict[str, Any]) -> str:
    """Strict, compact JSON for the store (a last guard: `check_payload` names the field first)."""
    try:
        return json.dumps(payload, separators=(",", ":"), allow_nan=False)
    except ValueError as exc:  # NaN or Infinity
        raise PayloadError(f"payload is not strict JSON: {exc}") from None


def load_payload(text: str | bytes) -> dict[str, Any]:
    """A stored payload. Rows written before payloads were checked may hold NaN/Infinity: they
    read back with those values as null rather than failing the whole request."""
    try:
        payload: dict[str, Any] = orjson.loads(text)  # 3-4x faster than json.loads: search results parse many
        return payload
    except orjson.JSONDecodeError:
        return _lenient_loads(text)


def _lenient_loads(text: str | bytes) -> dict[str, Any]:
    try:
        loaded = json.loads(text, parse_constant=lambda _: None)
    except ValueError:
        logger.warning("unreadable stored payload %r; served as {}", text[:80])
        return {}
    return loaded if isinstance(loaded, dict) else {}


def repair_payloads(conn: sqlite3.Connection) -> int:
    """Rewrite stored payloads that SQLite cannot parse (NaN/Infinity from before writes were
    checked) with those values as null, once per store; returns how many were rewritten."""
    done = conn.execute("SELECT 1 FROM meta WHERE key = ?", (_REPAIRED_META,)).fetchone()
    if done is not None:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute("SELECT id, payload FROM items WHERE NOT json_valid(payload)").fetchall()
        for item_id, text in rows:
            conn.execute("UPDATE items SET payload = ? WHERE id = ?", (dump_payload(_lenient_loads(text)), item_id))
        conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_REPAIRED_META, "true"))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if rows:
        logger.warning("rewrote %d stored payloads holding NaN or Infinity (now null)", len(rows))
    return len(rows)
