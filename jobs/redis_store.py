"""The distributed job store: Redis, shared by the API and any number of `duet worker`s.

Each record is one JSON string with no TTL (it outlives any queue result TTL), indexed in a
sorted set by creation time and in one set per state; events are a list per job; the queue
is a list of ids. Every modification is optimistic: WATCH the record, compute the change in
Python (the rules in `jobs.store`), then MULTI/EXEC the record, its events and queue moves
together, retrying when another client changed the record in between.

Durability is Redis's: run it with `appendonly yes` (docker-compose does) so a restart
loses no record. While Redis is unreachable every call raises `StoreUnavailableError`, which the
API answers with 503 and the worker rides out (it keeps training and retries its writes).
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis

from jobs.records import JobNotFoundError, JobRecord, JobState, StoreUnavailableError
from jobs.store import Change, JobEvent, JobStore, Modifier, apply_change

T = TypeVar("T")


def _text(value: bytes | str) -> str:
    """A Redis reply as text. The client decodes every reply (`decode_responses=True`), but
    redis-py's types cannot tell, so each reply is typed `bytes | str`."""
    return value if isinstance(value, str) else value.decode()


class RedisJobStore(JobStore):
    def __init__(self, url: str, prefix: str = "duet", timeout_s: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )

    def close(self) -> None:
        self.client.close()

    # -- keys ----------------------------------------------------------------------------------

    def _job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _events(self, job_id: str) -> str:
        return f"{self.prefix}:events:{job_id}"

    def _state_set(self, state: JobState) -> str:
        return f"{self.prefix}:state:{state.value}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _queue(self) -> str:
        return f"{self.prefix}:queue"

    def _idempotency(self, key: str) -> str:
        return f"{self.prefix}:idempotency:{key}"

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, action: Callable[[], T]) -> T:
        """Run `action`, turning a lost connection into StoreUnavailableError (-> 503, retry)."""
        try:
            return action()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(f"the job store (Redis at {self._safe_url()}) is unreachable: {exc}") from exc
        except redis.BusyLoadingError as exc:
            raise StoreUnavailableError("the job store (Redis) is loading its data after a restart") from exc

    def _safe_url(self) -> str:
        """The URL without a password, for messages."""
        kwargs = self.client.connection_pool.connection_kwargs
        return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"

    def _write(self, pipe: Any, record: JobRecord, events: list[JobEvent], change: Change) -> None:
        pipe.set(self._job(record.id), record.model_dump_json())
        for state in JobState:
            if state is not record.state:
                pipe.srem(self._state_set(state), record.id)
        pipe.sadd(self._state_set(record.state), record.id)
        if events:
            pipe.rpush(self._events(record.id), *[json.dumps([e.seq, e.type, e.data, e.time]) for e in events])
        if change.dequeue or change.enqueue:
            pipe.lrem(self._queue, 0, record.id)
        if change.enqueue:
            pipe.rpush(self._queue, record.id)

    # -- primitives ----------------------------------------------------------------------------

    def _insert(self, record: JobRecord, events: list[tuple[str, dict[str, Any]]]) -> JobRecord | None:
        def attempt() -> JobRecord | None:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        idem = self._idempotency(record.idempotency_key) if record.idempotency_key else None
                        if idem:
                            pipe.watch(idem)
                            existing = pipe.get(idem)
                            if existing:
                                pipe.unwatch()
                                return self.get(_text(existing))
                        new_events = apply_change(record, Change(events=events), time.time())
                        pipe.multi()
                        if idem:
                            pipe.set(idem, record.id)
                        pipe.zadd(self._index, {record.id: record.created_at})
                        self._write(pipe, record, new_events, Change(enqueue=True))
                        pipe.execute()
                        return None
                    except redis.WatchError:
                        record.events = 0
                        continue

        return self._call(attempt)

    def _modify(self, job_id: str, modify: Modifier) -> JobRecord:
        key = self._job(job_id)

        def attempt() -> JobRecord:
            with self.client.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch(key)
                        raw = pipe.get(key)
                        if raw is None:
                            raise JobNotFoundError(f"no job {job_id!r}")
                        record = JobRecord.model_validate_json(raw)
                        change = modify(record)
                        if change is None:
                            pipe.unwatch()
                            return record
                        events = apply_change(record, change, time.time())
                        pipe.multi()
                        self._write(pipe, record, events, change)
                        pipe.execute()
                        return record
                    except redis.WatchError:
                        continue

        return self._call(attempt)

    def _head_of_queue(self) -> str | None:
        head = self._call(lambda: self.client.lindex(self._queue, 0))
        return None if head is None else _text(head)

    # -- reads ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        raw = self._call(lambda: self.client.get(self._job(job_id)))
        if raw is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return JobRecord.model_validate_json(raw)

    def list(self, limit: int = 50, state: JobState | None = None) -> list[JobRecord]:
        def read() -> list[JobRecord]:
            ids: list[str]
            if state is None:
                # Without withscores the reply is the members alone (the type also covers (member, score)).
                newest = cast("list[bytes | str]", self.client.zrevrange(self._index, 0, limit - 1))
                ids = [_text(i) for i in newest]
            else:
                members = [_text(m) for m in self.client.smembers(self._state_set(state))]
                scores = self.client.zmscore(self._index, members) if members else []
                ranked = sorted(zip(members, scores), key=lambda pair: pair[1] or 0, reverse=True)
                ids = [job_id for job_id, _ in ranked[:limit]]
            raws = self.client.mget([self._job(i) for i in ids]) if ids else []
            return [JobRecord.model_validate_json(raw) for raw in raws if raw is not None]

        return self._call(read)

    def events_after(self, job_id: str, after: int) -> builtins.list[JobEvent]:
        def read() -> list[JobEvent]:
            raws = self.client.lrange(self._events(job_id), max(after, 0), -1)
            if not raws and not self.client.exists(self._job(job_id)):
                raise JobNotFoundError(f"no job {job_id!r}")
            return [JobEvent(*json.loads(raw)) for raw in raws]

        return self._call(read)

    def running_ids(self) -> builtins.list[str]:
        members = self._call(lambda: self.client.smembers(self._state_set(JobState.running)))
        return sorted(_text(m) for m in members)

    def count_by_state(self) -> dict[JobState, int]:
        def read() -> dict[JobState, int]:
            pipe = self.client.pipeline(transaction=False)
            for state in JobState:
                pipe.scard(self._state_set(state))
            return dict(zip(JobState, (int(n) for n in pipe.execute())))

        return self._call(read)

    def ping(self) -> None:
        self._call(self.client.ping)
