"""Content hashes for model folders and dataset files (lineage, immutability checks)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20


def hash_file(path: Path) -> str:
    """sha256 of one file's bytes (dataset files in training lineage)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_directory(root: str | Path, exclude: frozenset[str] = frozenset()) -> str:
    """sha256 over every file's relative path and bytes, in sorted order.

    Independent of file timestamps and of where the folder lives, so the same weights hash
    the same on every machine. Names in `exclude` (e.g. the manifest itself) are skipped.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        if relative in exclude:
            continue
        digest.update(relative.encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
