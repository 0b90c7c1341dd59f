"""The one typed training config: a YAML or JSON file, or the body of the jobs API.

Validated once, before any work starts, and never mutated. Every problem is collected and
reported together (`ConfigError.problems`), so a user fixes a config in one go instead of
discovering its mistakes one run at a time. Derived values (paths resolved relative to the
config file, the run name) live in `ResolvedConfig`, not in the config itself.

Bounds here are sanity limits for any caller (a finite number, no billion-step run); the
service applies its own, tighter limits to API callers (`service.routes.jobs`). A config
parsed `confined` (every job the API accepts) may name data only inside its base folder:
references are joined to it, never `~`- or variable-expanded, and the real path (symbolic
links followed) must stay inside it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import ErrorDetails

from trainer import auto_recipe
from trainer.tables import clip

DatasetKind = Literal["pairs", "triplets", "graded", "texts", "multi_positive"]
LossName = Literal["infonce", "sigmoid", "debiased", "hn_nce", "cwcl", "moco", "multi_positive", "cosent", "cosine"]
# Which losses accept which data: graded pairs need a regression-style loss or CWCL's soft targets;
# the contrastive losses need (anchor, positive[, negatives...]) rows. "texts" become SimCSE pairs
# (t, t). Rows with a list of positives need the loss that reads several positives per anchor.
_CONTRASTIVE = ("infonce", "sigmoid", "debiased", "hn_nce", "cwcl", "moco")
LOSSES_FOR_KIND: dict[str, tuple[str, ...]] = {
    "pairs": _CONTRASTIVE,
    "triplets": _CONTRASTIVE,
    "texts": _CONTRASTIVE,
    "graded": ("cosent", "cosine", "cwcl"),
    "multi_positive": ("multi_positive",),
}
CACHED_LOSSES = ("infonce", "moco")
MAX_QUEUE = 262_144  # 2 queues x 262k x 1024-d float32 = 2 GiB: the most any caller may ask for

# The most `epochs: auto` may choose: what the jobs API counts an auto run as against its epoch limit.
AUTO_MAX_EPOCHS = auto_recipe.MAX_EPOCHS


class ConfigError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid training config:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class _Strict(BaseModel):
    # No Infinity or NaN anywhere: JSON parsers accept them, and `epochs: Infinity` would only
    # fail once the job runs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Sanity limits for any caller; the service's tighter ones are settings (DUET_JOB_MAX_*).
MAX_BATCH_SIZE = 65_536
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000_000
MAX_SEQ_LENGTH = 65_536
MAX_COLUMNS = 64


class DatasetSpec(_Strict):
    """One data file. Columns are mapped onto roles: anchor, positive, negative(s), score."""

    path: str = Field(description="JSONL, CSV/TSV, Parquet, or an STS-benchmark file; relative to the config.")
    kind: DatasetKind = "pairs"
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "sts"] = "auto"
    anchor: str = Field(default="anchor", description="Column of the anchor (query, caption, sentence 1).")
    positive: str = Field(default="positive", description="Column of the positive (document, image, sentence 2).")
    negatives: list[str] = Field(
        default_factory=list, max_length=MAX_COLUMNS, description="Columns of explicit hard negatives."
    )
    score: str = Field(default="score", description="Column of the graded score (graded pairs only).")
    max_positives: int | None = Field(
        default=None,
        gt=0,
        le=MAX_COLUMNS,
        description="multi_positive: positives per training example (the 'positive' column holds a list); a row "
        "with more is split into several examples, one with fewer is padded and masked. Default: the most any "
        "row has.",
    )
    score_max: float | None = Field(default=None, gt=0, description="Scores are divided by this (STS: 5).")
    limit: int | None = Field(default=None, gt=0, le=10**12, description="Use only the first N rows.")
    skip_bad_rows: bool = Field(default=False, description="Count and skip bad rows instead of failing.")
    name: str | None = Field(default=None, description="Name in metric keys; default: the file stem.")
    same_content: list[str] = Field(
        default_factory=list,
        max_length=MAX_COLUMNS,
        description="Evaluation: rows equal in these columns describe the same thing, so their items count as "
        "relevant to each other (e.g. colour, shape, size, position of the synthetic set).",
    )


class LossSpec(_Strict):
    name: LossName = "infonce"
    temperature: float = Field(default=0.05, gt=0, le=1, description="Initial temperature (1 / logit scale).")
    learnable_temperature: bool = True
    max_logit_scale: float = Field(default=100.0, gt=1, le=10_000)
    symmetric: bool = Field(default=True, description="InfoNCE in both directions (CLIP).")
    tau_plus: float = Field(default=0.1, ge=0, lt=1, description="Debiased loss: class prior of false negatives.")
    sigmoid_bias: float = -10.0
    cached: bool = Field(default=False, description="GradCache: large effective batches in little memory.")
    mini_batch_size: int = Field(
        default=32, gt=0, le=MAX_BATCH_SIZE, description="Chunk size of the cached forward passes."
    )
    gather_across_devices: bool = Field(default=False, description="Negatives from every process, with gradients.")
    matryoshka_dims: list[Annotated[int, Field(gt=0, le=MAX_SEQ_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_COLUMNS, description="Also train these prefix lengths."
    )
    beta: float = Field(
        default=0.5, ge=0, le=100, description="hn_nce: hardness; negatives weighted by exp(beta * logit), 0 = InfoNCE."
    )
    cwcl_reference: Literal["anchor", "positive"] = Field(
        default="positive",
        description="cwcl on pairs: the column whose intra-modal similarity gives the soft targets (the frozen "
        "tower's, with freeze). Graded data uses its scores instead.",
    )
    cwcl_target_temperature: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="cwcl on pairs: targets softmax(cosine / this) of the reference view instead of the paper's "
        "(1 + cosine) / 2, which weighs unrelated pairs half as much as the own one (fine-tuning a good model: 0.05).",
    )
    queue_size: int = Field(default=4096, gt=0, le=MAX_QUEUE, description="moco: past keys kept as negatives.")
    momentum: float = Field(default=0.995, ge=0, lt=1, description="moco: EMA factor of the key encoder.")
    false_negative_threshold: float | None = Field(
        default=0.9,
        ge=-1,
        le=1,
        description="moco: drop in-batch and queued negatives whose cosine to the positive's key exceeds this "
        "(likely false negatives); null keeps them all.",
    )
    hardest_negatives: int | None = Field(
        default=None, gt=0, le=MAX_QUEUE, description="moco: keep only this many hardest queue entries per anchor."
    )


class MiningSpec(_Strict):
    """Hard-negative mining: embed the corpus with the model, take top non-positives."""

    enabled: bool = False
    negatives_per_anchor: int = Field(default=1, ge=1, le=16)
    candidates: int = Field(default=30, ge=2, le=10_000, description="Nearest neighbours looked at per anchor.")
    false_negative_margin: float = Field(
        default=0.95, gt=0, le=1, description="Drop candidates scoring above margin x the positive's score."
    )


class PromoteSpec(_Strict):
    """When the new version takes `alias`: its `metric` must beat the reference by more than
    `min_improvement` (the reference: the base model, or the version holding the alias now,
    both measured in this run on the same evaluation sets), and reach `min_value` if set."""

    alias: str = "production"
    metric: str = Field(description="Metric key that must improve, e.g. 'sts-dev/spearman'.")
    min_improvement: float = Field(default=0.0, ge=0)
    compare_to: Literal["base", "current", "none"] = Field(
        default="base",
        description="'base': the base model; 'current': the version that holds the alias now (evaluated "
        "in this run; with no holder only min_value counts); 'none': min_value alone decides.",
    )
    min_value: float | None = Field(default=None, description="The metric must also reach this value.")
    require_compatible: bool = Field(
        default=False,
        description="Also require that the new version holds the alias already or is registered compatible with its "
        "holder (trained with compatible_with: that version), so collections pinned to the holder stay searchable "
        "through the alias without a re-embed.",
    )


class OutputSpec(_Strict):
    name: str = Field(description="Registry model name of the new version.")
    aliases: list[str] = Field(default_factory=list, description="Aliases moved to the new version regardless.")
    promote: PromoteSpec | None = None
    description: str = ""


class CompatSpec(_Strict):
    """Backward-compatible training (BCT, Shen et al. 2020): the new model's queries must search
    vectors the old model embedded. `compatible_with: minilm@production` is shorthand for
    `{model: minilm@production}`; the reference is pinned to an exact version when the run starts."""

    model: str = Field(
        description="The old model: registry reference (name, name@alias, name/version), hub id, or path."
    )
    weight: float = Field(
        default=1.0,
        ge=0,
        le=1000,
        description="Weight of the cross-model InfoNCE term added to the loss (0: map only).",
    )
    map: bool = Field(
        default=False,
        description="Also learn a linear map new -> old (saved as compat_map.npy) applied to queries before they "
        "meet the old gallery; needed when the two dimensions differ.",
    )
    temperature: float | None = Field(
        default=None, gt=0, le=1, description="Temperature of the cross-model term; default: loss.temperature."
    )


DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MAX_ALPHAS = 101


class InterpolateSpec(_Strict):
    """WiSE-FT weight interpolation (Wortsman et al. 2022) after training: the saved weights are
    (1 - alpha) * base + alpha * fine-tuned. A fixed `alpha`, or `auto`: every alpha in `alphas` is
    blended and measured, and the one with the best target `metric` whose every `retain` set's
    main metric dropped by at most `max_retention_drop` against the base model wins."""

    alpha: float | Literal["auto"] = Field(
        description="Weight of the fine-tuned model in [0, 1] (0: the base, 1: the fine-tuned model as trained), "
        "or 'auto' to choose one of `alphas` on the evaluation sets."
    )
    alphas: list[float] = Field(
        default_factory=lambda: list(DEFAULT_ALPHAS),
        min_length=1,
        max_length=MAX_ALPHAS,
        description="alpha auto: the alphas tried, each in [0, 1] (each costs one evaluation of the target and "
        "retain sets).",
    )
    retain: list[DatasetSpec | str] = Field(
        default_factory=list,
        max_length=MAX_COLUMNS,
        description="Sets whose skill must be kept: the name of an eval set, or a dataset like an eval entry. Each "
        "is scored by its main metric (graded: spearman; pairs: a_to_b/mrr@10 or text_to_image/mrr@10).",
    )
    metric: str | None = Field(
        default=None,
        description="Target metric key (higher is better), e.g. 'sts-dev/spearman'. Default: output.promote.metric "
        "when it is one, else the first eval set's main metric.",
    )
    max_retention_drop: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="How far each retain metric may fall below the base model's, in that metric's own units: "
        "Spearman/Pearson are x100 (0.5 = half a point), recall/MRR/nDCG are fractions 0..1.",
    )


class TrainConfig(_Strict):
    base_model: str = Field(description="Registry reference (name, name@alias, name/version), hub id, or path.")
    train: list[DatasetSpec] = Field(min_length=1)
    eval: list[DatasetSpec] = Field(default_factory=list)
    loss: LossSpec = Field(default_factory=LossSpec)
    mining: MiningSpec = Field(default_factory=MiningSpec)
    output: OutputSpec
    batch_size: int = Field(default=64, gt=0, le=MAX_BATCH_SIZE)
    epochs: Annotated[float, Field(gt=0, le=MAX_EPOCHS)] | Literal["auto"] = Field(
        default=1.0,
        description=f"Passes over the training data; 'auto': 1 to {AUTO_MAX_EPOCHS}, chosen from its size "
        "(trainer/auto_recipe.py).",
    )
    max_steps: int | None = Field(
        default=None, gt=0, le=MAX_STEPS, description="Stop after this many steps (overrides epochs)."
    )
    learning_rate: Annotated[float, Field(gt=0, lt=1)] | Literal["auto"] = Field(
        default=2e-5, description="'auto': from the loss, batch size and model size (trainer/auto_recipe.py)."
    )
    eval_every: Literal["auto", "epoch", "none"] | Annotated[int, Field(gt=0, le=MAX_STEPS)] = Field(
        default="auto",
        description="Evaluate on the eval sets during training: each epoch, every N optimizer steps, or never; "
        "the best evaluation's weights are the result. 'auto': each epoch when there are eval sets.",
    )
    best_metric: str | None = Field(
        default=None,
        max_length=200,
        description="Metric key that picks the best evaluation (higher is better; alignment and uniformity lower). "
        "Default: output.promote.metric, else the first eval set's main metric (spearman or a_to_b/mrr@10).",
    )
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = Field(default=0.01, ge=0, le=10)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(default="auto", description="auto: bf16 on CUDA.")
    dataloader_workers: int | None = Field(
        default=None,
        ge=0,
        le=64,
        description="Processes that read and tokenise batches ahead of the GPU. Default: up to 4 on CUDA (the "
        "GPU otherwise waits on tokenisation between steps), 0 on the CPU (they would compete with training).",
    )
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    freeze: list[Literal["text", "image"]] = Field(
        default_factory=list, description="Towers kept frozen (LiT: train the image tower into the text space)."
    )
    checkpoint_every_steps: int = Field(default=500, gt=0, le=MAX_STEPS)
    log_every_steps: int = Field(default=10, gt=0, le=MAX_STEPS)
    max_seq_length: int | None = Field(default=None, gt=0, le=MAX_SEQ_LENGTH)
    compatible_with: CompatSpec | None = Field(
        default=None, description="Train the new model so its queries search the old model's collections."
    )
    interpolate: InterpolateSpec | None = Field(
        default=None,
        description="WiSE-FT: save a blend of the base and fine-tuned weights, with a fixed or chosen alpha.",
    )

    @field_validator("compatible_with", mode="before")
    @classmethod
    def _compat_shorthand(cls, value: Any) -> Any:
        """A bare reference is shorthand for `{model: <ref>}`."""
        return {"model": value} if isinstance(value, str) else value

    def fingerprint(self) -> str:
        """Stable hash of the config: names the run folder, so re-running resumes it."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# Fields that take a number or a word: one message each instead of one per union branch.
_NUMBER_OR_WORD = {
    "epochs": f"a number of passes above 0 and at most {MAX_EPOCHS}, or 'auto'",
    "learning_rate": "a number above 0 and below 1, or 'auto'",
    "eval_every": "'auto', 'epoch', 'none' or a number of steps from 1",
}


def _format_errors(errors: list[ErrorDetails]) -> list[str]:
    problems: list[str] = []
    for err in errors:
        loc = err.get("loc", ())
        if len(loc) == 2 and loc[0] in _NUMBER_OR_WORD:
            problem = f"{loc[0]}: must be {_NUMBER_OR_WORD[str(loc[0])]}, not {clip(err.get('input'))}"
            if problem not in problems:
                problems.append(problem)
            continue
        problems.append(_format_error(err))
    return problems


def _format_error(err: ErrorDetails) -> str:
    location = ".".join(str(p) for p in err.get("loc", ()))
    return f"{location}: {err.get('msg', 'invalid')}"


def _combination_problems(config: TrainConfig) -> list[str]:
    """Rules across fields: which losses fit which data, and options that exclude each other."""
    problems = []
    for i, spec in enumerate(config.train):
        if config.loss.name not in LOSSES_FOR_KIND[spec.kind]:
            allowed = ", ".join(LOSSES_FOR_KIND[spec.kind])
            problems.append(f"train[{i}]: {spec.kind} data needs loss {allowed}, not {config.loss.name}")
        if spec.kind == "graded" and config.mining.enabled:
            problems.append(f"train[{i}]: hard-negative mining needs pairs, not graded data")
    if config.loss.cached and config.loss.mini_batch_size > config.batch_size:
        problems.append("loss.mini_batch_size must not exceed batch_size")
    problems += _loss_option_problems(config)
    problems += _compat_problems(config)
    problems += _interpolate_problems(config)
    problems += _eval_every_problems(config)
    if config.output.promote and config.output.promote.alias in config.output.aliases:
        problems.append("output.promote.alias is also in output.aliases: it would move unconditionally")
    promote = config.output.promote
    if promote and promote.compare_to == "none" and promote.min_value is None:
        problems.append("output.promote.compare_to 'none' needs output.promote.min_value (else nothing is checked)")
    if promote and not config.eval:
        problems.append("output.promote needs an evaluation set (eval) to measure its metric on")
    return problems


def _loss_option_problems(config: TrainConfig) -> list[str]:
    """Loss options that cannot work together or with this data, each with what to change."""
    loss = config.loss
    problems = []
    if loss.cached and loss.name not in CACHED_LOSSES:
        problems.append(f"loss.cached is available for {' and '.join(CACHED_LOSSES)} only, not {loss.name}")
    if loss.name == "moco":
        if loss.matryoshka_dims:
            problems.append(
                "loss.matryoshka_dims cannot be used with moco: the queue and the momentum encoder hold full-size "
                "keys; train the prefixes with infonce"
            )
        if loss.queue_size < config.batch_size:
            problems.append("loss.queue_size must be at least batch_size (a smaller queue holds less than one batch)")
    for i, spec in enumerate(config.train):
        if spec.kind == "multi_positive" and config.mining.enabled:
            problems.append(f"train[{i}]: hard-negative mining needs pairs, not multi_positive data")
        if spec.kind == "multi_positive" and spec.negatives:
            problems.append(f"train[{i}]: multi_positive data takes no negatives columns (every other row's are)")
    for i, spec in enumerate(config.eval):
        if spec.kind == "multi_positive":
            problems.append(f"eval[{i}]: multi_positive data is for training; evaluate on pairs (one row per positive)")
    return problems


def _eval_every_problems(config: TrainConfig) -> list[str]:
    """Evaluation during training needs something to evaluate on; best_metric must name one of its sets."""
    problems = []
    if config.eval_every not in ("auto", "none") and not config.eval:
        problems.append(f"eval_every {config.eval_every} needs an evaluation set (eval), or set eval_every: none")
    if config.best_metric is not None:
        names = [spec.name or PurePosixPath(spec.path).stem for spec in config.eval]
        if not config.eval:
            problems.append("best_metric needs an evaluation set (eval) to measure it on")
        elif config.eval_every == "none":
            problems.append("best_metric picks among evaluations during training: remove it or set eval_every")
        elif not any(config.best_metric.startswith(f"{name}/") for name in names):
            sets = ", ".join(repr(n) for n in names)
            problems.append(
                f"best_metric {clip(config.best_metric)} must start with an eval set's name and '/' ({sets})"
            )
    return problems


def _compat_problems(config: TrainConfig) -> list[str]:
    """`compatible_with` needs the batch's own embeddings beside the main loss's, which the cached
    (GradCache), momentum and Matryoshka losses do not hand out; and it must train something."""
    spec = config.compatible_with
    if spec is None:
        return []
    problems = []
    if not spec.model.strip():
        problems.append("compatible_with.model is empty: name the old model (e.g. shapes/1 or shapes@production)")
    if spec.weight == 0 and not spec.map:
        problems.append("compatible_with.weight 0 without map: true trains nothing for compatibility; raise the weight")
    if config.loss.cached or config.loss.name == "moco" or config.loss.matryoshka_dims:
        problems.append(
            "compatible_with works with the plain losses only: turn off loss.cached and loss.matryoshka_dims, and use "
            "infonce instead of moco"
        )
    for i, data in enumerate(config.train):
        if data.kind == "multi_positive":
            problems.append(
                f"train[{i}]: compatible_with needs pairs, triplets, texts or graded data, not multi_positive"
            )
    return problems


HIGHER_IS_BETTER = re.compile(r"(spearman|pearson|recall@\d+|mrr@\d+|ndcg@\d+)$")


def eval_set_name(spec: DatasetSpec) -> str:
    """The name a dataset's metric keys start with, as `trainer.data.load_data` gives it."""
    return spec.name or PurePosixPath(spec.path).stem


def _interpolate_problems(config: TrainConfig) -> list[str]:
    """`interpolate`: alphas in range, what `auto` needs (eval sets, a retain set, a target metric
    that rises), retain sets that name eval sets or bring their own data under a new name."""
    spec = config.interpolate
    if spec is None:
        return []
    problems = []
    if spec.alpha != "auto" and not 0.0 <= spec.alpha <= 1.0:
        problems.append(
            f"interpolate.alpha must be in [0, 1] (the fine-tuned model's weight) or 'auto', got {spec.alpha:g}"
        )
    bad = [a for a in spec.alphas if not 0.0 <= a <= 1.0]
    if bad:
        problems.append(f"interpolate.alphas must each be in [0, 1]; remove {', '.join(f'{a:g}' for a in bad)}")
    if len(set(spec.alphas)) != len(spec.alphas):
        problems.append("interpolate.alphas lists an alpha twice; list each once")
    if spec.alpha != "auto" and "alphas" in spec.model_fields_set:
        problems.append("interpolate.alphas is only used with alpha: auto; remove it or set alpha: auto")
    eval_names = [eval_set_name(s) for s in config.eval]
    if spec.alpha == "auto":
        if not config.eval:
            problems.append("interpolate.alpha auto needs an evaluation set (eval) to measure the target metric on")
        if not spec.retain:
            problems.append(
                "interpolate.alpha auto needs interpolate.retain: a set whose skill must be kept (an eval set's name "
                "or a dataset), else the fine-tuned model always wins"
            )
    target_set = None
    if spec.metric is not None:
        target_set = next((n for n in eval_names if spec.metric.startswith(n + "/")), None)
        if target_set is None:
            known = ", ".join(eval_names) or "none"
            problems.append(
                f"interpolate.metric {clip(spec.metric)} is not a metric of an eval set; it starts with the set's name "
                f"(eval sets: {known}), e.g. '<set>/spearman'"
            )
        elif not HIGHER_IS_BETTER.search(spec.metric):
            problems.append(
                f"interpolate.metric {clip(spec.metric)} must be one where higher is better: spearman, pearson, "
                "recall@k, mrr@10 or ndcg@10"
            )
    elif spec.alpha == "auto" and config.eval:
        target_set = eval_names[0]
        if config.output.promote and any(config.output.promote.metric.startswith(n + "/") for n in eval_names):
            target_set = next(n for n in eval_names if config.output.promote.metric.startswith(n + "/"))
    problems += _retain_problems(spec, eval_names, target_set)
    return problems


def _retain_problems(spec: InterpolateSpec, eval_names: list[str], target_set: str | None) -> list[str]:
    problems = []
    seen: set[str] = set()
    for i, item in enumerate(spec.retain):
        where = f"interpolate.retain[{i}]"
        if isinstance(item, str):
            name = item
            if name not in eval_names:
                known = ", ".join(eval_names) or "none"
                problems.append(f"{where}: {clip(name)} is not the name of an eval set ({known}); or give a dataset")
        else:
            name = eval_set_name(item)
            if name in eval_names:
                problems.append(
                    f"{where}: its name {clip(name)} is an eval set's; name it by that (retain: [{name}]) or set "
                    "its name"
                )
            if item.kind == "multi_positive":
                problems.append(f"{where}: multi_positive data is for training; retain sets are pairs or graded")
        if name == target_set:
            problems.append(f"{where}: {clip(name)} holds the target metric; a retain set must be another set")
        if name in seen:
            problems.append(f"{where}: {clip(name)} is listed twice")
        seen.add(name)
    return problems


def _name_problems(config: TrainConfig) -> list[str]:
    from registry.names import validate_alias, validate_name

    checks: list[tuple[Callable[[str], str], str, str]] = [(validate_name, config.output.name, "output.name")]
    checks += [(validate_alias, alias, "output.aliases") for alias in config.output.aliases]
    if config.output.promote:
        checks.append((validate_alias, config.output.promote.alias, "output.promote.alias"))
    problems = []
    for check, value, where in checks:
        try:
            check(value)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    return problems


def _file_problems(
    config: TrainConfig, base_dir: Path | None, confined: bool, visible: Callable[[str], bool] | None
) -> list[str]:
    """Missing or out-of-bounds data files, each named as the config names it (never by the
    server path it resolves to). A file the caller may not see is missing, in the same words."""
    problems = []
    sections: list[tuple[str, list[DatasetSpec | str]]] = [("train", [*config.train]), ("eval", [*config.eval])]
    if config.interpolate is not None:
        sections.append(("interpolate.retain", config.interpolate.retain))
    for section, specs in sections:
        for i, spec in enumerate(specs):
            if isinstance(spec, str):
                continue  # the name of an eval set
            where = f"{section}[{i}].path"
            if confined:
                try:
                    path = resolve_inside(spec.path, base_dir)
                except OutsideRootError as exc:
                    problems.append(f"{where}: {exc}")
                    continue
            else:
                path = resolve_path(spec.path, base_dir)
            if not path.is_file() or (visible is not None and not visible(spec.path)):
                problems.append(f"{where}: no such file {clip(spec.path)}" + ("" if confined else f" ({path})"))
    return problems


def parse_config(
    data: Any, base_dir: Path | None = None, *, confined: bool = False, visible: Callable[[str], bool] | None = None
) -> TrainConfig:
    """Validate a config dict; raise `ConfigError` listing every problem found.

    Shape and type errors come first (all of them); once the shape is right, the rules across
    fields, the names and the data files are checked together. `confined`: data files must be
    uploaded datasets, i.e. inside `base_dir` (see `resolve_inside`); `visible(path)`: whether
    this caller may use that one (the API: datasets its key uploaded).
    """
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc.errors())) from None
    problems = _combination_problems(config) + _name_problems(config)
    problems += _file_problems(config, base_dir, confined, visible)
    if problems:
        raise ConfigError(problems)
    return config


def load_config(path: Path) -> TrainConfig:
    """Read YAML or JSON from a file and validate it (paths inside resolve against its folder)."""
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types; both mean "not parseable"
        raise ConfigError([f"{path}: cannot parse: {exc}"]) from None
    return parse_config(data, path.parent)


def resolve_path(value: str, base_dir: Path | None) -> Path:
    """A path from a config or data file of one's own (`duet train`): `~` expands, absolute
    paths stay, relative ones join the config's folder. Never for API callers: `resolve_inside`."""
    path = Path(value).expanduser()
    return path if path.is_absolute() or base_dir is None else (base_dir / path)


class OutsideRootError(ValueError):
    """A reference that would leave the folder it must stay in; the message names it as given."""


def resolve_inside(value: str, root: Path | None, relative_to: Path | None = None) -> Path:
    """`value` joined to `relative_to` (default: `root`), refused unless the real path, with
    every symbolic link followed, is inside `root`. No `~` or variable expansion: `~user/x`
    is a file named so inside the folder. The answer is the real path."""
    if root is None:
        raise OutsideRootError(f"{clip(value)}: no datasets folder to resolve it in")
    pure = PurePosixPath(value)
    dotdot = relative_to is None and ".." in pure.parts  # a data file's own references may climb; bounded below
    if not value or "\\" in value or "\0" in value or pure.is_absolute() or dotdot:
        raise OutsideRootError(
            f"{clip(value)} must be the path of an uploaded dataset (POST /v1/datasets returns it), relative and "
            "without '..', not a server path"
        )
    real_root = root.resolve()
    real = ((relative_to or root) / pure).resolve()
    if not real.is_relative_to(real_root):
        raise OutsideRootError(f"{clip(value)} leads outside the uploaded datasets (through a link?)")
    return real
