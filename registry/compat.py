"""Whether one version's queries may search a collection pinned to another (issue 14).

Kept apart from the service so the rule (manifest claim + the pinned weights still being the ones
the claim was made against) is one pure function both backends and the alias checks can share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from registry.errors import UnusableMapError, VersionNotFoundError
from registry.manifest import Compatibility, Manifest
from registry.names import ModelRef

if TYPE_CHECKING:
    from registry.store import ModelRegistry, ModelVersionInfo


@dataclass(frozen=True)
class QueryCompat:
    """The answer: allowed or not, the record that allowed it, and a reason a 409 can quote."""

    allowed: bool
    record: Compatibility | None
    reason: str


def query_compat(query_ref: str, query_manifest: Manifest, pinned_ref: str, pinned_sha256: str | None) -> QueryCompat:
    """May `query_ref` embed queries for a collection pinned to `pinned_ref`?

    Same version: yes. Otherwise only when the query version's manifest names `pinned_ref` and, if it
    recorded the pinned weights' hash, those weights are unchanged (a re-registered version breaks the claim)."""
    if query_ref == pinned_ref:
        return QueryCompat(True, None, "same version")
    record = query_manifest.compatibility(pinned_ref)
    if record is None:
        return QueryCompat(False, None, f"{query_ref} is not registered compatible with {pinned_ref}")
    if record.weights_sha256 is not None and pinned_sha256 is not None and record.weights_sha256 != pinned_sha256:
        return QueryCompat(
            False,
            record,
            f"{query_ref} was trained compatible with {pinned_ref} weights {record.weights_sha256[:12]}, "
            f"but {pinned_ref} now has weights {pinned_sha256[:12]}",
        )
    return QueryCompat(True, record, f"{query_ref} is compatible with {pinned_ref}")


def alias_move(registry: ModelRegistry, new: ModelVersionInfo, alias: str) -> QueryCompat:
    """May `alias` of `new`'s model move to `new` and keep every collection pinned to its holder searchable
    through the alias? Yes when nothing holds it yet, when `new` holds it, or when `new`'s queries may search
    the holder's vectors (`query_compat`) through a usable map (if any) that reaches the holder's dimension."""
    try:
        holder = registry.resolve(ModelRef(new.name, alias=alias))
    except VersionNotFoundError:
        return QueryCompat(True, None, f"no version holds {new.name}@{alias} yet")
    answer = query_compat(new.ref, new.manifest, holder.ref, holder.manifest.lineage.weights_sha256)
    if not answer.allowed or answer.record is None:
        return answer
    # the search would refuse queries whose map is unusable or misses the holder's width: not on the claim alone
    try:
        mapping = load_map(new.path, answer.record)
    except UnusableMapError as exc:
        return QueryCompat(False, answer.record, f"{new.ref} claims compatibility with {holder.ref}, but {exc}")
    problem = fit_problem(new, mapping, holder.ref, holder.manifest.contract.dimension)
    return answer if problem is None else QueryCompat(False, answer.record, problem)


def fit_problem(new: ModelVersionInfo, mapping: np.ndarray | None, old_ref: str, old_dimension: int) -> str | None:
    """Why `new`'s queries, through `mapping` (None: as they are), cannot meet `old_ref`'s `old_dimension`-wide
    vectors; None when they can. Both the search and the alias move ask this."""
    dimension = new.manifest.contract.dimension
    if mapping is None and dimension != old_dimension:
        return f"{new.ref}'s {dimension}-dimension vectors do not fit {old_ref}'s {old_dimension} dimensions"
    if mapping is not None and mapping.shape != (dimension, old_dimension):
        return (
            f"{new.ref}'s {mapping.shape[0]}x{mapping.shape[1]} map does not take its {dimension}-dimension vectors "
            f"to {old_ref}'s {old_dimension} dimensions"
        )
    return None


def load_map(artifact_dir: Path, record: Compatibility) -> np.ndarray | None:
    """The new -> old float32 map of `record`, or None when the vectors are used as they are.

    `UnusableMapError` (saying why) when the file is not a finite 2-D matrix inside `artifact_dir`: a manifest
    may come from anywhere (an import, a hand edit), so its map path and contents are checked, not trusted."""
    if record.map_file is None:
        return None
    root = artifact_dir.resolve()
    path = (root / record.map_file).resolve()
    if Path(record.map_file).is_absolute() or not path.is_relative_to(root):
        raise UnusableMapError(f"map file {record.map_file!r} is not inside the version's artifact folder")
    try:
        loaded = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UnusableMapError(f"map file {record.map_file!r} is missing from the version's artifacts") from None
    except (OSError, ValueError, EOFError) as exc:
        raise UnusableMapError(f"map file {record.map_file!r} is not a readable .npy array ({exc})") from None
    if not isinstance(loaded, np.ndarray) or loaded.ndim != 2 or not np.issubdtype(loaded.dtype, np.number):
        shape = getattr(loaded, "shape", None)
        raise UnusableMapError(f"map file {record.map_file!r} is not a 2-D numeric matrix (shape {shape})")
    mapping: np.ndarray = loaded.astype(np.float32, copy=False)
    if not np.isfinite(mapping).all():
        raise UnusableMapError(f"map file {record.map_file!r} contains NaN or infinity")
    return mapping


def map_queries(vectors: np.ndarray, mapping: np.ndarray | None) -> np.ndarray:
    """q_old = normalize(q_new @ M); unchanged (but normalised) without a map."""
    out = vectors if mapping is None else vectors @ mapping
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    normalised: np.ndarray = (out / np.maximum(norms, 1e-12)).astype(np.float32)
    return normalised
