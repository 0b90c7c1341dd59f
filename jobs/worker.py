"""A worker: takes queued jobs one at a time and runs each in a spawned training process.

The worker itself never imports torch. While a job runs it relays the training process's
events to the store, sends heartbeats (a worker killed with -9 stops sending them, and the
reaper then marks its job failed and resumable), watches for a cancel request (the
training process stops at the next step, after a checkpoint), and finally records exactly
one outcome. Heartbeats come from a thread of their own, from the claim until the outcome is
written: nothing the job loop waits on (starting the process, its exit, a long message)
can make a healthy job look dead. Store writes that fail because Redis is away are kept and retried: training
goes on through a Redis restart and nothing it reported is lost.
"""

from __future__ import annotations

import contextvars
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.logs import log_context
from jobs import child
from jobs.records import InvalidTransitionError, JobNotFoundError, JobRecord, JobState, StoreUnavailableError
from jobs.store import JobStore

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess
    from multiprocessing.synchronize import Event as EventType

logger = logging.getLogger(__name__)

MAX_BUFFERED_EVENTS = 10_000


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class WorkerOptions:
    data_dir: Path
    registry_dir: Path
    registry_uri: str | None = None
    artifact_uri: str | None = None
    name: str = field(default_factory=default_worker_name)
    heartbeat_seconds: float = 5.0
    poll_seconds: float = 1.0
    cancel_grace_seconds: float = 120.0
    allow_local_paths: bool = False  # DUET_JOBS_ALLOW_LOCAL_PATHS, passed to the training process


class Relay:
    """Buffers what a running job reports and writes it to the store when it can. The job
    loop adds, the heartbeat thread flushes: both under the relay's lock."""

    def __init__(self, store: JobStore, record: JobRecord, worker: str) -> None:
        self.store = store
        self.job_id = record.id
        self.worker = worker
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.fields: dict[str, Any] = {}
        self.metrics = {k: dict(v) for k, v in record.metrics.items()}
        self.progress = record.progress.model_dump()
        self.last_flush = 0.0
        self.record = record
        self._lock = threading.Lock()  # the buffers
        self._writing = threading.Lock()  # one store write at a time, in order

    def add(self, event: dict[str, Any]) -> None:
        kind = event.pop("event", "log")
        with self._lock:
            if kind == "progress":
                self.progress.update({k: v for k, v in event.items() if k in self.progress and v is not None})
                self.fields["progress"] = dict(self.progress)
            elif kind == "stage":
                self.progress["stage"] = event.get("stage")
                self.fields["progress"] = dict(self.progress)
            elif kind == "evaluation":
                self.metrics[event.get("when", "after")] = event.get("metrics", {})
                self.fields["metrics"] = {k: dict(v) for k, v in self.metrics.items()}
            if len(self.events) < MAX_BUFFERED_EVENTS:
                self.events.append((kind, event))

    def end_stage(self) -> None:
        """The job is over: no stage is running (the record's state says the rest)."""
        with self._lock:
            self.progress["stage"] = None
            self.progress["eta_seconds"] = None
            self.fields["progress"] = dict(self.progress)

    @property
    def pending(self) -> bool:
        with self._lock:
            return bool(self.events or self.fields)

    def flush(self) -> JobRecord | None:
        """Write what is buffered plus a heartbeat; None while the store is unreachable (what
        was taken is put back in front of what arrived meanwhile)."""
        with self._writing:
            with self._lock:
                events, fields = self.events, self.fields
                self.events, self.fields = [], {}
            try:
                record = self.store.worker_update(
                    self.job_id, self.worker, events=events, **fields, heartbeat_at=time.time()
                )
            except StoreUnavailableError as exc:
                with self._lock:
                    self.events = (events + self.events)[:MAX_BUFFERED_EVENTS]
                    self.fields = {**fields, **self.fields}
                logger.warning(
                    "job %s: store unreachable, keeping %d events for later: %s", self.job_id, len(events), exc
                )
                return None
            self.last_flush = time.monotonic()
            self.record = record
            return record


class Heartbeat:
    """Flushes a relay every `interval` seconds in its own thread, from `start` to `stop`."""

    def __init__(self, relay: Relay, interval: float) -> None:
        self.relay = relay
        self.interval = interval
        self._stop = threading.Event()
        context = contextvars.copy_context()  # its log lines carry the job's request and job ids too
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), daemon=True, name=f"heartbeat-{relay.job_id}"
        )

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            try:
                self.relay.flush()
            except Exception:  # noqa: BLE001 - a heartbeat thread that dies fails a healthy job
                logger.exception("job %s: heartbeat failed; retrying", self.relay.job_id)
            if self._stop.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    def __init__(self, store: JobStore, options: WorkerOptions) -> None:
        self.store = store
        self.options = options
        self.stopping = threading.Event()
        self.current: str | None = None

    @property
    def name(self) -> str:
        return self.options.name

    def run_forever(self) -> None:
        """Claim and run jobs until `stopping` is set (SIGTERM/SIGINT in `duet worker`)."""
        logger.info("worker %s waiting for jobs", self.name)
        backoff = self.options.poll_seconds
        while not self.stopping.is_set():
            try:
                record = self.store.claim(self.name)
                backoff = self.options.poll_seconds
            except StoreUnavailableError as exc:
                logger.warning("job store unreachable, retrying in %.0f s: %s", backoff, exc)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            if record is None:
                self.stopping.wait(self.options.poll_seconds)
                continue
            self.run_job(record)
        logger.info("worker %s stopped", self.name)

    def run_job(self, record: JobRecord) -> None:
        """Run one claimed job; its lines carry the id of the request that created it."""
        with log_context(request_id=record.request_id, job_id=record.id):
            self._run_job(record)

    def _run_job(self, record: JobRecord) -> None:
        """Run one claimed job to its outcome; always leaves the record terminal (or, if the
        reaper gave the job up meanwhile, leaves the reaper's verdict alone)."""
        self.current = record.id
        logger.info("job %s (attempt %d) started on %s", record.id, record.attempt, self.name)
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        cancel = context.Event()
        spec = child.JobSpec(
            job_id=record.id,
            attempt=record.attempt,
            config=record.config,
            data_dir=str(self.options.data_dir),
            registry_dir=str(self.options.registry_dir),
            registry_uri=self.options.registry_uri,
            artifact_uri=self.options.artifact_uri,
            request_id=record.request_id,
            allow_local_paths=self.options.allow_local_paths,
        )
        relay = Relay(self.store, record, self.name)
        heartbeat = Heartbeat(relay, self.options.heartbeat_seconds).start()
        try:
            process = context.Process(target=child.main, args=(spec, sender, cancel), name=f"duet-job-{record.id}")
            process.start()
            sender.close()
            outcome = self._watch(process, receiver, cancel, relay)
            process.join(timeout=30)  # the process may take a while to exit after its outcome
            if process.is_alive():
                process.kill()
                process.join()
            receiver.close()
        finally:
            heartbeat.stop()
        if outcome is None:
            outcome = (
                "failed",
                {
                    "error": f"the training process exited with code {process.exitcode} without a result "
                    "(killed, or out of memory?)",
                    "resumable": True,
                },
            )
        self._record_outcome(relay, *outcome)
        self.current = None

    def _watch(
        self, process: BaseProcess, receiver: Connection[Any, Any], cancel: EventType, relay: Relay
    ) -> tuple[str, dict[str, Any]] | None:
        outcome: tuple[str, dict[str, Any]] | None = None
        cancel_since: float | None = None
        given_up = False
        cancel_seen = False
        while outcome is None:
            try:
                outcome = self._receive(receiver, relay)
            except (EOFError, OSError):  # the process exited (after its outcome, or without one)
                break
            if outcome is not None:
                break
            if not process.is_alive() and not receiver.poll(0):
                break
            record = relay.record  # as the heartbeat thread last read it
            if record.state is not JobState.running or record.worker != self.name:
                given_up = True  # the reaper failed it (we were unreachable too long): stop
            if record.cancel_requested and not cancel_seen:
                cancel_seen = True
                logger.info("job %s: cancel requested", relay.job_id)
            wants_stop = given_up or self.stopping.is_set() or relay.record.cancel_requested
            if wants_stop and cancel_since is None:
                cancel.set()  # stops at the next step, after a checkpoint
                cancel_since = time.monotonic()
            if cancel_since is not None and time.monotonic() - cancel_since > self.options.cancel_grace_seconds:
                logger.warning(
                    "job %s did not stop within %.0f s; killing it", relay.job_id, time.monotonic() - cancel_since
                )
                process.kill()
                outcome = ("cancelled", {"error": "stopped by force: it did not reach a step boundary in time"})
        if outcome is not None and outcome[0] == "cancelled" and not relay.record.cancel_requested:
            reason = "worker shutting down" if self.stopping.is_set() else "job given up by the reaper"
            outcome = ("failed", {"error": f"{reason}; {outcome[1].get('error', '')}", "resumable": True})
        return outcome

    @staticmethod
    def _receive(
        receiver: Connection[Any, Any], relay: Relay, budget_s: float = 0.2
    ) -> tuple[str, dict[str, Any]] | None:
        """Take the messages that arrive within `budget_s` (at most), then return, so a chatty
        training process can never starve the heartbeat."""
        deadline = time.monotonic() + budget_s
        while (remaining := deadline - time.monotonic()) > 0 and receiver.poll(remaining):
            kind, data = receiver.recv()
            if kind != "event":
                return kind, data
            relay.add(data)
        return None

    def _record_outcome(self, relay: Relay, kind: str, data: dict[str, Any]) -> None:
        """Write the outcome; retry while the store is away (this is the one write that must land)."""
        state = {"succeeded": JobState.succeeded, "cancelled": JobState.cancelled}.get(kind, JobState.failed)
        relay.end_stage()  # the last stage ("evaluating ...") is over; the state says the rest
        fields: dict[str, Any] = {}
        if state is JobState.succeeded:
            fields["result"] = {k: data.get(k) for k in ("model", "promotion", "report")}
            relay.add({"event": "log", "message": f"registered {data.get('model')}"})
        else:
            fields["error"] = data.get("error", kind)
            fields["resumable"] = bool(data.get("resumable", True))
            if data.get("traceback"):
                relay.add({"event": "log", "message": data["traceback"]})
        delay = 0.5
        while True:
            if relay.pending and relay.flush() is None:
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            try:
                self.store.finish(relay.job_id, state, worker=self.name, **fields)
                logger.info(
                    "job %s %s%s", relay.job_id, state.value, f": {fields.get('error')}" if "error" in fields else ""
                )
                return
            except StoreUnavailableError as exc:
                logger.warning("job %s: store unreachable while recording its outcome; retrying: %s", relay.job_id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
            except (InvalidTransitionError, JobNotFoundError) as exc:
                logger.warning("job %s: outcome %s not recorded: %s", relay.job_id, state.value, exc)
                return
