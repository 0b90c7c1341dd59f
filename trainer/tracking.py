"""Loss and metric curves into the registry's MLflow tracking, so they show in MLflow's UI,
and progress events for whoever started the run (the CLI, the jobs API).

Events go through one :class:`Progress` object, handed to every stage of a run, rather than an
optional callback that each stage tests for ``None``: a run nobody listens to (or a rank other
than 0) gets a silent one, so the stages announce themselves unconditionally and the question
"does anyone listen?" is answered once, where the run starts."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

EXPERIMENT = "duet-training"
ProgressFn = Callable[[dict[str, Any]], None]


class Progress:
    """A run's events for whoever started it: `stage` changes, `evaluation` results and the
    trainer's `progress` logs (through :class:`TrackingCallback`), each a dict with an "event"
    key. Built without a listener it drops every event."""

    def __init__(self, listener: ProgressFn | None = None) -> None:
        self._listener = listener

    def emit(self, event: dict[str, Any]) -> None:
        if self._listener is not None:
            self._listener(event)

    def stage(self, stage: str) -> None:
        self.emit({"event": "stage", "stage": stage})

    def evaluation(self, when: str, metrics: dict[str, float], **extra: Any) -> None:
        """Nothing when `metrics` is empty (a run without evaluation sets)."""
        if metrics:
            self.emit({"event": "evaluation", "when": when, "metrics": metrics, **extra})


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> MLflow params ('loss.temperature': '0.05'), values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


class Tracker:
    """One MLflow run per training run (rank 0 only); a no-op when tracking is off."""

    def __init__(
        self, tracking_uri: str | None, run_name: str, params: dict[str, Any], artifact_location: str | None = None
    ) -> None:
        """`artifact_location`: the registry's artifact root. Without it an embedded (SQLite)
        store would put the run's artifacts (the registered model) under ./mlruns of the
        current directory instead of the data directory."""
        self.run_id: str | None = None
        self._client = None
        if tracking_uri is None:
            return
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        self._client = MlflowClient(tracking_uri=tracking_uri)
        self._metric = Metric
        experiment = self._client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment
            else self._client.create_experiment(EXPERIMENT, artifact_location=artifact_location)
        )
        self.run_id = self._client.create_run(experiment_id, run_name=run_name).info.run_id
        items = [Param(k, v) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._client is None:
            return
        now = int(time.time() * 1000)
        batch = [
            self._metric(key.replace("@", "_at_"), float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        ]
        if batch and self.run_id is not None:  # set with the client
            self._client.log_batch(self.run_id, metrics=batch)

    def finish(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)


class TrackingCallback(TrainerCallback):
    """Forwards the trainer's logs (loss, learning rate, epoch) to MLflow and to `progress`."""

    def __init__(self, tracker: Tracker, progress: Progress | None = None) -> None:
        self.tracker = tracker
        self.progress = progress or Progress()
        self._started = time.monotonic()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        self.tracker.log({f"train/{k}": v for k, v in logs.items()}, state.global_step)
        elapsed = time.monotonic() - self._started
        remaining = (state.max_steps - state.global_step) * elapsed / max(state.global_step, 1)
        self.progress.emit(
            {
                "event": "progress",
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": state.epoch,
                "loss": logs.get("loss", logs.get("train_loss")),  # the final log has the run's mean
                "learning_rate": logs.get("learning_rate"),
                "eta_seconds": round(remaining, 1),
            }
        )
