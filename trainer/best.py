"""Evaluation during training (`eval_every`) and the best evaluation's weights kept as the result.

`BestTracker` holds the curve (step, epoch, metrics, which point is best) and a CPU copy of the
weights (the model's and the loss's own learnable tensors, e.g. a compat map) at the best point on
`best_metric`. `EvaluationCallback` evaluates with the run's own `evaluate_all` on rank 0 after the
optimizer steps `eval_every` names (each epoch's last step, or every N steps, and always the last
step), and writes the curve and the best weights into each checkpoint the trainer saves, so a
resumed run continues with the curve and best-so-far it had at that checkpoint (points after it are
evaluated again, as the steps after it are trained again). At the end the run loads the best weights
back (`restore`), so what is evaluated, saved and registered is the best point, not the last.

Only rank 0 evaluates (under DDP the other ranks wait for it at the next step's all-reduce); a
copy of the state dict on the CPU is a model's size again in host memory (MiniLM: ~90 MB).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from trainer.auto_recipe import EvalEvery
from trainer.tracking import Progress, Tracker

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)

CURVE_FILE = "duet_eval_curve.json"
BEST_FILE = "duet_best_weights.pt"
LOWER_IS_BETTER = ("alignment", "uniformity", "modality_gap")  # last part of the key: smaller is better


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1].startswith(LOWER_IS_BETTER)


class BestTracker:
    """The curve of evaluations during training and the weights of the best one."""

    def __init__(
        self,
        metric: str,
        evaluate: Callable[[], dict[str, float]],
        snapshot: Callable[[], dict[str, dict[str, torch.Tensor]]],
        *,
        progress: Progress | None = None,
        tracker: Tracker | None = None,
    ) -> None:
        """`evaluate()`: metrics of the model as it is now; `snapshot()`: its weights, as
        {"model": state dict, "loss": the loss's own tensors}, copied to the CPU."""
        self.metric = metric
        self._evaluate = evaluate
        self._snapshot = snapshot
        self.progress = progress or Progress()
        self.tracker = tracker
        self.curve: list[dict[str, Any]] = []
        self.best_state: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def best(self) -> dict[str, Any] | None:
        return next((p for p in self.curve if p["best"]), None)

    def better(self, value: float, than: float) -> bool:
        return value < than if lower_is_better(self.metric) else value > than

    def evaluate(self, step: int, epoch: float | None) -> dict[str, Any]:
        """Evaluate now, add the point to the curve, keep the weights if it is the best so far."""
        metrics = self._evaluate()
        if self.metric not in metrics:
            known = ", ".join(sorted(metrics)) or "none"
            raise ValueError(f"best_metric {self.metric!r} was not measured (measured: {known})")
        value = metrics[self.metric]
        best = self.best
        improved = math.isfinite(value) and (best is None or self.better(value, best["metrics"][self.metric]))
        point = {"step": step, "epoch": round(epoch, 4) if epoch is not None else None, "metrics": metrics}
        if improved:
            for earlier in self.curve:
                earlier["best"] = False
            self.best_state = self._snapshot()
        point["best"] = improved
        self.curve.append(point)
        self.progress.evaluation(
            "during", metrics, step=step, epoch=point["epoch"], best=improved, best_metric=self.metric
        )
        if self.tracker is not None:
            self.tracker.log({f"eval/{k}": v for k, v in metrics.items()}, step)
        logger.info("step %d: %s = %.4f%s", step, self.metric, value, " (best so far)" if improved else "")
        return point

    def save(self, folder: Path) -> None:
        """The curve and the best weights into a checkpoint folder."""
        (folder / CURVE_FILE).write_text(json.dumps({"metric": self.metric, "curve": self.curve}))
        if self.best_state is not None:
            torch.save(self.best_state, folder / BEST_FILE)

    def load(self, folder: Path) -> None:
        """What `save` wrote into `folder` (nothing there: the run had not evaluated yet)."""
        path = folder / CURVE_FILE
        if not path.is_file():
            return
        saved = json.loads(path.read_text())
        if saved.get("metric") != self.metric:
            logger.warning("checkpoint curve was on %s, not %s: starting a new curve", saved.get("metric"), self.metric)
            return
        self.curve = saved["curve"]
        best_path = folder / BEST_FILE
        self.best_state = torch.load(best_path, map_location="cpu", weights_only=True) if best_path.is_file() else None
        if self.best_state is None:
            for point in self.curve:
                point["best"] = False  # the weights are gone: the curve goes on, the best starts again

    def restore(self, model: torch.nn.Module, loss: torch.nn.Module | None = None) -> dict[str, Any] | None:
        """Load the best weights into `model` (and `loss`'s own tensors); the best point, or None
        when nothing was evaluated."""
        if self.best_state is None:
            return None
        model.load_state_dict(self.best_state["model"])
        if loss is not None and self.best_state.get("loss"):
            parameters = dict(loss.named_parameters())
            with torch.no_grad():
                for name, value in self.best_state["loss"].items():
                    parameters[name].copy_(value)
        return self.best


def evaluation_due(every: EvalEvery, step: int, epoch: float | None, max_steps: int) -> bool:
    """Whether the optimizer step just finished ends an evaluation interval (the last one always does)."""
    if every is None:
        return False
    if step >= max_steps:
        return True
    if every == "epoch":
        return epoch is not None and epoch >= 1 and abs(epoch - round(epoch)) < 1e-9
    return step % every == 0


class EvaluationCallback(TrainerCallback):
    """Evaluates on rank 0 when `evaluation_due`, and adds the curve and best weights to checkpoints.
    Put it before the callback that writes the checkpoint-complete marker."""

    def __init__(self, best: BestTracker, every: EvalEvery, main: bool) -> None:
        self.best = best
        self.every = every
        self.main = main

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not (self.main and state.is_world_process_zero):
            return
        if self.best.curve and self.best.curve[-1]["step"] >= state.global_step:
            return  # evaluated at this step already (a resume from the final checkpoint)
        if evaluation_due(self.every, state.global_step, state.epoch, state.max_steps):
            self.best.evaluate(state.global_step, state.epoch)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.main and state.is_world_process_zero:
            assert args.output_dir is not None  # training_arguments sets it
            self.best.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")


def format_curve(curve: list[dict[str, Any]], metric: str) -> str:
    """The curve as a markdown table for the model card and the report."""
    if not curve:
        return ""
    lines = [f"| step | epoch | {metric} | best |", "|---|---|---|---|"]
    for point in curve:
        epoch = "" if point["epoch"] is None else f"{point['epoch']:g}"
        value = point["metrics"].get(metric, float("nan"))
        lines.append(f"| {point['step']} | {epoch} | {value:.4f} | {'best' if point['best'] else ''} |")
    return "\n".join(lines)
