"""One training run, start to finish: config -> data -> baseline evaluation -> (mining) ->
sentence-transformers trainer with our losses -> evaluation -> registry.

Built on `SentenceTransformerTrainer`, which already does DDP (under `torchrun`), mixed
precision, checkpoints and resumption; Duet adds the losses, mining, evaluation on both
sides of training, tracking into MLflow and export with lineage.

`run_training` reads as that list: each step is a named stage function over a small
`RunContext` (config, run folder, model, data, where events go), so a stage can be read,
changed or swapped (bench/ swaps the trainer class) without holding the whole run in mind.
Events go through one `Progress` object, silent when nobody listens or off rank 0, so no
stage asks whether anyone does.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import TrainerCallback

from registry.manifest import AlphaScore, Compatibility, Interpolation, Manifest
from registry.store import ModelRegistry, ModelVersionInfo
from trainer.auto_recipe import Recipe, resolve_recipe
from trainer.best import BestTracker, EvaluationCallback, format_curve
from trainer.compat import CompatRun, pin_old_model
from trainer.compat import prepare as prepare_compat
from trainer.config import ConfigError, TrainConfig, load_config
from trainer.data import LoadedData, load_data
from trainer.evaluation import EvalSet, compare, evaluate, format_table
from trainer.export import Promotion, register, write_card
from trainer.interpolate import (
    blend_state_dicts,
    default_metric,
    format_sweep,
    main_metric,
    sweep,
    target_metric,
    verdict,
)
from trainer.losses import no_weight_decay_parameter_names
from trainer.losses_factory import build_loss
from trainer.mining import add_hard_negatives
from trainer.tables import clip
from trainer.tracking import Progress, ProgressFn, Tracker, TrackingCallback

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    report: str
    version: ModelVersionInfo | None = None
    promotion: Promotion | None = None
    mining: dict[str, Any] = field(default_factory=dict)
    interpolation: Interpolation | None = None  # WiSE-FT: the alpha saved and every alpha tried
    recipe: dict[str, Any] = field(default_factory=dict)  # epochs, learning_rate, eval_every trained with
    curve: list[dict[str, Any]] = field(default_factory=list)  # evaluations during training: step, epoch, metrics, best
    best_metric: str | None = None  # the metric that picked the best point of `curve`


class TrainingCancelledError(Exception):
    """Training stopped on request; a checkpoint of the last step was written, so it resumes."""

    def __init__(self, step: int) -> None:
        super().__init__(f"cancelled at step {step}")
        self.step = step


class CancelCallback(TrainerCallback):
    """Checks `should_stop` after every optimizer step: a cancelled job stops at the next
    step (not at the end of an epoch), saving a checkpoint first so it can be resumed."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.should_stop():
            control.should_save = True
            control.should_training_stop = True


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_base(
    ref: str, registry: ModelRegistry | None, allow_paths: bool = True
) -> tuple[str, str, Manifest | None]:
    """(loadable path or hub id, lineage label, the base's manifest if it came from the registry).
    Without `allow_paths` (jobs from the API) a reference is a registry model or a hub id, never
    a server folder: one that names a folder here is refused."""
    if allow_paths and Path(ref).expanduser().exists():
        return str(Path(ref).expanduser()), ref, None
    if registry is not None:
        from registry.names import parse_model_ref

        try:
            parsed = parse_model_ref(ref)
        except ValueError:
            parsed = None
        if parsed is not None and registry.has_model(parsed.name):
            info = registry.resolve(parsed)
            return str(info.path), info.ref, info.manifest
    if not allow_paths and (ref.startswith(("/", ".", "~")) or ".." in ref or Path(ref).exists()):
        # sentence-transformers would load a folder of that name before trying the hub
        raise ConfigError([f"base_model: {clip(ref)} is not a registry model, and server paths are not allowed"])
    return ref, ref, None  # a hub id: sentence-transformers downloads it (users have internet)


def freeze_towers(model: Any, towers: list[str]) -> None:
    """LiT-style: keep the named towers (Router routes) fixed while the others learn."""
    from sentence_transformers.base.modules.router import Router

    if not towers:
        return
    router = next((m for m in model.modules() if isinstance(m, Router)), None)
    if router is None:
        raise ValueError("freeze needs a text+image model with separate towers (a Router); this model has one tower")
    for tower in towers:
        for parameter in router.sub_modules[tower].parameters():  # every module of the route
            parameter.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: nothing left to train")


def eval_set(data: LoadedData) -> EvalSet:
    if data.kind == "graded":
        return EvalSet(
            name=data.name,
            kind="graded",
            a_inputs=data.load("anchor"),
            b_inputs=data.load("positive"),
            scores=np.array(data.column("score"), dtype=np.float64),
        )
    return EvalSet(
        name=data.name,
        kind="paired",
        a_inputs=data.load("anchor"),
        b_inputs=data.load("positive"),
        a_keys=data.column("anchor"),
        b_keys=data.column("positive"),
        a_modality=data.modalities["anchor"],
        b_modality=data.modalities["positive"],
    )


def encoder_fn(model: Any) -> Callable[[list[Any], str], np.ndarray]:
    def encode(inputs: list[Any], modality: str) -> np.ndarray:
        vectors: np.ndarray = model.encode(
            list(inputs), batch_size=64, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors

    return encode


def evaluate_all(model: Any, sets: list[EvalSet]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    encode = encoder_fn(model)
    for eval_data in sets:
        metrics.update(evaluate(encode, eval_data))
    return metrics


def router_mapping(model: Any, train_sets: list[LoadedData]) -> dict[str, Any]:
    """Dual encoders route by modality; the trainer still wants a route per column, so each
    column maps to its modality (the Router then picks the (None, modality) route)."""
    from sentence_transformers.base.modules.router import Router

    if not any(isinstance(m, Router) for m in model.children()):
        return {}
    per_set = {d.name: {c: d.modalities.get(c, "text") for c in d.columns if c != "score"} for d in train_sets}
    return next(iter(per_set.values())) if len(per_set) == 1 else per_set


def training_arguments(
    config: TrainConfig, run_dir: Path, has_graded: bool, routes: dict[str, Any], recipe: Recipe
) -> SentenceTransformerTrainingArguments:
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # launched by torchrun
    bf16 = config.precision == "bf16" or (config.precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    fp16 = config.precision == "fp16" or (config.precision == "auto" and cuda and not bf16)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return SentenceTransformerTrainingArguments(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        num_train_epochs=recipe.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=recipe.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a fraction of all steps (Transformers v5)
        lr_scheduler_type=config.scheduler,
        weight_decay=config.weight_decay,
        bf16=bf16,
        fp16=fp16,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=config.checkpoint_every_steps,
        save_total_limit=2,
        logging_steps=config.log_every_steps,
        report_to="none",
        # In-batch negatives must not contain a copy of the positive.
        batch_sampler=BatchSamplers.BATCH_SAMPLER if has_graded else BatchSamplers.NO_DUPLICATES,
        ddp_backend="gloo" if distributed and not cuda else None,
        router_mapping=routes,
        dataloader_drop_last=distributed,
        **loader_arguments(config, cuda),
    )


def loader_arguments(config: TrainConfig, cuda: bool) -> dict[str, Any]:
    """Background data loading on CUDA: measured on an H200 with MiniLM at batch 256, a third of
    each step was the main process tokenising the next batch while the GPU idled."""
    workers = config.dataloader_workers
    if workers is None:
        workers = min(4, max((os.cpu_count() or 1) - 1, 0)) if cuda else 0
    if workers == 0:
        return {"dataloader_num_workers": 0}
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the workers tokenise; no nested thread pools
    return {"dataloader_num_workers": workers, "dataloader_prefetch_factor": 4, "dataloader_persistent_workers": True}


def duet_trainer_class() -> type[SentenceTransformerTrainer]:
    """sentence-transformers' trainer, minus weight decay on the losses' learnable scalars
    (temperature, SigLIP bias): decay would pull them to meaningless values (CLIP excludes them)."""
    from sentence_transformers import SentenceTransformerTrainer

    class DuetTrainer(SentenceTransformerTrainer):
        def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
            skip = no_weight_decay_parameter_names(model)
            return [n for n in super().get_decay_parameter_names(model) if n not in skip]

    return DuetTrainer


LOSS_STATE = "duet_loss_state.pt"
COMPLETE_MARKER = "duet_checkpoint_complete"


def loss_state(loss: Any) -> dict[str, torch.Tensor]:
    """The loss's own learnable tensors (temperature, bias): not part of the model's weights."""
    model_names = {f"model.{n}" for n, _ in loss.model.named_parameters()} if hasattr(loss, "model") else set()
    return {n: p.detach().clone() for n, p in loss.named_parameters() if n not in model_names}


class LossStateCallback(TrainerCallback):
    """Checkpoints hold the model and optimizer; this adds the loss's learnable temperature,
    so a resumed run continues with the temperature it had, not the initial one."""

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            assert args.output_dir is not None  # training_arguments sets it
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            state_dict = loss_state(self.loss)
            if state_dict:
                torch.save(state_dict, folder / LOSS_STATE)
            # Last, after the trainer wrote everything: a process killed mid-save leaves a folder
            # without this marker, and resuming skips it for the previous complete checkpoint.
            (folder / COMPLETE_MARKER).write_text(str(state.global_step))


def restore_loss_state(loss: Any, checkpoint: str) -> None:
    path = Path(checkpoint) / LOSS_STATE
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        parameters = dict(loss.named_parameters())
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint that was written completely (a kill during a save leaves a partial
    folder behind: resuming from it would fail for good)."""

    def step(folder: Path) -> str:
        return folder.name.removeprefix("checkpoint-")

    folders = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if p.is_dir() and step(p).isdigit()]
    checkpoints = sorted(folders, key=lambda p: int(step(p)), reverse=True)
    marker = COMPLETE_MARKER
    if not any((p / marker).is_file() for p in checkpoints):
        marker = "trainer_state.json"  # checkpoints from before the marker: the trainer writes it last
    for folder in checkpoints:
        if (folder / marker).is_file():
            return str(folder)
        logger.warning("skipping %s: it was not written completely", folder)
    return None


@dataclass
class RunContext:
    """What the stages of one run share: the config, where it runs, the model being trained and
    its data, and where its events go. Made once by :func:`open_run`; only mining replaces
    `train_sets` (with the mined copies)."""

    config: TrainConfig
    run_dir: Path
    registry: ModelRegistry | None
    progress: Progress
    main: bool  # rank 0 (or not distributed): evaluates, tracks, saves and registers
    model: Any
    base_label: str
    base_manifest: Manifest | None
    train_sets: list[LoadedData]
    eval_sets: list[EvalSet]
    compat: CompatRun | None = None  # set by prepare_compatibility when the config asks for it
    base_source: str = ""  # what the base model was loaded from (a path or hub id): WiSE-FT reloads it
    retain_sets: list[EvalSet] = field(default_factory=list)  # interpolate.retain's own datasets
    target: str | None = None  # interpolate: the target metric key
    recipe: Recipe | None = None  # set by choose_recipe: the config's values with "auto" resolved
    best_metric: str | None = None  # set by choose_recipe when rank 0 evaluates during training
    best: BestTracker | None = None  # set by train_model when it evaluates during training


def run_training(
    config: TrainConfig,
    *,
    base_dir: Path | None,
    run_dir: Path,
    registry: ModelRegistry | None,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    confined: bool = False,
) -> TrainResult:
    """Train one config in `run_dir` (resuming from its last checkpoint when `resume`).
    `on_progress` receives stage, progress and evaluation events; `should_stop` is polled
    after every step and, once true, ends the run with `TrainingCancelledError`. `confined` (jobs
    from the API): data only from inside `base_dir`, the base model never a server path.
    On success the checkpoints are deleted (they only serve a resume), and so is the run's
    model folder once the registry holds its copy."""
    run = open_run(config, base_dir, run_dir, registry, on_progress=on_progress, confined=confined)
    before = evaluate_base(run)
    mining = mine_hard_negatives(run)
    choose_recipe(run, measured=before)
    before.update(prepare_compatibility(run, confined=confined))
    tracker = start_tracking(run)
    step = train_model(run, tracker, resume=resume, should_stop=should_stop)
    result = TrainResult(run_dir=run_dir, before=before, after={}, report="", mining=mining)
    if not run.main:
        return result
    result.recipe = run.recipe.as_dict() if run.recipe else {}
    if run.best is not None:
        result.curve, result.best_metric = run.best.curve, run.best.metric
    result.interpolation = interpolate_weights(run, tracker, step)
    result.after, result.report = evaluate_trained(run, tracker, before, step)
    if result.interpolation is not None:
        result.report += "\n\n" + format_sweep(result.interpolation)
    result.version, result.promotion = save_and_register(run, tracker, result)
    tracker.finish()
    prune_run(run_dir, keep_model=result.version is None)
    return result


def open_run(
    config: TrainConfig,
    base_dir: Path | None,
    run_dir: Path,
    registry: ModelRegistry | None,
    *,
    on_progress: ProgressFn | None,
    confined: bool,
) -> RunContext:
    """Seed, the base model (with any towers frozen) and the data; only rank 0 reports progress."""
    from sentence_transformers import SentenceTransformer
    from transformers import set_seed

    set_seed(config.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    source, base_label, base_manifest = resolve_base(config.base_model, registry, allow_paths=not confined)
    model = SentenceTransformer(source, device="cuda" if torch.cuda.is_available() else "cpu")
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    freeze_towers(model, list(config.freeze))

    train_sets = [load_data(spec, base_dir, confined=confined) for spec in config.train]
    eval_sets = [eval_set(load_data(spec, base_dir, confined=confined)) for spec in config.eval]
    retain_sets, target = interpolation_sets(config, base_dir, eval_sets, confined=confined)
    main = is_main_process()
    return RunContext(
        config=config,
        run_dir=run_dir,
        registry=registry,
        progress=Progress(on_progress if main else None),
        main=main,
        model=model,
        base_label=base_label,
        base_manifest=base_manifest,
        train_sets=train_sets,
        eval_sets=eval_sets,
        base_source=source,
        retain_sets=retain_sets,
        target=target,
    )


def interpolation_sets(
    config: TrainConfig, base_dir: Path | None, eval_sets: list[EvalSet], *, confined: bool
) -> tuple[list[EvalSet], str | None]:
    """`interpolate`: its retain datasets (those not named after an eval set) and the target metric,
    checked against the loaded sets before training, so a wrong key fails now, not after it."""
    spec = config.interpolate
    if spec is None:
        return [], None
    retain = [eval_set(load_data(s, base_dir, confined=confined)) for s in spec.retain if not isinstance(s, str)]
    promote = config.output.promote.metric if config.output.promote else None
    try:
        return retain, target_metric(spec, promote, eval_sets)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


def evaluate_base(run: RunContext) -> dict[str, float]:
    """The base model's metrics on the evaluation sets (rank 0 only; empty without sets)."""
    run.progress.stage("evaluating base model")
    before = evaluate_all(run.model, run.eval_sets) if run.main and run.eval_sets else {}
    run.progress.evaluation("before", before)
    return before


def mine_hard_negatives(run: RunContext) -> dict[str, Any]:
    """When mining is on: pair datasets get hard negatives mined with the base model. Returns
    each mined set's report by dataset name."""
    reports: dict[str, Any] = {}
    if not run.config.mining.enabled:
        return reports
    mined = []
    for data in run.train_sets:
        if data.kind == "pairs":
            data, report = add_hard_negatives(data, encoder_fn(run.model), run.config.mining)
            reports[data.name] = report.__dict__
        mined.append(data)
    run.train_sets = mined
    return reports


def choose_recipe(run: RunContext, measured: dict[str, float]) -> Recipe:
    """Resolve `epochs`, `learning_rate` and `eval_every` ("auto": trainer/auto_recipe.py) from the
    training rows, loss, batch size and model size, and announce what was chosen. With evaluation
    during training, the best metric must be one the base evaluation `measured` (rank 0)."""
    config = run.config
    recipe = resolve_recipe(
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        eval_every=config.eval_every,
        rows=sum(len(d) for d in run.train_sets),
        loss=config.loss.name,
        batch_size=config.batch_size,
        parameters=sum(p.numel() for p in run.model.parameters()),
        has_eval=bool(run.eval_sets),
    )
    if recipe.eval_every is not None and run.main and run.eval_sets:
        run.best_metric = best_metric(config, run.eval_sets, measured)
    for reason in recipe.reasons:
        logger.info("auto: %s", reason)
    run.progress.emit({"event": "recipe", **recipe.as_dict()})
    run.recipe = recipe
    return recipe


def best_metric(config: TrainConfig, eval_sets: list[EvalSet], measured: dict[str, float]) -> str:
    """`best_metric`, else the promotion metric when the evaluation sets measure it, else the
    first set's main metric. A `best_metric` they do not measure is a ConfigError naming those they do."""
    if config.best_metric is not None:
        if config.best_metric not in measured:
            known = ", ".join(sorted(measured)) or "none"
            raise ConfigError([f"best_metric {clip(config.best_metric)} is not measured; use one of: {known}"])
        return config.best_metric
    promote = config.output.promote.metric if config.output.promote else None
    return default_metric(promote, measured, eval_sets)


def evaluate_in_eval_mode(run: RunContext) -> dict[str, float]:
    """`evaluate_all` in the middle of training: dropout off while encoding, back on after."""
    training = run.model.training
    run.model.eval()
    try:
        return evaluate_all(run.model, run.eval_sets)
    finally:
        run.model.train(training)


def prepare_compatibility(run: RunContext, *, confined: bool) -> dict[str, float]:
    """`compatible_with`: pin the old model, embed the training rows (and evaluation sets) with it
    once, then let it go. Returns the base model's cross-model metrics (the "without" row)."""
    spec = run.config.compatible_with
    if spec is None:
        return {}
    from sentence_transformers import SentenceTransformer

    run.progress.stage("embedding the training data with the old model")
    old = pin_old_model(spec, run.run_dir, lambda ref: resolve_base(ref, run.registry, allow_paths=not confined))
    old_model = SentenceTransformer(old.source, device="cuda" if torch.cuda.is_available() else "cpu").eval()
    old_model.requires_grad_(False)
    run.compat = prepare_compat(
        spec,
        old,
        old_encode=encoder_fn(old_model),
        old_dim=old_model.get_embedding_dimension(),
        new_encode=encoder_fn(run.model),
        new_dim=run.model.get_embedding_dimension(),
        train_sets=run.train_sets,
        eval_sets=run.eval_sets if run.main else [],
        cache_dir=run.run_dir / "compat",
        temperature=run.config.loss.temperature,
    )
    del old_model
    return run.compat.metrics(encoder_fn(run.model), run.eval_sets) if run.main else {}


def start_tracking(run: RunContext) -> Tracker:
    """The run's MLflow run (rank 0 with a registry; a no-op tracker otherwise)."""
    registry = run.registry
    resolved = {k: v for k, v in run.recipe.as_dict().items() if k != "reasons"} if run.recipe else {}
    return Tracker(
        registry.tracking_uri if (registry and run.main) else None,
        f"train-{run.config.output.name}",
        {**run.config.model_dump(mode="json"), "resolved": resolved},
        artifact_location=registry.artifact_location if registry else None,
    )


def train_model(run: RunContext, tracker: Tracker, *, resume: bool, should_stop: Callable[[], bool] | None) -> int:
    """sentence-transformers' trainer with our loss, from the last complete checkpoint when
    `resume`. Returns the global step reached; a failure marks the tracked run FAILED, a
    cancellation KILLED (then raises `TrainingCancelledError`)."""
    loss = build_loss(run.config.loss, run.model)
    train_sets = run.train_sets
    datasets = {d.name: d.to_hf() for d in train_sets}
    if run.compat is not None:
        loss, datasets = run.compat.wrap(loss, train_sets)
    assert run.recipe is not None  # choose_recipe ran
    evaluation = []
    if run.best_metric is not None:
        run.best = BestTracker(
            run.best_metric,
            lambda: evaluate_in_eval_mode(run),
            lambda: best_snapshot(run.model, loss),
            progress=run.progress,
            tracker=tracker,
        )
        evaluation.append(EvaluationCallback(run.best, run.recipe.eval_every, run.main))
    trainer = duet_trainer_class()(
        model=run.model,
        args=training_arguments(
            run.config,
            run.run_dir,
            any(d.kind == "graded" for d in train_sets),
            router_mapping(run.model, train_sets),
            run.recipe,
        ),
        train_dataset=next(iter(datasets.values())) if len(datasets) == 1 else datasets,
        loss=loss,
        callbacks=[
            TrackingCallback(tracker, run.progress),
            *evaluation,  # before LossStateCallback: it marks a checkpoint complete, last
            LossStateCallback(loss),
            *([CancelCallback(should_stop)] if should_stop else []),
        ],
    )
    checkpoint = last_checkpoint(run.run_dir) if resume else None
    if checkpoint:
        restore_loss_state(loss, checkpoint)
        if run.best is not None:
            run.best.load(Path(checkpoint))
        run.progress.stage(f"resuming from {Path(checkpoint).name}")
    run.progress.stage("training")
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    except BaseException:
        tracker.finish("FAILED")
        raise
    step: int = trainer.state.global_step
    if should_stop is not None and should_stop():
        tracker.finish("KILLED")
        raise TrainingCancelledError(step)
    restore_best(run, loss)
    return step


def best_snapshot(model: Any, loss: Any) -> dict[str, dict[str, torch.Tensor]]:
    """A CPU copy of the weights that make the trained model: the model's and the loss's own."""
    return {
        "model": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "loss": {k: v.to("cpu") for k, v in loss_state(loss).items()},
    }


def restore_best(run: RunContext, loss: Any) -> None:
    """Load the best evaluation's weights back, so they are what is evaluated, saved and registered."""
    if run.best is None:
        return
    best = run.best.restore(run.model, loss)
    if best is not None:
        run.progress.stage(f"keeping the best evaluation: step {best['step']} ({run.best.metric})")


def interpolate_weights(run: RunContext, tracker: Tracker, step: int) -> Interpolation | None:
    """WiSE-FT (`interpolate`): blend the base weights (reloaded from where the run loaded them)
    with the fine-tuned ones for each alpha to try, score the target and retain sets, and leave
    the chosen blend in `run.model`, so it is what the final evaluation measures and what is saved."""
    spec = run.config.interpolate
    if spec is None:
        return None
    from sentence_transformers import SentenceTransformer

    run.progress.stage("interpolating weights (WiSE-FT): loading the base weights")
    base = SentenceTransformer(run.base_source, device="cpu").state_dict()
    tuned = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
    named = [s for s in spec.retain if isinstance(s, str)]
    retain_sets = [s for s in run.eval_sets if s.name in named] + run.retain_sets
    target_sets = [s for s in run.eval_sets if run.target is not None and run.target.startswith(s.name + "/")]
    sets = target_sets + retain_sets
    retain_keys = [main_metric(s) for s in retain_sets]

    def measure(alpha: float) -> AlphaScore:
        run.progress.stage(f"interpolating weights (WiSE-FT): alpha {alpha:g}")
        run.model.load_state_dict(blend_state_dicts(base, tuned, alpha).state)
        metrics = evaluate_all(run.model, sets)
        run.progress.evaluation(f"alpha {alpha:g}", metrics, alpha=alpha)
        target = metrics.get(run.target) if run.target is not None else None
        return AlphaScore(alpha=alpha, target=target, retain={k: metrics[k] for k in retain_keys})

    record = sweep(spec, measure, metric=run.target, can_measure=bool(sets))
    final = blend_state_dicts(base, tuned, record.alpha)
    run.model.load_state_dict(final.state)
    record.kept_from_finetuned = final.kept_from_finetuned
    if not record.qualified or (record.mode == "auto" and record.alpha == 0.0):
        logger.warning("WiSE-FT: %s", verdict(record))
    tracker.log({"interpolate/alpha": record.alpha}, step)
    return record


def evaluate_trained(
    run: RunContext, tracker: Tracker, before: dict[str, float], step: int
) -> tuple[dict[str, float], str]:
    """The trained model's metrics (also logged to the tracker at `step`) and the before/after
    report of the model card."""
    run.progress.stage("evaluating trained model")
    after = evaluate_all(run.model, run.eval_sets) if run.eval_sets else {}
    if run.compat is not None:
        after.update(run.compat.metrics(encoder_fn(run.model), run.eval_sets))
    run.progress.evaluation("after", after)
    tracker.log({f"eval/{k}": v for k, v in after.items()}, step)
    report = format_table(compare(before, after)) if run.eval_sets else "(no evaluation sets)"
    return after, report + recipe_report(run)


def recipe_report(run: RunContext) -> str:
    """What "auto" chose and the evaluations during training (best marked), for the card and the job."""
    text = ""
    if run.recipe is not None and run.recipe.reasons:
        text += "\n\nChosen automatically:\n\n" + "\n".join(f"- {r}" for r in run.recipe.reasons)
    if run.best is not None and run.best.curve:
        best = run.best.best
        kept = f"step {best['step']}" if best else "the last step"
        text += f"\n\nEvaluation during training (kept: {kept}, best on {run.best.metric}):\n\n"
        text += format_curve(run.best.curve, run.best.metric)
    return text


def save_and_register(
    run: RunContext, tracker: Tracker, result: TrainResult
) -> tuple[ModelVersionInfo | None, Promotion | None]:
    """Save the model with its card into the run folder, then, with a registry, register it
    (and promote it if its promotion rule says so). (None, None) without a registry."""
    config = run.config
    model_dir = run.run_dir / "model"
    run.model.save(str(model_dir))
    map_file = run.compat.save_map(model_dir) if run.compat is not None else None
    write_card(model_dir, config, result.report, run.base_label, learning_rate=result.recipe.get("learning_rate"))
    current = current_holder_metrics(config, run.registry, run.eval_sets, run.progress)
    if run.registry is None:
        return None, None
    return register(
        run.registry,
        run.model,
        model_dir,
        config,
        base_model=run.base_label,
        base_manifest=run.base_manifest,
        dataset_hashes={d.name: d.sha256 for d in run.train_sets},
        before=result.before,
        after=result.after,
        run_id=tracker.run_id,
        current=current,
        compatible_with=compatibility_claims(run, result.after, map_file),
        interpolation=result.interpolation,
        resolved=resolved_record(result),
    )


def resolved_record(result: TrainResult) -> dict[str, Any]:
    """The manifest's record of what the run trained with beyond its config: the recipe ("auto"
    resolved) and, with evaluation during training, the point kept and the curve's metric values."""
    record = dict(result.recipe)
    if result.best_metric is not None:
        metric = result.best_metric
        record["best_metric"] = metric
        record["curve"] = [
            {"step": p["step"], "epoch": p["epoch"], metric: p["metrics"].get(metric), "best": p["best"]}
            for p in result.curve
        ]
    return record


def compatibility_claims(run: RunContext, after: dict[str, float], map_file: str | None) -> list[Compatibility]:
    """The manifest's `compatible_with`: the pinned old version with this run's cross-model numbers
    (none when the old model is not a registry version: it is measured, not claimed)."""
    record = run.compat.record(after, map_file) if run.compat is not None else None
    return [record] if record is not None else []


def prune_run(run_dir: Path, keep_model: bool) -> None:
    """After success: checkpoints (weights plus optimizer state, several times the model's
    size) only serve a resume, which a finished run never needs; the model folder is a copy
    of what the registry now holds (kept when nothing was registered: it is the result)."""
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if not keep_model:
        shutil.rmtree(run_dir / "model", ignore_errors=True)


def current_holder_metrics(
    config: TrainConfig, registry: ModelRegistry | None, eval_sets: list[EvalSet], progress: Progress
) -> dict[str, float] | None:
    """For `promote.compare_to: current`: the version that holds the alias now, evaluated on
    this run's evaluation sets (None when nothing holds it yet)."""
    spec = config.output.promote
    if spec is None or spec.compare_to != "current" or registry is None or not eval_sets:
        return None
    from sentence_transformers import SentenceTransformer

    from registry.errors import RegistryError
    from registry.names import ModelRef

    try:
        holder = registry.resolve(ModelRef(config.output.name, alias=spec.alias))
    except (RegistryError, LookupError):
        return None
    progress.stage(f"evaluating the current {holder.ref} for promotion")
    model = SentenceTransformer(str(holder.path), device="cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate_all(model, eval_sets)
    progress.evaluation("current", metrics, model=holder.ref)
    return metrics


def train_from_file(
    path: Path,
    *,
    runs_dir: Path,
    registry: ModelRegistry | None,
    resume: bool = True,
    on_progress: ProgressFn | None = None,
) -> TrainResult:
    """Load and validate a config file, then run it in `runs_dir/<name>-<config hash>` (so
    running the same config again resumes it from its last checkpoint)."""
    config = load_config(path)
    run_dir = runs_dir / f"{config.output.name}-{config.fingerprint()}"
    return run_training(
        config, base_dir=path.parent, run_dir=run_dir, registry=registry, resume=resume, on_progress=on_progress
    )
