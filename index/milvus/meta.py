"""What the milvus backend keeps about its collections, in Milvus itself: the `{prefix}__meta`
collection, shared by every API replica (no shared disk, no cache that could go stale).

One row per fact, keyed so that replicas writing different facts never overwrite each other:
- `config:<name>`          the collection's `CollectionConfig` (its generation says which physical
                           collection holds it); written last by a create, deleted first by a drop.
- `field:<name>:<field>`   one filterable payload field and its type (one row each: two replicas
                           adding different fields at once both land).
- `reembed:<name>`         the collection's last re-embed: its progress, the freeze time, and a
                           heartbeat; while running (and its heartbeat fresh) writes are refused.
- `retired:<name>:<gen>`   a generation replaced by a re-embed, dropped after a grace.
Milvus requires a vector field; each row has a constant 2-d dummy vector.
"""

from __future__ import annotations

import threading
from typing import Any

from index.milvus import names
from index.milvus.client import MilvusConnection
from index.milvus.expressions import string_literal

META_FIELDS = ["key", "name", "kind", "value"]


def _as_dict(value: Any) -> dict[str, Any]:
    """A row's value; one that is not a JSON object (garbage written by hand or by another version) reads
    as {}, which every reader treats as unreadable, never as a crash."""
    return dict(value) if isinstance(value, dict) else {}


class Meta:
    def __init__(self, conn: MilvusConnection, prefix: str) -> None:
        self.conn = conn
        self.collection = names.meta(prefix)
        self._ready = False
        self._lock = threading.Lock()

    def ensure(self) -> None:
        """Create the meta collection if no replica has yet (once per process, after it is seen)."""
        if self._ready:
            return
        with self._lock:
            if self._ready:
                return
            if not self.conn.call("has_collection", self.collection):
                from pymilvus import DataType, MilvusClient

                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=1024)
                schema.add_field("name", DataType.VARCHAR, max_length=256)
                schema.add_field("kind", DataType.VARCHAR, max_length=32)
                schema.add_field("value", DataType.JSON)
                schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)
                index = MilvusClient.prepare_index_params()
                index.add_index("vector", index_type="FLAT", metric_type="L2")
                try:
                    self.conn.call(
                        "create_collection",
                        self.collection,
                        schema=schema,
                        index_params=index,
                        consistency_level="Strong",
                    )
                except Exception as exc:
                    if "exist" not in str(exc).lower():  # another replica made it first
                        raise
            self.conn.call("load_collection", self.collection)
            self._ready = True

    def get(self, key: str) -> dict[str, Any] | None:
        self.ensure()
        rows = self.conn.call(
            "query",
            self.collection,
            filter=f"key == {string_literal(key)}",
            output_fields=["value"],
            limit=1,
            consistency_level="Strong",
        )
        return _as_dict(rows[0]["value"]) if rows else None

    def get_many(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """{key: value} of those of `keys` that have a row, in one query."""
        self.ensure()
        rows = self.conn.call(
            "query",
            self.collection,
            filter="key in [" + ", ".join(string_literal(k) for k in keys) + "]",
            output_fields=["key", "value"],
            limit=len(keys),
            consistency_level="Strong",
        )
        return {row["key"]: _as_dict(row["value"]) for row in rows}

    def rows(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        """Every row of `kind` (of collection `name`, if given): dicts with key, name, kind, value."""
        self.ensure()
        expr = f"kind == {string_literal(kind)}"
        if name is not None:
            expr += f" and name == {string_literal(name)}"
        out: list[dict[str, Any]] = []
        for batch in self.conn.iterate(self.collection, expr, META_FIELDS, pk="key"):
            out.extend(batch)
        return out

    def put(self, key: str, name: str, kind: str, value: dict[str, Any]) -> None:
        self.put_many([(key, name, kind, value)])

    def put_many(self, rows: list[tuple[str, str, str, dict[str, Any]]]) -> None:
        if not rows:
            return
        self.ensure()
        data = [
            {"key": key, "name": name, "kind": kind, "value": value, "vector": [1.0, 0.0]}
            for key, name, kind, value in rows
        ]
        self.conn.call("upsert", self.collection, data)

    def delete(self, keys: list[str]) -> None:
        if keys:
            self.ensure()
            self.conn.call(
                "delete", self.collection, filter="key in [" + ", ".join(string_literal(k) for k in keys) + "]"
            )

    def delete_collection(self, name: str) -> None:
        """Every row about collection `name`."""
        self.ensure()
        self.conn.call("delete", self.collection, filter=f"name == {string_literal(name)}")
