"""The job store: records, their events and the queue, behind one interface.

Two backends share every rule written here: `SqliteJobStore` (embedded: a file under the
data dir, used by `duet serve` and its local worker with no server to run) and
`RedisJobStore` (distributed: any number of `duet worker`s on any machines). A backend only
provides atomic primitives (insert, read-modify-write of one record together with its new
events and queue moves, pop the next queued id, read events); the state machine, the
idempotency rule, cancel, resume and the stale-heartbeat reaper live in this base class, so
the two cannot drift apart.
"""

from __future__ import annotations

import builtins
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from jobs.records import InvalidTransitionError, JobNotFoundError, JobRecord, JobState, can_move


@dataclass(frozen=True)
class JobEvent:
    seq: int
    type: str
    data: dict[str, Any]
    time: float


@dataclass
class Change:
    """What one atomic modification does besides rewriting the record."""

    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    enqueue: bool = False
    dequeue: bool = False


Modifier = Callable[[JobRecord], Change | None]


class JobStore(ABC):
    # -- primitives a backend provides -------------------------------------------------------

    @abstractmethod
    def _insert(self, record: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> JobRecord | None:
        """Store a new record (and enqueue it); return the existing record instead when its
        idempotency key is already taken."""

    @abstractmethod
    def _modify(self, job_id: str, modify: Modifier) -> JobRecord:
        """Atomically: read the record, let `modify` change it, write it with the change's
        events and queue moves. Raises JobNotFoundError."""

    @abstractmethod
    def _head_of_queue(self) -> str | None:
        """The id at the head of the queue, left there (None when empty): `claim` removes it
        in the same atomic step that marks it running, so a worker dying in between loses
        nothing and two workers never run one job."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord: ...

    @abstractmethod
    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        """Newest first."""

    # `list` below means the method from here on in the class body: the builtin is `builtins.list`.

    @abstractmethod
    def events_after(self, job_id: str, after: int) -> builtins.list[JobEvent]: ...

    @abstractmethod
    def running_ids(self) -> builtins.list[str]: ...

    @abstractmethod
    def count_by_state(self) -> dict[JobState, int]:
        """How many jobs are in each state (Prometheus reads it at every scrape: keep it cheap)."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailableError when the store cannot be reached."""

    def close(self) -> None:  # noqa: B027 - optional for backends
        pass

    # -- the rules ---------------------------------------------------------------------------

    def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Queue a new job; with an idempotency key already used, return that job instead."""
        existing = self._insert(record, [("state", {"state": JobState.queued.value})])
        return (existing, False) if existing is not None else (record, True)

    def claim(self, worker: str) -> JobRecord | None:
        """The next queued job, now running on `worker`."""
        while True:
            job_id = self._head_of_queue()
            if job_id is None:
                return None
            started = False

            def start(record: JobRecord) -> Change:
                nonlocal started
                started = False  # `_modify` may call this again after a conflicting write
                if record.state is not JobState.queued:
                    return Change(dequeue=True)  # another worker won it, or a stale entry: drop it
                now = time.time()
                record.state = JobState.running
                record.worker = worker
                record.started_at = now
                record.heartbeat_at = now
                record.error = None
                started = True
                event = {"state": "running", "worker": worker, "attempt": record.attempt}
                return Change(events=[("state", event)], dequeue=True)

            try:
                record = self._modify(job_id, start)
            except JobNotFoundError:  # deleted while queued: nothing to run
                continue
            if started:
                return record

    def update(
        self, job_id: str, events: builtins.list[tuple[str, dict[str, Any]]] | None = None, **fields: Any
    ) -> JobRecord:
        """Progress, metrics, heartbeats: fields of a running job, plus events to record."""
        return self._modify(job_id, lambda record: _set_fields(record, fields, events))

    def worker_update(
        self, job_id: str, worker: str, events: builtins.list[tuple[str, dict[str, Any]]] | None = None, **fields: Any
    ) -> JobRecord:
        """Like `update`, but only while the job is still running on `worker`: a worker the
        reaper gave up on gets the record back unchanged and learns it must stop."""

        def apply(record: JobRecord) -> Change | None:
            if record.state is not JobState.running or record.worker != worker:
                return None
            return _set_fields(record, fields, events)

        return self._modify(job_id, apply)

    def finish(self, job_id: str, state: JobState, *, worker: str | None = None, **fields: Any) -> JobRecord:
        """Move a running job to a terminal state (once: a second finish is refused)."""

        def apply(record: JobRecord) -> Change:
            if not can_move(record.state, state):
                raise InvalidTransitionError(record.id, record.state, state)
            if worker is not None and record.worker != worker:
                # The reaper already gave this job up (and maybe someone resumed it): the
                # late answer of a worker thought dead must not overwrite that.
                raise InvalidTransitionError(record.id, record.state, state)
            record.state = state
            record.finished_at = time.time()
            for name, value in fields.items():
                setattr(record, name, value)
            data = {"state": state.value}
            if record.error:
                data["error"] = record.error
            return Change(events=[("state", data), ("end", {})])

        return self._modify(job_id, apply)

    def request_cancel(self, job_id: str) -> JobRecord:
        """Queued: cancelled at once. Running: flagged; its worker stops it at the next step."""

        def apply(record: JobRecord) -> Change:
            if record.state is JobState.queued:
                record.state = JobState.cancelled
                record.finished_at = time.time()
                record.error = "cancelled before it started"
                record.resumable = True
                return Change(events=[("state", {"state": "cancelled"}), ("end", {})], dequeue=True)
            if record.state is JobState.running:
                record.cancel_requested = True
                return Change(events=[("log", {"message": "cancel requested; stopping at the next step"})])
            raise InvalidTransitionError(record.id, record.state, JobState.cancelled)

        return self._modify(job_id, apply)

    def resume(self, job_id: str) -> JobRecord:
        """A failed or cancelled job goes back to the queue; its worker continues from the
        last checkpoint of its run folder."""

        def apply(record: JobRecord) -> Change:
            if not can_move(record.state, JobState.queued):
                raise InvalidTransitionError(record.id, record.state, JobState.queued)
            if not record.resumable:
                raise InvalidTransitionError(record.id, record.state, JobState.queued)
            record.state = JobState.queued
            record.attempt += 1
            record.error = None
            record.finished_at = None
            record.started_at = None
            record.worker = None
            record.cancel_requested = False
            record.resumable = False
            return Change(events=[("state", {"state": "queued", "attempt": record.attempt})], enqueue=True)

        return self._modify(job_id, apply)

    def fail_stale(self, timeout_s: float, now: float | None = None) -> builtins.list[str]:
        """Running jobs whose worker stopped sending heartbeats: failed, resumable, with the
        reason. Without this a killed worker would leave them `running` forever."""
        now = time.time() if now is None else now
        failed = []
        for job_id in self.running_ids():

            def apply(record: JobRecord) -> Change | None:
                if record.state is not JobState.running:
                    return None
                last = record.heartbeat_at or record.started_at or record.updated_at
                if now - last <= timeout_s:
                    return None
                record.state = JobState.failed
                record.finished_at = now
                record.resumable = True
                record.error = (
                    f"worker {record.worker} stopped sending heartbeats ({now - last:.0f} s since the last one; "
                    f"limit {timeout_s:g} s): it was killed or lost; resume the job to continue from its last "
                    "checkpoint"
                )
                return Change(events=[("state", {"state": "failed", "error": record.error}), ("end", {})])

            try:
                record = self._modify(job_id, apply)
            except JobNotFoundError:
                continue
            if record.state is JobState.failed and record.finished_at == now:
                failed.append(job_id)
        return failed

    def wait_events(self, job_id: str, after: int, timeout_s: float, poll_s: float = 0.25) -> builtins.list[JobEvent]:
        """Events after `after`, waiting up to `timeout_s` for the first one."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events_after(job_id, after)
            if events or time.monotonic() >= deadline:
                return events
            time.sleep(poll_s)


def _set_fields(record: JobRecord, fields: dict[str, Any], events: list[tuple[str, dict[str, Any]]] | None) -> Change:
    for name, value in fields.items():
        setattr(record, name, value)
    return Change(events=list(events or []))


def apply_change(record: JobRecord, change: Change, now: float) -> list[JobEvent]:
    """Stamp the record and number its new events (shared by the backends)."""
    record.updated_at = now
    events = []
    for type_, data in change.events:
        record.events += 1
        events.append(JobEvent(record.events, type_, data, now))
    return events
