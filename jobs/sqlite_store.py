"""The embedded job store: one SQLite file under the data dir (WAL, synchronous=FULL).

`duet serve` and its local worker process share it, so jobs work on a fresh machine with no
server to run; every modification is one `BEGIN IMMEDIATE` transaction, which serialises
writers across processes. The queue is the set of rows with a queue position, in order.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from jobs.records import JobNotFoundError, JobRecord, JobState
from jobs.store import Change, JobEvent, JobStore, Modifier, apply_change

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    idempotency_key TEXT UNIQUE,
    queue_pos INTEGER,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs(queue_pos) WHERE queue_pos IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    time REAL NOT NULL,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SqliteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- primitives ----------------------------------------------------------------------------

    def _transaction(self) -> sqlite3.Connection:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        return db

    def _write_events(self, db: sqlite3.Connection, job_id: str, events: list[JobEvent]) -> None:
        db.executemany(
            "INSERT INTO events (job_id, seq, type, data, time) VALUES (?, ?, ?, ?, ?)",
            [(job_id, e.seq, e.type, json.dumps(e.data), e.time) for e in events],
        )

    def _next_position(self, db: sqlite3.Connection) -> int:
        row = db.execute(
            "INSERT INTO counters (name, value) VALUES ('queue', 1) "
            "ON CONFLICT(name) DO UPDATE SET value = value + 1 RETURNING value"
        ).fetchone()
        return int(row[0])

    def _insert(self, record: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> JobRecord | None:
        db = self._transaction()
        try:
            if record.idempotency_key is not None:
                row = db.execute(
                    "SELECT record FROM jobs WHERE idempotency_key = ?", (record.idempotency_key,)
                ).fetchone()
                if row is not None:
                    db.execute("ROLLBACK")
                    return JobRecord.model_validate_json(row["record"])
            new_events = apply_change(record, Change(events=events), time.time())
            db.execute(
                "INSERT INTO jobs (id, state, created_at, idempotency_key, queue_pos, record) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.state.value,
                    record.created_at,
                    record.idempotency_key,
                    self._next_position(db),
                    record.model_dump_json(),
                ),
            )
            self._write_events(db, record.id, new_events)
            db.execute("COMMIT")
            return None
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _modify(self, job_id: str, modify: Modifier) -> JobRecord:
        db = self._transaction()
        try:
            row = db.execute("SELECT record, queue_pos FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFoundError(f"no job {job_id!r}")
            record = JobRecord.model_validate_json(row["record"])
            change = modify(record)
            if change is None:
                db.execute("ROLLBACK")
                return record
            events = apply_change(record, change, time.time())
            position = row["queue_pos"]
            if change.enqueue:
                position = self._next_position(db)
            elif change.dequeue:
                position = None
            db.execute(
                "UPDATE jobs SET state = ?, queue_pos = ?, record = ? WHERE id = ?",
                (record.state.value, position, record.model_dump_json(), job_id),
            )
            self._write_events(db, job_id, events)
            db.execute("COMMIT")
            return record
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _head_of_queue(self) -> str | None:
        row = (
            self._connect()
            .execute("SELECT id FROM jobs WHERE queue_pos IS NOT NULL ORDER BY queue_pos LIMIT 1")
            .fetchone()
        )
        return None if row is None else str(row["id"])

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        row = self._connect().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return JobRecord.model_validate_json(row["record"])

    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        query = "SELECT record FROM jobs"
        args: builtins.list[str | int] = []
        if state is not None:
            query += " WHERE state = ?"
            args.append(state.value)
        query += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        return [JobRecord.model_validate_json(r["record"]) for r in self._connect().execute(query, args)]

    def events_after(self, job_id: str, after: int) -> builtins.list[JobEvent]:
        self.get(job_id)  # JobNotFoundError for an unknown id
        rows = self._connect().execute(
            "SELECT seq, type, data, time FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, after)
        )
        return [JobEvent(r["seq"], r["type"], json.loads(r["data"]), r["time"]) for r in rows]

    def running_ids(self) -> builtins.list[str]:
        rows = self._connect().execute("SELECT id FROM jobs WHERE state = ?", (JobState.running.value,))
        return [r["id"] for r in rows]

    def count_by_state(self) -> dict[JobState, int]:
        rows = self._connect().execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        counts = {state: 0 for state in JobState}
        counts.update({JobState(r["state"]): int(r["n"]) for r in rows})
        return counts

    def ping(self) -> None:
        self._connect().execute("SELECT 1")
