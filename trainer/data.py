"""Training and evaluation data: rows of (anchor, positive[, negatives]), graded pairs, or an
anchor with a list of positives (`multi_positive`: several captions of one image), each side a
text or an image, read from a file into a `datasets.Dataset`.

Every row is checked while the file is read (empty text, missing or unreadable image), and a
bad row is reported by file and line, or counted and skipped when the spec says so. Images
stay paths in the dataset and are decoded only when a batch needs them (`set_transform`),
so an image set larger than memory trains fine. The content hash (file bytes, plus the bytes
of every image it references) goes into the trained model's lineage.

Errors name the file as the config gave it and quote at most a clipped cell of the offending
row. Loaded `confined` (jobs from the API), the data file must lie inside the datasets folder
and every image it references inside the file's own upload (`<id>/`; real paths, links
followed): an uploaded file can point neither at the server's files nor at another upload.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from trainer.config import DatasetSpec, OutsideRootError, resolve_inside, resolve_path
from trainer.tables import STS_COLUMNS, RowError, clip, read_rows

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class LoadedData:
    """One dataset, ready for the sentence-transformers trainer or the evaluator."""

    name: str
    kind: str
    columns: list[str]  # role columns in order: anchor, positive, negative_1.. | anchor, positive, score
    rows: list[dict[str, Any]]
    modalities: dict[str, str]  # column -> "text" | "image"
    sha256: str
    skipped: int = 0
    bad_rows: list[str] = field(default_factory=list)
    content_keys: list[tuple[Any, ...]] | None = None  # from `same_content`: rows with equal keys match each other

    def __len__(self) -> int:
        return len(self.rows)

    def to_hf(self) -> Any:  # a datasets.Dataset (the package ships no types)
        """A `datasets.Dataset` whose image columns decode lazily on access."""
        from datasets import Dataset

        dataset = Dataset.from_list(self.rows)
        image_columns = [c for c, m in self.modalities.items() if m == "image"]
        if image_columns:
            dataset.set_transform(_image_loader(image_columns))
        return dataset

    def column(self, name: str) -> list[Any]:
        return [row[name] for row in self.rows]

    def load(self, name: str) -> list[Any]:
        """A column's values with images decoded (for evaluation and mining)."""
        values = self.column(name)
        return [load_image(v) for v in values] if self.modalities.get(name) == "image" else values


def _image_loader(columns: list[str]) -> Callable[[dict[str, list[Any]]], dict[str, list[Any]]]:
    def transform(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for column in columns:
            if column in batch:
                batch[column] = [load_image(path) for path in batch[column]]
        return batch

    return transform


def load_image(path: str) -> Image.Image:
    from encoders.images import decode_image

    return decode_image(Path(path).read_bytes())


def _is_image_ref(value: Any) -> bool:
    return isinstance(value, str) and (value.startswith("data:image/") or value.lower().endswith(IMAGE_SUFFIXES))


def _check_image(value: str, base: Path, root: Path | None) -> str:
    """Resolve and check an image reference now (header only); decode later. With a `root`
    (confined), the image must be inside it."""
    if value.startswith("data:image/"):
        raise RowError("inline data URIs are not supported in training files; save the images and reference paths")
    if root is not None:
        try:
            path = resolve_inside(value, root, relative_to=base)
        except OutsideRootError:
            raise RowError(
                f"image {clip(value)} is not inside this upload (a .zip carries a data file and its images)"
            ) from None
    else:
        path = resolve_path(value, base)
    if not path.is_file():
        raise RowError(f"image file not found: {clip(value)}")
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise RowError(f"unreadable image {clip(value)}: {type(exc).__name__}") from None
    return str(path.resolve())


def _roles(spec: DatasetSpec) -> list[tuple[str, str]]:
    """(output column, source column) pairs for the dataset's kind."""
    if spec.kind == "texts":
        return [("anchor", spec.anchor)]
    roles = [("anchor", spec.anchor), ("positive", spec.positive)]
    if spec.kind == "triplets":
        if not spec.negatives:
            roles.append(("negative_1", "negative"))
        roles += [(f"negative_{i + 1}", column) for i, column in enumerate(spec.negatives)]
    elif spec.negatives:
        roles += [(f"negative_{i + 1}", column) for i, column in enumerate(spec.negatives)]
    return roles


def _convert(
    spec: DatasetSpec, row: dict[str, Any], base: Path, modalities: dict[str, str], root: Path | None
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for role, source in _roles(spec):
        if source not in row:
            raise RowError(_missing_column(spec, source, row))
        value = row.get(source)
        if spec.kind == "multi_positive" and role == "positive":
            values = value if isinstance(value, list) else [value]
            if not values:
                raise RowError(f"column '{source}' holds an empty list; a row needs at least one positive")
            out[role] = [_cell(v, role, source, base, modalities, root) for v in values]
        else:
            out[role] = _cell(value, role, source, base, modalities, root)
    if spec.kind == "texts":
        out["positive"] = out["anchor"]  # unsupervised SimCSE: the text is its own positive
        modalities["positive"] = modalities["anchor"]
    if spec.kind == "graded":
        out["score"] = _score(row.get(spec.score), spec)
    return out


def _cell(value: Any, role: str, source: str, base: Path, modalities: dict[str, str], root: Path | None) -> str:
    """One checked value: text, or an image path resolved and verified (decoded only later)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowError(f"column '{source}' is empty")
    if not isinstance(value, str):
        value = str(value)
    modality = "image" if _is_image_ref(value) else "text"
    known = modalities.setdefault(role, modality)
    if known != modality:
        raise RowError(f"column '{source}' holds {modality} here but {known} in earlier rows")
    return _check_image(value, base, root) if modality == "image" else value


def spread_positives(
    rows: list[dict[str, Any]], keys: list[tuple[Any, ...]], per_example: int | None
) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]], int]:
    """Rows whose "positive" is a list -> examples with columns positive_1..positive_K and "score" =
    how many of them are real (the multi-positive loss masks the rest).

    A row with more than K positives becomes several examples (nothing is dropped; the trainer's
    no-duplicates sampler keeps them out of one batch, where the shared anchor would be a false
    negative); one with fewer repeats its first positive in the spare slots, which the loss
    ignores. K defaults to the most positives any row has. Returns (examples, their keys, K).
    """
    k = per_example or max(len(row["positive"]) for row in rows)
    examples: list[dict[str, Any]] = []
    example_keys: list[tuple[Any, ...]] = []
    for row, key in zip(rows, keys, strict=True):
        positives = row["positive"]
        for begin in range(0, len(positives), k):
            chunk = positives[begin : begin + k]
            example = {"anchor": row["anchor"]}
            example.update({f"positive_{j + 1}": chunk[j] if j < len(chunk) else chunk[0] for j in range(k)})
            example["score"] = float(len(chunk))
            examples.append(example)
            example_keys.append(key)
    return examples, example_keys, k


def _score(value: Any, spec: DatasetSpec) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise RowError(f"score column '{spec.score}' is not a number: {clip(value)}") from None
    if not math.isfinite(score):
        raise RowError(f"score column '{spec.score}' is not a finite number: {clip(value)}")
    return score / spec.score_max if spec.score_max else score


def _missing_column(spec: DatasetSpec, source: str, row: dict[str, Any]) -> str:
    """Which columns the file has, and which setting maps them (or which format to set)."""
    columns = ", ".join(clip(str(c), 30) for c in list(row)[:12])
    hint = f"map yours with the dataset's '{_role_setting(spec, source)}' setting"
    if len(row) >= len(STS_COLUMNS) or spec.kind == "graded":
        hint += ", or set format: sts for a tab-separated STS-benchmark file (no header)"
    return f"column '{source}' is missing (the file's columns: {columns}); {hint}"


def _role_setting(spec: DatasetSpec, source: str) -> str:
    for setting in ("anchor", "positive", "score"):
        if getattr(spec, setting) == source:
            return setting
    return "negatives"


def sniff_format(path: Path, spec: DatasetSpec) -> Literal["auto", "sts"]:
    """The format of an `auto` dataset: by suffix, except that a .csv/.tsv whose first line
    is an STS-benchmark row (tab-separated, a number in the score column, no header naming the
    configured columns) is read as STS, whatever the file is called."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv"):
        return "auto"
    try:
        with path.open(encoding="utf-8", errors="replace") as handle:
            first = handle.readline(65_536)
    except OSError:
        return "auto"
    cells = first.rstrip("\r\n").split("\t")
    if spec.anchor in cells or len(cells) < len(STS_COLUMNS):
        return "auto"
    try:
        float(cells[STS_COLUMNS.index("score")])
    except ValueError:
        return "auto"
    return "sts"


def load_data(spec: DatasetSpec, base_dir: Path | None = None, *, confined: bool = False) -> LoadedData:
    """Read and check one dataset file; `RowError` names the file (as the spec gives it) and
    line of a bad row. `confined`: the file and its images must be inside `base_dir`."""
    root = None
    if confined:
        try:
            path = resolve_inside(spec.path, base_dir)
            # images: inside the same upload (a .zip carries a data file and its images)
            root = resolve_inside(PurePosixPath(spec.path).parts[0], base_dir)
        except OutsideRootError as exc:
            raise RowError(str(exc)) from None
    else:
        path = resolve_path(spec.path, base_dir)
    label = spec.path
    if not path.is_file():
        raise RowError(f"{label}: no such file")
    fmt = spec.format
    if fmt == "auto":
        fmt = sniff_format(path, spec)
    if fmt == "sts" and spec.kind == "graded" and spec.score_max is None:
        spec = spec.model_copy(update={"score_max": 5.0, "anchor": "sentence1", "positive": "sentence2"})
    elif fmt == "sts":
        spec = spec.model_copy(update={"anchor": "sentence1", "positive": "sentence2"})
    rows: list[dict[str, Any]] = []
    keys: list[tuple[Any, ...]] = []
    modalities: dict[str, str] = {}
    bad: list[str] = []
    for line, raw in read_rows(path, fmt, typed=False, label=label):
        if spec.limit is not None and len(rows) >= spec.limit:
            break
        try:
            if not isinstance(raw, dict):
                raise RowError(f"expected an object with columns, got {type(raw).__name__}")
            rows.append(_convert(spec, raw, path.parent, modalities, root))
            keys.append(tuple(str(raw.get(column)) for column in spec.same_content))
        except RowError as exc:
            message = f"{label}:{line}: {exc}"
            if not spec.skip_bad_rows:
                raise RowError(message) from None
            bad.append(message)
    if bad:
        logger.warning("%s: skipped %d bad rows (first: %s)", label, len(bad), bad[0])
    if not rows:
        raise RowError(f"{label}: no usable rows")
    columns = [role for role, _ in _roles(spec)] + (["positive"] if spec.kind == "texts" else [])
    columns += ["score"] if spec.kind == "graded" else []
    if spec.kind == "multi_positive":
        rows, keys, k = spread_positives(rows, keys, spec.max_positives)
        columns = ["anchor", *(f"positive_{j + 1}" for j in range(k)), "score"]
        modalities.update({f"positive_{j + 1}": modalities["positive"] for j in range(k)})
    return LoadedData(
        name=spec.name or path.stem,
        kind=spec.kind,
        columns=columns,
        rows=rows,
        modalities={c: modalities.get(c, "text") for c in columns if c != "score"},
        sha256=_content_hash(path, rows, modalities),
        skipped=len(bad),
        bad_rows=bad,
        content_keys=keys if spec.same_content else None,
    )


def _content_hash(path: Path, rows: list[dict[str, Any]], modalities: dict[str, str]) -> str:
    digest = hashlib.sha256(path.read_bytes())
    image_columns = [c for c, m in modalities.items() if m == "image"]
    for row in rows:
        for column in image_columns:
            digest.update(Path(row[column]).read_bytes())
    return digest.hexdigest()
