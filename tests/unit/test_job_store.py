"""Both job stores (embedded SQLite, distributed Redis) follow the same rules: one test
suite, run against each; the Redis one is a real redis-server of the tests' own."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from jobs.records import (
    InvalidTransitionError,
    JobNotFoundError,
    JobRecord,
    JobState,
    StoreUnavailableError,
    new_job_id,
)
from jobs.redis_store import RedisJobStore
from jobs.sqlite_store import SqliteJobStore
from jobs.store import JobStore
from tests.redis_server import RedisServer

CONFIG = {"base_model": "minilm", "train": [{"path": "a.jsonl"}], "output": {"name": "m"}}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        made: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")
        made = RedisJobStore(server.url, prefix=f"t{tmp_path.name}")
    yield made
    made.close()


def job(key: str | None = None) -> JobRecord:
    return JobRecord(id=new_job_id(), config=CONFIG, idempotency_key=key)


def kinds(store: JobStore, job_id: str) -> list[tuple[str, dict]]:
    return [(e.type, e.data) for e in store.events_after(job_id, 0)]


def test_create_queues_and_records_an_event(store):
    record, created = store.create(job())
    assert created and record.state is JobState.queued
    assert store.get(record.id).state is JobState.queued
    assert kinds(store, record.id) == [("state", {"state": "queued"})]
    assert [r.id for r in store.list()] == [record.id]


def test_idempotency_key_returns_the_same_job(store):
    first, created = store.create(job("retry-1"))
    again, created_again = store.create(job("retry-1"))
    assert created and not created_again
    assert again.id == first.id
    assert len(store.list()) == 1
    claimed = store.claim("w")
    assert claimed.id == first.id and store.claim("w") is None  # queued once, not twice


def test_claim_is_fifo_and_marks_running(store):
    a, _ = store.create(job())
    b, _ = store.create(job())
    first = store.claim("w1")
    assert first.id == a.id and first.state is JobState.running and first.worker == "w1"
    assert store.claim("w2").id == b.id
    assert store.claim("w3") is None
    assert sorted(store.running_ids()) == sorted([a.id, b.id])


def test_concurrent_claims_never_share_a_job(store):
    ids = {store.create(job())[0].id for _ in range(30)}
    got: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        while (record := store.claim(name)) is not None:
            with lock:
                got.append(record.id)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(ids)  # each exactly once


def test_finish_is_once_and_ends_the_event_stream(store):
    record, _ = store.create(job())
    store.claim("w")
    store.update(record.id, events=[("progress", {"step": 3})], progress={"step": 3, "max_steps": 10})
    done = store.finish(record.id, JobState.succeeded, worker="w", result={"model": "m/2"})
    assert done.state is JobState.succeeded and done.result.model == "m/2" and done.progress.step == 3
    assert [k for k, _ in kinds(store, record.id)] == ["state", "state", "progress", "state", "end"]
    with pytest.raises(InvalidTransitionError):
        store.finish(record.id, JobState.failed, worker="w")


def test_a_late_worker_cannot_overwrite_a_reaped_job(store):
    record, _ = store.create(job())
    store.claim("w")
    assert store.fail_stale(timeout_s=10, now=store.get(record.id).heartbeat_at + 11) == [record.id]
    failed = store.get(record.id)
    assert failed.state is JobState.failed and failed.resumable and "stopped sending heartbeats" in failed.error
    with pytest.raises(InvalidTransitionError):
        store.finish(record.id, JobState.succeeded, worker="w")


def test_fresh_heartbeats_keep_a_job_running(store):
    record, _ = store.create(job())
    claimed = store.claim("w")
    assert store.fail_stale(timeout_s=10, now=claimed.heartbeat_at + 5) == []
    assert store.get(record.id).state is JobState.running


def test_cancel_queued_job_removes_it_from_the_queue(store):
    record, _ = store.create(job())
    cancelled = store.request_cancel(record.id)
    assert cancelled.state is JobState.cancelled
    assert store.claim("w") is None


def test_cancel_running_job_flags_it(store):
    record, _ = store.create(job())
    store.claim("w")
    flagged = store.request_cancel(record.id)
    assert flagged.state is JobState.running and flagged.cancel_requested
    store.finish(record.id, JobState.cancelled, worker="w", error="cancelled at step 4", resumable=True)
    with pytest.raises(InvalidTransitionError):
        store.request_cancel(record.id)


def test_resume_requeues_a_failed_job_with_the_next_attempt(store):
    record, _ = store.create(job())
    store.claim("w")
    store.finish(record.id, JobState.failed, worker="w", error="boom", resumable=True)
    resumed = store.resume(record.id)
    assert resumed.state is JobState.queued and resumed.attempt == 2 and resumed.error is None
    again = store.claim("w2")
    assert again.id == record.id and again.attempt == 2


def test_resume_refuses_succeeded_and_unresumable_jobs(store):
    done, _ = store.create(job())
    store.claim("w")
    store.finish(done.id, JobState.succeeded, worker="w")
    with pytest.raises(InvalidTransitionError):
        store.resume(done.id)
    bad, _ = store.create(job())
    store.claim("w")
    store.finish(bad.id, JobState.failed, worker="w", error="dataset missing", resumable=False)
    with pytest.raises(InvalidTransitionError):
        store.resume(bad.id)


def test_unknown_job(store):
    with pytest.raises(JobNotFoundError):
        store.get("job_nope")
    with pytest.raises(JobNotFoundError):
        store.events_after("job_nope", 0)
    with pytest.raises(JobNotFoundError):
        store.request_cancel("job_nope")


def test_events_after_and_list_by_state(store):
    a, _ = store.create(job())
    b, _ = store.create(job())
    store.claim("w")
    assert [e.seq for e in store.events_after(a.id, 1)] == [2]
    assert [r.id for r in store.list(state=JobState.queued)] == [b.id]
    assert [r.id for r in store.list(state=JobState.running)] == [a.id]
    assert [r.id for r in store.list(limit=1)] == [b.id]  # newest first


def test_records_survive_a_redis_restart(tmp_path):
    server = RedisServer(tmp_path / "r").start()
    try:
        store = RedisJobStore(server.url)
        record, _ = store.create(job())
        store.claim("w")
        server.restart()
        again = RedisJobStore(server.url)
        assert again.get(record.id).state is JobState.running
        assert [e.type for e in again.events_after(record.id, 0)] == ["state", "state"]
    finally:
        server.stop()


def test_redis_away_is_store_unavailable(tmp_path):
    server = RedisServer(tmp_path / "r").start()
    store = RedisJobStore(server.url, timeout_s=1)
    record, _ = store.create(job())
    server.stop()
    with pytest.raises(StoreUnavailableError, match="unreachable"):
        store.get(record.id)
    server.start()
    assert store.get(record.id).id == record.id  # reconnects on its own
    server.stop()
