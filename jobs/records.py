"""What a fine-tuning job is: its record, its states and the moves between them.

The record is ours, not the queue's: it lives until deleted (a queue's result TTL cannot
lose it), and every backend (SQLite embedded, Redis distributed) stores exactly this shape.
State moves are checked here so both backends refuse the same impossible ones (a finished
job cannot start running again; only failed or cancelled jobs resume).
"""

from __future__ import annotations

import secrets
import time
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

# from -> the states it may move to
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    JobState.running: frozenset({JobState.succeeded, JobState.failed, JobState.cancelled}),
    JobState.failed: frozenset({JobState.queued}),  # resume
    JobState.cancelled: frozenset({JobState.queued}),  # resume
    JobState.succeeded: frozenset(),
}


def can_move(current: JobState, new: JobState) -> bool:
    return new in TRANSITIONS[current]


class Progress(BaseModel):
    model_config = ConfigDict(extra="ignore")

    step: int | None = None
    max_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    eta_seconds: float | None = None
    stage: str | None = None


class JobResult(BaseModel):
    model: str | None = Field(default=None, description="The registered version, 'name/version'.")
    promotion: dict[str, Any] | None = None
    report: str | None = None


def _empty_metrics() -> dict[str, dict[str, float]]:
    return {"before": {}, "after": {}}


class JobRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    id: str
    object: str = "job"
    state: JobState = JobState.queued
    created_at: float = Field(default_factory=time.time)
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    heartbeat_at: float | None = None
    config: dict[str, Any]
    idempotency_key: str | None = None
    request_id: str | None = None
    attempt: int = 1
    worker: str | None = None
    progress: Progress = Field(default_factory=Progress)
    metrics: dict[str, dict[str, float]] = Field(default_factory=_empty_metrics)
    error: str | None = None
    resumable: bool = False
    result: JobResult | None = None
    cancel_requested: bool = False
    events: int = Field(default=0, description="Events recorded so far (the last event id).")

    @property
    def output_name(self) -> str:
        return str(self.config.get("output", {}).get("name", ""))


def new_job_id() -> str:
    """Sortable by creation time (for humans reading lists), unguessable in its tail."""
    return f"job_{int(time.time() * 1000):x}{secrets.token_hex(5)}"


class JobError(Exception):
    """Base of the job errors the API turns into 4xx/503 answers."""


class JobNotFoundError(JobError):
    pass


class InvalidTransitionError(JobError):
    def __init__(self, job_id: str, current: JobState, wanted: JobState) -> None:
        super().__init__(f"job {job_id} is {current.value}; it cannot become {wanted.value}")
        self.current = current
        self.wanted = wanted


class StoreUnavailableError(JobError):
    """The job store (Redis) cannot be reached; callers answer 503 and retry later."""
