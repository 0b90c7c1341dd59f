"""`epochs: auto`, `learning_rate: auto` and `eval_every: auto`: values for people who do not tune.

A pure function of what is known when training starts (training rows, data kind, loss, batch size,
the model's parameter count, whether there are evaluation sets), so the choice can be read, tested
and recorded. The run resolves it once (`trainer.run.resolve_run_recipe`) and records the result in
its events, model card, manifest and `TrainResult`, so a user sees what "auto" meant.

Why these rules:

* Epochs from the data size. Hosted fine-tuning APIs do the same: OpenAI's fine-tuning picks
  `n_epochs` from the dataset's size when it is "auto" (its documentation gives no formula; its
  earlier fixed default was 4 epochs, and small sets get several passes while large ones get
  fewer). Here a run aims at about :data:`TARGET_EXAMPLES` training examples seen, in whole epochs
  between :data:`MIN_EPOCHS` and :data:`MAX_EPOCHS`: a pretrained sentence encoder moves within a
  few hundred to a thousand optimizer steps (the README's STS-B recipe, 5,749 rows at batch 16, is
  ~360 steps per epoch), and a tiny set seen once is not learnt. More passes risk overfitting, which
  is why "auto" comes with evaluation each epoch and the best epoch kept (`trainer.best`).
* Learning rate 2e-5 as the base: sentence-transformers' trainer default, the value its examples use
  for MiniLM/MPNet-size encoders with cosine-similarity regression and MultipleNegativesRankingLoss,
  and within the BERT paper's fine-tuning grid (2e-5 .. 5e-5). Models above
  :data:`LARGE_MODEL_PARAMETERS` get half (large encoders are commonly fine-tuned at 1e-5; they are
  less stable at higher rates). Contrastive losses with batches above :data:`BASE_BATCH` scale it by
  the square root of the batch ratio (the square-root scaling rule for Adam, Malladi et al. 2022,
  "On the SDEs and Scaling Rules for Adaptive Gradient Algorithms"), capped at
  :data:`MAX_AUTO_LEARNING_RATE`: a larger batch averages more in-batch negatives per gradient, so
  the gradient is less noisy and tolerates a larger step. Graded losses (regression onto scores)
  are not scaled.
* Evaluation each epoch when there are evaluation sets (none without): the cheapest cadence that
  still lets the best epoch be kept; a one-epoch run evaluates once, at its end.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AUTO = "auto"
TARGET_EXAMPLES = 10_000
MIN_EPOCHS = 1
MAX_EPOCHS = 4
BASE_LEARNING_RATE = 2e-5
BASE_BATCH = 64
LARGE_MODEL_PARAMETERS = 200_000_000
MAX_AUTO_LEARNING_RATE = 1e-4
GRADED_LOSSES = ("cosent", "cosine")

EvalEvery = Literal["epoch"] | int | None  # resolved: each epoch, every N optimizer steps, or never


@dataclass(frozen=True)
class Recipe:
    """What a run trains with after "auto" is resolved; `chosen` names the fields auto decided and
    `reasons` says why, one line each (for the card and the events)."""

    epochs: float
    learning_rate: float
    eval_every: EvalEvery
    chosen: tuple[str, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["chosen"] = list(self.chosen)
        data["reasons"] = list(self.reasons)
        return data


def auto_epochs(rows: int) -> int:
    """Whole epochs so that about TARGET_EXAMPLES rows are seen, within [MIN_EPOCHS, MAX_EPOCHS]:
    never increasing with the data size."""
    if rows <= 0:
        raise ValueError(f"epochs auto needs at least one training row, got {rows}")
    return max(MIN_EPOCHS, min(MAX_EPOCHS, math.ceil(TARGET_EXAMPLES / rows)))


def auto_learning_rate(loss: str, batch_size: int, parameters: int | None = None) -> float:
    """2e-5, halved for large models, scaled by sqrt(batch / 64) for contrastive losses above
    batch 64 (capped at MAX_AUTO_LEARNING_RATE); see the module docstring."""
    if batch_size <= 0:
        raise ValueError(f"learning_rate auto needs a positive batch_size, got {batch_size}")
    if parameters is not None and parameters < 0:
        raise ValueError(f"learning_rate auto needs a parameter count >= 0, got {parameters}")
    rate = BASE_LEARNING_RATE
    if parameters is not None and parameters > LARGE_MODEL_PARAMETERS:
        rate /= 2
    if loss not in GRADED_LOSSES and batch_size > BASE_BATCH:
        rate *= math.sqrt(batch_size / BASE_BATCH)
    return min(rate, MAX_AUTO_LEARNING_RATE)


def resolve_recipe(
    *,
    epochs: float | str,
    learning_rate: float | str,
    eval_every: int | str,
    rows: int,
    loss: str,
    batch_size: int,
    parameters: int | None = None,
    has_eval: bool,
) -> Recipe:
    """The config's values with each "auto" replaced; numeric values pass through unchanged.
    `eval_every`: "auto", "epoch", "none" or a step count."""
    chosen: list[str] = []
    reasons: list[str] = []
    if epochs == AUTO:
        resolved_epochs: float = auto_epochs(rows)
        chosen.append("epochs")
        reasons.append(
            f"epochs {resolved_epochs}: about {TARGET_EXAMPLES} examples seen over {rows} training rows "
            f"(between {MIN_EPOCHS} and {MAX_EPOCHS} epochs)"
        )
    else:
        resolved_epochs = float(epochs)
    if learning_rate == AUTO:
        resolved_rate = auto_learning_rate(loss, batch_size, parameters)
        chosen.append("learning_rate")
        reasons.append(f"learning_rate {resolved_rate:.3g}: {_rate_reason(loss, batch_size, parameters)}")
    else:
        resolved_rate = float(learning_rate)
    resolved_eval: EvalEvery
    if eval_every == AUTO:
        resolved_eval = "epoch" if has_eval else None
        chosen.append("eval_every")
        reasons.append(
            "eval_every epoch: the best epoch on the evaluation sets is kept"
            if has_eval
            else "eval_every none: no evaluation sets"
        )
    elif eval_every == "none":
        resolved_eval = None
    elif eval_every == "epoch":
        resolved_eval = "epoch"
    elif isinstance(eval_every, int) and not isinstance(eval_every, bool) and eval_every > 0:
        resolved_eval = eval_every
    else:
        raise ValueError(f"eval_every must be 'auto', 'epoch', 'none' or a positive step count, not {eval_every!r}")
    return Recipe(resolved_epochs, resolved_rate, resolved_eval, tuple(chosen), tuple(reasons))


def _rate_reason(loss: str, batch_size: int, parameters: int | None) -> str:
    parts = [f"base {BASE_LEARNING_RATE:g}"]
    if parameters is not None and parameters > LARGE_MODEL_PARAMETERS:
        parts.append(f"halved for {parameters / 1e6:.0f}M parameters")
    if loss not in GRADED_LOSSES and batch_size > BASE_BATCH:
        parts.append(f"x sqrt({batch_size}/{BASE_BATCH}) for {loss} at batch {batch_size}")
        if auto_learning_rate(loss, batch_size, parameters) == MAX_AUTO_LEARNING_RATE:
            parts.append(f"capped at {MAX_AUTO_LEARNING_RATE:g}")
    return ", ".join(parts)
