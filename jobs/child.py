"""The training process of one job, started with the `spawn` method by a worker.

Why a separate, spawned process: training holds gigabytes (and on a GPU a CUDA context)
that only process exit frees reliably, so a cancel or a crash gives everything back; and a
process forked after CUDA was initialised is broken, so it is never forked. It talks to its
worker through one pipe: ("event", {...}) while it runs, then exactly one outcome message:
("succeeded", result), ("cancelled", {...}) or ("failed", {...}).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.layout import datasets_dir, job_run_dir
from common.logs import setup_logging

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobSpec:
    """Everything the training process needs, picklable (it crosses the spawn boundary)."""

    job_id: str
    attempt: int
    config: dict[str, Any]
    data_dir: str
    registry_dir: str
    registry_uri: str | None = None
    artifact_uri: str | None = None
    request_id: str | None = None  # of the request that created the job: on every log line
    # DUET_JOBS_ALLOW_LOCAL_PATHS: data and base models may be server paths. Off: data only from
    # inside the datasets folder (real paths), the base model a registry model or hub id.
    allow_local_paths: bool = False

    @property
    def run_dir(self) -> Path:
        """Per job, not per attempt: a resumed attempt finds the checkpoints of the last one."""
        return job_run_dir(Path(self.data_dir), self.job_id)

    @property
    def datasets_dir(self) -> Path:
        return datasets_dir(Path(self.data_dir))


# Errors in what the user asked for: running the job again cannot help.
_INPUT_ERRORS = ("ConfigError", "RowError", "ModelNotFoundError", "VersionNotFoundError", "InvalidNameError")


def die_with_parent() -> None:
    """If the worker is killed (-9), this process must not train on unsupervised: the
    reaper fails the job and a resume may start it elsewhere, so an orphan would register a
    duplicate version. Linux delivers SIGKILL on the parent's death; elsewhere a thread
    watches the parent pid."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(1, signal.SIGKILL) == 0 and os.getppid() == parent:  # 1 = PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def main(spec: JobSpec, conn: Any, cancel: Any) -> None:
    """Process entry point: train, and always send one outcome before exiting."""
    die_with_parent()
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(
        level="info",
        log_format=os.environ.get("DUET_LOG_FORMAT", "auto"),  # the worker's environment, inherited
        file=spec.run_dir / f"attempt-{spec.attempt}.log",
        fields={"request_id": spec.request_id, "job_id": spec.job_id},
    )

    def send(kind: str, data: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):  # the worker is gone: nothing left to tell
            conn.send((kind, data))

    try:
        outcome = run(spec, lambda event: send("event", event), cancel.is_set)
        send(*outcome)
    except BaseException as exc:  # noqa: BLE001 - the worker must always get a reason
        logger.exception("job %s failed", spec.job_id)
        send("failed", failure(exc, spec.run_dir, data_dir=Path(spec.data_dir)))
    finally:
        conn.close()


def run(
    spec: JobSpec, notify: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool]
) -> tuple[str, dict[str, Any]]:
    from registry.store import ModelRegistry
    from trainer.config import parse_config
    from trainer.run import TrainingCancelledError, run_training

    notify({"event": "stage", "stage": f"starting attempt {spec.attempt}"})
    confined = not spec.allow_local_paths
    config = parse_config(spec.config, base_dir=spec.datasets_dir, confined=confined)
    registry = ModelRegistry.open(Path(spec.registry_dir), spec.registry_uri, spec.artifact_uri)
    try:
        result = run_training(
            config,
            base_dir=spec.datasets_dir,
            run_dir=spec.run_dir,
            registry=registry,
            resume=True,
            on_progress=notify,
            should_stop=should_stop,
            confined=confined,
        )
    except TrainingCancelledError as exc:
        return "cancelled", {"error": f"cancelled at step {exc.step}", "step": exc.step}
    return "succeeded", {
        "model": result.version.ref if result.version else None,
        "promotion": asdict(result.promotion) if result.promotion else None,
        "report": result.report,
        "before": result.before,
        "after": result.after,
    }


MAX_ERROR_CHARS = 2000


def failure(exc: BaseException, run_dir: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """The reason a user can act on, and whether resuming could help. The job's reader sees
    it, so it is bounded and says `<data dir>` where a library's message named the server's
    data folder; the traceback goes to the job's events only for internal errors, never for
    the user's own mistakes."""
    name = type(exc).__name__
    message = _hide(str(exc).strip() or name, data_dir)
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + f"... ({len(message)} characters)"
    input_error = name in _INPUT_ERRORS  # anything else (a lost file, OOM, a kill) may pass on a resume
    return {
        "error": f"{name}: {message}",
        "resumable": not input_error,
        "traceback": None if input_error else _hide("".join(traceback.format_exception(exc)), data_dir)[-4000:],
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("checkpoint-*")),
    }


def _hide(text: str, data_dir: Path | None) -> str:
    if data_dir is None:
        return text
    for form in {str(data_dir.resolve()), str(data_dir)}:
        text = text.replace(form, "<data dir>")
    return text
