"""The worker's heartbeat does not depend on what its job loop is waiting for: a training
process that is slow to start or to exit must not make a healthy job look dead. Also what
the relay keeps in the record (learning rate; no stage once the job is over)."""

from __future__ import annotations

import time
from pathlib import Path

from jobs import child
from jobs.records import JobRecord, JobState, new_job_id
from jobs.sqlite_store import SqliteJobStore
from jobs.worker import Relay, Worker, WorkerOptions

CONFIG = {"base_model": "minilm", "train": [{"path": "a.jsonl"}], "output": {"name": "m"}}


def slow_child(spec, conn, cancel) -> None:
    """A training process that takes long to start and long to exit (a loaded machine, CUDA
    teardown), with the job loop waiting on it both times."""
    time.sleep(1.5)
    conn.send(("event", {"event": "stage", "stage": "training"}))
    conn.send(("event", {"event": "progress", "step": 1, "max_steps": 1, "learning_rate": 0.5, "loss": 1.0}))
    conn.send(("succeeded", {"model": "m/1"}))
    conn.close()
    time.sleep(3.0)


def test_heartbeats_continue_while_the_training_process_starts_and_exits(tmp_path, monkeypatch):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    beats: list[float] = []
    update = store.worker_update

    def recording_update(*args, **fields):
        if "heartbeat_at" in fields:
            beats.append(time.monotonic())
        return update(*args, **fields)

    monkeypatch.setattr(store, "worker_update", recording_update)
    monkeypatch.setattr(child, "main", slow_child)  # pickled by name: the spawned process runs it too
    options = WorkerOptions(data_dir=tmp_path, registry_dir=tmp_path / "registry", name="w1", heartbeat_seconds=0.3)
    store.create(JobRecord(id=new_job_id(), config=CONFIG))
    record = store.claim("w1")
    claimed = time.monotonic()
    Worker(store, options).run_job(record)
    finished = time.monotonic()

    done = store.get(record.id)
    assert done.state is JobState.succeeded, done.error
    gaps = [b - a for a, b in zip([claimed, *beats], [*beats, finished])]
    assert max(gaps) < 1.2, [round(g, 2) for g in gaps]  # the process's 3 s exit did not stop them
    assert done.progress.learning_rate == 0.5 and done.progress.step == 1
    assert done.progress.stage is None  # the job is over: no stage is running
    store.close()


def test_relay_keeps_what_arrives_while_a_write_fails(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(JobRecord(id=new_job_id(), config=CONFIG))
    record = store.claim("w1")
    relay = Relay(store, record, "w1")
    relay.add({"event": "stage", "stage": "training"})
    relay.add({"event": "progress", "step": 3, "learning_rate": 1e-4})
    saved = relay.flush()
    assert saved is not None and saved.progress.stage == "training" and saved.progress.learning_rate == 1e-4
    assert [e.type for e in store.events_after(record.id, 0)][-2:] == ["stage", "progress"]
    assert not relay.pending
    store.close()


def test_child_failures_keep_input_errors_short_and_without_traceback(tmp_path: Path):
    from trainer.tables import RowError

    reason = child.failure(RowError("abc/d.csv:2: " + "x" * 10_000), tmp_path)
    assert reason["traceback"] is None and reason["resumable"] is False
    assert len(reason["error"]) < 2100
    assert child.failure(RuntimeError("boom"), tmp_path)["traceback"]
    lost = FileNotFoundError(2, "No such file or directory", str(tmp_path / "datasets" / "abc" / "x.png"))
    reason = child.failure(lost, tmp_path / "jobs" / "j1", data_dir=tmp_path)
    assert str(tmp_path) not in reason["error"] + reason["traceback"]
    assert "'<data dir>/datasets/abc/x.png'" in reason["error"]
