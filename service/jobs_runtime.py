"""What the service runs for jobs: the store, the heartbeat reaper and (embedded) a worker.

With `REDIS_URL` the store is Redis and workers are `duet worker` processes on any machine.
Without it the store is SQLite under the data dir and the service starts one local worker
process itself (`python -m duet.cli worker`), restarting it if it dies, so the API behaves
the same with nothing else installed. The reaper runs here in both cases: a job whose worker
stopped sending heartbeats becomes `failed` (resumable) instead of `running` forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time

import anyio

from jobs.records import StoreUnavailableError
from jobs.redis_store import RedisJobStore
from jobs.sqlite_store import SqliteJobStore
from jobs.store import JobStore
from service.settings import Settings

logger = logging.getLogger(__name__)


def open_job_store(settings: Settings) -> JobStore:
    if settings.redis_url:
        return RedisJobStore(settings.redis_url, prefix=settings.redis_prefix)
    return SqliteJobStore(settings.jobs_db)


def worker_environment(settings: Settings) -> dict[str, str]:
    """The local worker sees the service's settings (they may come from code, not the env)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DUET_REDIS_URL")}
    env.update(
        DUET_DATA_DIR=str(settings.data_dir.resolve()),
        DUET_JOB_HEARTBEAT_SECONDS=str(settings.job_heartbeat_seconds),
        DUET_JOB_HEARTBEAT_TIMEOUT_SECONDS=str(settings.job_heartbeat_timeout_seconds),
        DUET_JOB_CANCEL_GRACE_SECONDS=str(settings.job_cancel_grace_seconds),
        DUET_JOBS_ALLOW_LOCAL_PATHS=str(settings.jobs_allow_local_paths).lower(),
        DUET_LOG_LEVEL=settings.log_level,
        DUET_LOG_FORMAT=settings.log_format,
    )
    for name, value in (("DUET_REGISTRY_URI", settings.registry_uri), ("DUET_ARTIFACT_URI", settings.artifact_uri)):
        if value:
            env[name] = value
        else:
            env.pop(name, None)
    return env


class JobsRuntime:
    def __init__(self, settings: Settings, store: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.worker_process: subprocess.Popen[bytes] | None = None
        self.worker_restarts = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @classmethod
    async def start(cls, settings: Settings) -> JobsRuntime:
        store = await anyio.to_thread.run_sync(open_job_store, settings)
        runtime = cls(settings, store)
        runtime._tasks.append(asyncio.create_task(runtime._reap_loop()))
        if not settings.redis_url and settings.local_worker:
            runtime._tasks.append(asyncio.create_task(runtime._supervise_local_worker()))
        return runtime

    @property
    def mode(self) -> str:
        return "redis" if self.settings.redis_url else "embedded"

    async def _reap_loop(self) -> None:
        """Fail running jobs without heartbeats, but only after the store has been reachable
        for a whole timeout: right after Redis comes back, workers have not yet had a chance
        to send the heartbeats they could not send while it was away."""
        timeout = self.settings.job_heartbeat_timeout_seconds
        reachable_since: float | None = None
        while True:
            await asyncio.sleep(self.settings.job_heartbeat_seconds)
            try:
                await anyio.to_thread.run_sync(self.store.ping)
                now = time.monotonic()
                reachable_since = reachable_since or now
                if now - reachable_since < timeout:
                    continue
                failed = await anyio.to_thread.run_sync(self.store.fail_stale, timeout)
                for job_id in failed:
                    logger.warning("job %s failed: its worker stopped sending heartbeats", job_id)
            except StoreUnavailableError as exc:
                reachable_since = None
                logger.warning("job store unreachable: %s", exc)
            except Exception:
                logger.exception("the job reaper failed; will retry")

    def _spawn_worker(self) -> subprocess.Popen[bytes]:
        """Called on the event loop's thread, which lives as long as the server: the worker asks
        to be killed when that thread ends (`PR_SET_PDEATHSIG` follows the starting thread)."""
        command = [sys.executable, "-m", "duet.cli", "worker", "--embedded", "--parent-pid", str(os.getpid())]
        return subprocess.Popen(command, env=worker_environment(self.settings))

    async def _supervise_local_worker(self) -> None:
        """Start the local worker and start it again (with back-off) whenever it exits."""
        backoff = 1.0
        while not self._closing:
            self.worker_process = self._spawn_worker()
            started = time.monotonic()
            logger.info("local job worker started (pid %d)", self.worker_process.pid)
            while self.worker_process.poll() is None:
                await asyncio.sleep(0.5)
            if self._closing:
                return
            lived = time.monotonic() - started
            backoff = 1.0 if lived > 60 else min(backoff * 2, 60.0)
            self.worker_restarts += 1
            logger.error(
                "local job worker exited with code %s after %.0f s; restarting in %.0f s",
                self.worker_process.returncode,
                lived,
                backoff,
            )
            await asyncio.sleep(backoff)

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        process = self.worker_process
        if process is not None and process.poll() is None:
            process.terminate()  # the worker stops its job at the next step, then exits
            try:
                await anyio.to_thread.run_sync(process.wait, 30)
            except subprocess.TimeoutExpired:
                process.kill()
        await anyio.to_thread.run_sync(self.store.close)
