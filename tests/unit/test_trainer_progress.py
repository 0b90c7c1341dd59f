"""The run's one progress notifier: what it passes on, and that a silent one drops everything."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from trainer.tracking import Progress, Tracker, TrackingCallback


def test_progress_events():
    events: list[dict[str, Any]] = []
    progress = Progress(events.append)
    progress.stage("training")
    progress.evaluation("before", {"sts/spearman": 80.0})
    progress.evaluation("after", {})  # a run without evaluation sets reports nothing
    progress.evaluation("current", {"sts/spearman": 81.0}, model="m@1")
    assert events == [
        {"event": "stage", "stage": "training"},
        {"event": "evaluation", "when": "before", "metrics": {"sts/spearman": 80.0}},
        {"event": "evaluation", "when": "current", "metrics": {"sts/spearman": 81.0}, "model": "m@1"},
    ]


def test_silent_progress_drops_events():
    progress = Progress()
    progress.stage("training")
    progress.evaluation("before", {"x": 1.0})
    progress.emit({"event": "progress"})  # nothing to assert but that nothing fails


def _state(step: int) -> SimpleNamespace:
    return SimpleNamespace(is_world_process_zero=True, global_step=step, max_steps=10, epoch=0.5)


def test_tracking_callback_forwards_logs():
    events: list[dict[str, Any]] = []
    callback = TrackingCallback(Tracker(None, "run", {}), Progress(events.append))
    callback.on_log(None, _state(5), None, logs={"loss": 0.5, "learning_rate": 1e-5})
    callback.on_log(None, _state(6), None, logs={})  # empty logs: nothing
    assert len(events) == 1
    event = events[0]
    assert {k: event[k] for k in ("event", "step", "max_steps", "epoch", "loss", "learning_rate")} == {
        "event": "progress",
        "step": 5,
        "max_steps": 10,
        "epoch": 0.5,
        "loss": 0.5,
        "learning_rate": 1e-5,
    }
    assert event["eta_seconds"] >= 0


def test_tracking_callback_without_listener():
    callback = TrackingCallback(Tracker(None, "run", {}))
    callback.on_log(None, _state(5), None, logs={"loss": 0.5})
