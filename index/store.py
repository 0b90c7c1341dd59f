"""The durable store of one collection: SQLite in WAL mode, the source of truth.

Every acknowledged write is one committed transaction (`synchronous=FULL`), so it survives
`kill -9` and power loss. Each write takes the next operation sequence number (`seq`):
upserts stamp their rows, and replaced or deleted FAISS ids go to a tombstone table with
theirs. The FAISS index records the last `seq` it holds; on start it is replayed forward
from here, so an index snapshot can be old, missing or corrupt without losing anything.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from index.errors import PayloadError
from index.filters import FIELD, value_type
from index.items import HIT_DEFAULT, HIT_FIELDS, StoredItem
from index.payloads import dump_payload, load_payload, repair_payloads

logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    vid INTEGER NOT NULL UNIQUE,
    seq INTEGER NOT NULL,
    modality TEXT NOT NULL,
    content TEXT,
    payload TEXT NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_seq ON items(seq);
CREATE TABLE IF NOT EXISTS tombstones (vid INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(seq);
"""


@dataclass(frozen=True)
class Changes:
    """What happened after a given `seq`: FAISS ids to remove, then rows to add."""

    removed: np.ndarray
    added_vids: np.ndarray
    added_vectors: np.ndarray


_NO_VECTOR = np.empty(0, dtype=np.float32)


def _row_to_item(row: sqlite3.Row, dim: int) -> StoredItem:
    return StoredItem(
        id=row["id"],
        modality=row["modality"],
        vector=np.frombuffer(row["vector"], dtype=np.float32, count=dim)
        if "vector" in row.keys()  # noqa: SIM118 - `in` on a sqlite3.Row tests values, not names
        else _NO_VECTOR,
        payload=load_payload(row["payload"]),
        content=row["content"],
        vid=row["vid"],
    )


class CollectionStore:
    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._readers: list[sqlite3.Connection] = []  # every thread's reader, so `close` can close them all
        self._readers_lock = threading.Lock()
        self._closed = False
        self._writer = self._connect()
        self._writer.executescript(_SCHEMA)
        repair_payloads(self._writer)
        self._check_counters()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @property
    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._readers_lock:
                if self._closed:  # never reopen (a new, empty file) under a folder that is going away
                    raise sqlite3.ProgrammingError(f"store {self.path} is closed")
                conn = self._local.conn = self._connect()
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Close the writer and every thread's reader. The caller guarantees that no thread is using
        the store (the collection waits for its calls in flight): SQLite connections closed under a
        running statement can crash the process."""
        with self._readers_lock:
            self._closed = True
            readers, self._readers = self._readers, []
        for conn in readers:
            conn.close()
        self._writer.close()

    # -- metadata ------------------------------------------------------------------------

    def get_meta(self, key: str, default: Any = None, conn: sqlite3.Connection | None = None) -> Any:
        """Read a meta value; inside a write transaction pass the writer connection."""
        row = (conn or self._reader).execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self._write_lock:
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: Any) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def _check_counters(self) -> None:
        """The `seq` and `next_vid` counters must be past every row's: a lower `seq` would let a snapshot
        claim writes the store never numbered, a lower `next_vid` would reuse FAISS ids (every write then
        fails on the UNIQUE vid). Raised to what the rows prove, and logged."""
        conn = self._writer
        rows_seq, rows_vid = conn.execute(
            "SELECT MAX(m), MAX(v) FROM (SELECT MAX(seq) AS m, MAX(vid) AS v FROM items "
            "UNION ALL SELECT MAX(seq), MAX(vid) FROM tombstones)"
        ).fetchone()
        with self._write_lock:
            seq, next_vid = int(self.get_meta("seq", 0, conn)), int(self.get_meta("next_vid", 1, conn))
            if rows_seq is not None and rows_seq > seq:
                logger.warning("store %s: seq counter %d is behind its rows' %d; raised", self.path, seq, rows_seq)
                self._set_meta("seq", rows_seq)
            if rows_vid is not None and rows_vid >= next_vid:
                logger.warning("store %s: next_vid %d is not past its rows' %d; raised", self.path, next_vid, rows_vid)
                self._set_meta("next_vid", rows_vid + 1)

    @property
    def seq(self) -> int:
        return int(self.get_meta("seq", 0))

    @property
    def schema(self) -> dict[str, str]:
        return dict(self.get_meta("schema", {}))

    def count(self) -> int:
        return int(self._reader.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # -- writes --------------------------------------------------------------------------

    def upsert(self, items: list[StoredItem], max_fields: int | None = None) -> tuple[int, np.ndarray]:
        """Insert or replace items in one transaction; returns (seq, FAISS ids they replaced).
        `max_fields` bounds the distinct filterable payload fields the collection records.

        Each item gets a new FAISS id (`vid`): FAISS cannot update in place, so an upsert of an
        existing id is remove(old vid) + add(new vid), and the old vid becomes a tombstone.
        """
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                seq = self._next_seq()
                schema = dict(self.get_meta("schema", {}, conn))
                next_vid = int(self.get_meta("next_vid", 1, conn))
                replaced = []
                for item in items:
                    _merge_schema(schema, item.payload, max_fields)
                    old = conn.execute("SELECT vid FROM items WHERE id = ?", (item.id,)).fetchone()
                    if old is not None:
                        replaced.append(old["vid"])
                        conn.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", (old["vid"], seq))
                    item.vid = next_vid
                    next_vid += 1
                    conn.execute(
                        "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            item.id,
                            item.vid,
                            seq,
                            item.modality,
                            item.content,
                            dump_payload(item.payload),
                            np.ascontiguousarray(item.vector, dtype=np.float32).tobytes(),
                        ),
                    )
                self._set_meta("schema", schema)
                self._set_meta("next_vid", next_vid)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return seq, np.array(replaced, dtype=np.int64)

    def delete(self, where: str, params: list[Any]) -> tuple[int, np.ndarray, list[str]]:
        """Delete rows matching a SQL condition; returns (seq, their FAISS ids, their ids)."""
        with self._write_lock:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(f"SELECT id, vid FROM items WHERE {where}", params).fetchall()
                seq = self._next_seq() if rows else int(self.get_meta("seq", 0, conn))
                for row in rows:
                    conn.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", (row["vid"], seq))
                if rows:
                    conn.execute(f"DELETE FROM items WHERE {where}", params)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return seq, np.array([r["vid"] for r in rows], dtype=np.int64), [r["id"] for r in rows]

    def _next_seq(self) -> int:
        seq = int(self.get_meta("seq", 0, self._writer)) + 1
        self._set_meta("seq", seq)
        return seq

    def prune_tombstones(self, up_to_seq: int) -> None:
        """Tombstones at or before a snapshot's seq are in the snapshot already."""
        with self._write_lock:
            self._writer.execute("DELETE FROM tombstones WHERE seq <= ?", (up_to_seq,))

    # -- reads ---------------------------------------------------------------------------

    def get(self, item_id: str) -> StoredItem | None:
        row = self._reader.execute("SELECT * FROM items WHERE id = ?", (item_id,)).fetchone()
        return _row_to_item(row, self.dim) if row else None

    def page(self, after: str | None, limit: int, where: str | None, params: list[Any]) -> list[StoredItem]:
        """Items in id order after the cursor `after` (cursor pagination, stable under writes)."""
        clauses, args = [], []
        if after is not None:
            clauses.append("id > ?")
            args.append(after)
        if where:
            clauses.append(f"({where})")
            args.extend(params)
        sql = "SELECT * FROM items" + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        rows = self._reader.execute(f"{sql} ORDER BY id LIMIT ?", [*args, limit]).fetchall()
        return [_row_to_item(r, self.dim) for r in rows]

    def count_without_content(self) -> int:
        """Items stored as bare vectors: nothing to re-embed them from."""
        return int(self._reader.execute("SELECT COUNT(*) FROM items WHERE content IS NULL").fetchone()[0])

    def iter_contents(self, batch: int) -> Iterator[list[StoredItem]]:
        """Every item without its vector (id, modality, content, payload), in id order, `batch` at a time."""
        after = ""
        while True:
            rows = self._reader.execute(
                "SELECT id, vid, modality, content, payload FROM items WHERE id > ? ORDER BY id LIMIT ?",
                (after, batch),
            ).fetchall()
            if not rows:
                return
            yield [_row_to_item(r, self.dim) for r in rows]
            after = rows[-1]["id"]

    def matching_vids(self, where: str, params: list[Any]) -> np.ndarray:
        rows = self._reader.execute(f"SELECT vid FROM items WHERE {where}", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def by_vids(self, vids: list[int], with_vectors: bool = True) -> dict[int, StoredItem]:
        """Rows by FAISS id; search results skip the vectors (1.5 KB each at 384-d)."""
        columns = "*" if with_vectors else "id, vid, modality, content, payload"
        found: dict[int, StoredItem] = {}
        for start in range(0, len(vids), 500):
            chunk = vids[start : start + 500]
            rows = self._reader.execute(
                f"SELECT {columns} FROM items WHERE vid IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update((r["vid"], _row_to_item(r, self.dim)) for r in rows)
        return found

    def hit_rows(self, vids: np.ndarray, include: Collection[str] = HIT_DEFAULT) -> dict[int, StoredItem]:
        """Rows of search hits by FAISS id: every hit of every query of a request in one statement, and only
        the columns asked for (`HIT_FIELDS`; id, vid and modality always). A 256-query batch of top-10 is
        2,560 rows: `by_vids` took 6 statements of 500 placeholders, sqlite3.Row lookups by name and
        payloads decoded even when the caller then dropped them. Ids < 0 (FAISS's padding) are skipped."""
        unique = np.unique(np.asarray(vids, dtype=np.int64))
        wanted = unique[unique >= 0]
        if not len(wanted):
            return {}
        extra = [field for field in HIT_FIELDS if field in include]
        columns = ", ".join(["id", "vid", "modality", *extra])
        cursor = self._reader.cursor()
        cursor.row_factory = None  # plain tuples: a Row's lookups by name cost more than the rest of the row
        rows = cursor.execute(
            f"SELECT {columns} FROM items WHERE vid IN (SELECT value FROM json_each(?))",
            (orjson.dumps(wanted, option=orjson.OPT_SERIALIZE_NUMPY),),
        ).fetchall()
        at = {field: 3 + i for i, field in enumerate(extra)}  # column of each included field, once per call
        payload, content, vector = at.get("payload"), at.get("content"), at.get("vector")
        return {
            row[1]: StoredItem(
                id=row[0],
                modality=row[2],
                vector=_NO_VECTOR if vector is None else np.frombuffer(row[vector], dtype=np.float32, count=self.dim),
                payload={} if payload is None else load_payload(row[payload]),
                content=None if content is None else row[content],
                vid=row[1],
            )
            for row in rows
        }

    def iter_vectors(
        self, batch: int = 10_000, after_seq: int = 0
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[str]]]:
        """(vids, vectors, modalities) chunks of every live row written after `after_seq`."""
        last = 0
        while True:
            rows = self._reader.execute(
                "SELECT vid, vector, modality FROM items WHERE seq > ? AND vid > ? ORDER BY vid LIMIT ?",
                (after_seq, last, batch),
            ).fetchall()
            if not rows:
                return
            vids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
            yield vids, vectors, [r[2] for r in rows]
            last = int(vids[-1])

    def names(self, batch: int = 50_000) -> Iterator[tuple[int, str, str]]:
        """(vid, id, modality) of every live row, in vid order: what `HitNames` holds in memory."""
        last = 0
        while True:
            cursor = self._reader.cursor()
            cursor.row_factory = None
            rows = cursor.execute(
                "SELECT vid, id, modality FROM items WHERE vid > ? ORDER BY vid LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            yield from rows
            last = int(rows[-1][0])

    def tombstones_after(self, seq: int) -> np.ndarray:
        rows = self._reader.execute("SELECT vid FROM tombstones WHERE seq > ?", (seq,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def sample_vectors(self, n: int) -> np.ndarray:
        """`n` stored vectors at random; all of them in storage order when `n` covers the store, so
        an index trained on a small collection comes out the same every time (k-means seeds from
        the sample's order)."""
        total = self._reader.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        order = "rowid" if n >= total else "random()"
        rows = self._reader.execute(f"SELECT vector FROM items ORDER BY {order} LIMIT ?", (n,)).fetchall()
        if not rows:
            return np.empty((0, self.dim), np.float32)
        return np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)

    def modality_counts(self) -> dict[str, int]:
        rows = self._reader.execute("SELECT modality, COUNT(*) FROM items GROUP BY modality").fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def modality_sums(self) -> dict[str, tuple[np.ndarray, int]]:
        """Per-modality sum of vectors and count, for centroids (modality gap)."""
        sums: dict[str, tuple[np.ndarray, int]] = {}
        for modality in ("text", "image", "vector"):
            total = np.zeros(self.dim, dtype=np.float64)
            count = 0
            cursor = self._reader.execute("SELECT vector FROM items WHERE modality = ?", (modality,))
            while rows := cursor.fetchmany(10_000):
                block = np.frombuffer(b"".join(r[0] for r in rows), dtype=np.float32).reshape(len(rows), self.dim)
                total += block.sum(axis=0)
                count += len(rows)
            if count:
                sums[modality] = (total, count)
        return sums


def _merge_schema(schema: dict[str, str], payload: dict[str, Any], max_fields: int | None = None) -> None:
    """Record the type of each top-level scalar field; refuse a field that changes type, and a new
    field past `max_fields` (the schema is read and written by every upsert, and listed by GET)."""
    for key, value in payload.items():
        kind = value_type(value)
        if kind is None or not FIELD.match(key):
            continue  # nested values and odd keys are stored, just not filterable
        known = schema.get(key)
        if known is None:
            if max_fields is not None and len(schema) >= max_fields:
                raise PayloadError(
                    f"payload field '{key}' would be new, and this collection already has {len(schema)} filterable "
                    f"fields (at most {max_fields}); reuse existing fields or nest free-form data in an object"
                )
            schema[key] = kind
        elif known != kind:
            raise PayloadError(
                f"payload field '{key}' is a {known} in this collection; got a {kind} ({repr(value)[:80]})"
            )
