"""Reading tabular data files row by row: JSONL, CSV/TSV, Parquet and the STS-benchmark layout.

Shared by the trainer's datasets and `duet index import`, so both accept the same files and
report a bad row the same way: by file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CONTENT_KEYS = ("text", "image", "vector")
STS_COLUMNS = ("genre", "filename", "year", "id", "score", "sentence1", "sentence2")


class RowError(ValueError):
    """A row that cannot become an item; names the file and line."""


def clip(value: object, limit: int = 60) -> str:
    """`repr` of a value for an error message, cut to `limit` characters: a message may quote
    the offending cell of a user's own file, never pages of a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'" + f" ({len(str(value))} chars)"


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    return {"ndjson": "jsonl", "json": "jsonl"}.get(suffix, suffix)


def read_rows(
    path: Path, fmt: str = "auto", typed: bool = True, label: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) from JSONL, CSV/TSV, Parquet or STS files, read lazily.

    `typed`: CSV cells that look like numbers become numbers, except the content columns.
    `label`: the file's name in error messages (default: its path), e.g. the reference a job
    config gave, so an API caller never learns where the server keeps the file.
    """
    name = label or str(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "sts":
        yield from _read_sts(path, name)
        return
    suffix = "." + fmt
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open() as handle:
            for line, text in enumerate(handle, 1):
                if text.strip():
                    try:
                        yield line, json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise RowError(f"{name}:{line}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    elif suffix in (".csv", ".tsv"):
        with path.open(newline="") as handle:
            for line, row in enumerate(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","), 2):
                if typed:
                    row = {key: _typed(value) if key not in CONTENT_KEYS else value for key, value in row.items()}
                yield line, row
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RowError("reading Parquet needs pyarrow: pip install pyarrow") from None
        line = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                line += 1
                yield line, row
    else:
        raise RowError(f"{name}: unknown format {suffix!r}; use .jsonl, .csv, .tsv or .parquet")


def _typed(value: str | None) -> Any:
    """CSV has no types: numbers become numbers (so range filters work), the rest stays text."""
    if value is None:
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def count_rows(path: Path) -> int | None:
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows: int = pq.ParquetFile(path).metadata.num_rows  # pyarrow ships no types
            return rows
        except ImportError:
            return None
    with path.open("rb") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if path.suffix.lower() in (".csv", ".tsv") else lines


def _read_sts(path: Path, name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """STS-benchmark files: tab-separated, no header, quotes are literal characters."""
    with path.open(newline="", encoding="utf-8") as handle:
        for line, cells in enumerate(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if len(cells) < len(STS_COLUMNS):
                raise RowError(f"{name}:{line}: expected {len(STS_COLUMNS)} tab-separated columns, got {len(cells)}")
            row = dict(zip(STS_COLUMNS, cells))
            row["score"] = _typed(row["score"])
            yield line, row
