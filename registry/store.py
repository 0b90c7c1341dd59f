"""`ModelRegistry`: our thin interface over MLflow's model registry.

Why MLflow: versions, aliases (`models:/name@alias`), a SQLite backend for embedded use, S3/GCS
artifact stores and a tracking UI already exist there, and practitioners know it. What it does
not know about embeddings (the vector contract, lineage) lives in our `Manifest`, stored
inside each version's artifact folder and mirrored into tags.

Versions are immutable: a version's files are written once, hashed, and the hash is checked
again whenever the version is opened. Aliases are the only thing that moves.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from registry.compat import alias_move
from registry.errors import (
    IncompatibleVersionError,
    IntegrityError,
    InvalidNameError,
    ManifestError,
    ModelNotFoundError,
    RegistryError,
    VersionNotFoundError,
)
from registry.manifest import MANIFEST_FILE, VARIANT_FILE, Manifest, VariantRecord
from registry.names import LATEST, ModelRef, parse_model_ref, validate_alias, validate_name, validate_version

if TYPE_CHECKING:
    from mlflow.entities.model_registry import RegisteredModel

logger = logging.getLogger(__name__)

EXPERIMENT = "duet-model-registry"
ARTIFACT_DIR = "model"


@dataclass(frozen=True)
class ModelVersionInfo:
    """One immutable model version, with the local folder its files can be loaded from."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    aliases: tuple[str, ...]
    created_at_ms: int

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class VariantInfo:
    """An optimised variant of one version (see `VariantRecord`): its files and its record."""

    version: ModelVersionInfo
    path: Path
    record: VariantRecord

    @property
    def ref(self) -> str:
        return f"{self.version.ref}:{self.record.name}"


_VARIANT_NAME = re.compile(r"^[a-z0-9]+-[a-z0-9]+$")


@dataclass(frozen=True)
class RegisteredModelSummary:
    name: str
    description: str
    latest_version: int | None
    aliases: dict[str, int]
    created_at_ms: int = 0  # when the model (its first version) was registered


def _mlflow_error_code(exc: Exception) -> str | None:
    return getattr(exc, "error_code", None)


def _manifest_problem(exc: Exception) -> str:
    """What is wrong with a manifest, in one short line: pydantic's first error with where it is."""
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the file"
        return f"{where}: {first['msg']}"[:200]
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# Alias moves in this process, one at a time: a require_compatible check and its move are one step.
_ALIAS_MOVES = threading.Lock()


class ModelRegistry:
    """Register, resolve and alias model versions. Thread-safe (MLflow's SQL store pools)."""

    def __init__(self, tracking_uri: str, artifact_location: str | None = None, cache_dir: Path | None = None):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._artifact_location = artifact_location
        self._cache_dir = cache_dir
        # Variants are derived files, kept on this machine beside the registry's cache (a remote
        # registry's replicas each derive or copy their own): never versions in MLflow.
        self.variants_dir = cache_dir.parent / "variants" if cache_dir is not None else None
        self._experiment_id: str | None = None

    @classmethod
    def embedded(cls, root: Path) -> ModelRegistry:
        """SQLite database and artifact folder under `root`: no server needed.

        MLflow creates and migrates the database on first use; several processes opening a
        fresh one at once (torchrun ranks, server workers) would race in that migration, so
        the first use happens under a file lock.
        """
        from filelock import FileLock

        root = Path(root).resolve()
        (root / "artifacts").mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / "init.lock"), timeout=300):
            registry = cls(
                tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                artifact_location=(root / "artifacts").as_uri(),
                cache_dir=root / "cache",
            )
            registry._client.search_experiments(max_results=1)  # tracking store: creates/migrates
            registry._client.search_registered_models(max_results=1)  # registry store: the same
        return registry

    @classmethod
    def open(cls, root: Path, tracking_uri: str | None = None, artifact_location: str | None = None) -> ModelRegistry:
        """The configured remote registry, or the embedded one under `root` when none is set.
        One place for this choice, used by the service, the CLI and job processes alike."""
        if tracking_uri:
            return cls(tracking_uri, artifact_location=artifact_location, cache_dir=Path(root) / "cache")
        return cls.embedded(root)

    @property
    def artifact_location(self) -> str | None:
        """Where new experiments keep artifacts (None: the tracking server's default)."""
        return self._artifact_location

    # -- writing -----------------------------------------------------------------------

    def register(
        self,
        name: str,
        source_dir: Path,
        manifest: Manifest,
        aliases: tuple[str, ...] = (),
        run_id: str | None = None,
    ) -> ModelVersionInfo:
        """Copy a saved model folder into the registry as the next version of `name`.

        `run_id`: an MLflow run (e.g. the training run) to attach the artifact to, so the
        version links to its loss curves; by default a registration run is created.
        """
        from encoders.hashing import hash_directory

        validate_name(name)
        for alias in aliases:
            validate_alias(alias)
        source_dir = Path(source_dir)
        if not (source_dir / "modules.json").is_file():
            raise RegistryError(f"{source_dir} is not a saved sentence-transformers model (no modules.json)")
        weights_hash = hash_directory(source_dir, exclude=frozenset({MANIFEST_FILE}))
        manifest = manifest.model_copy(
            update={"lineage": manifest.lineage.model_copy(update={"weights_sha256": weights_hash})}
        )
        run_id = self._log_run(name, source_dir, manifest, run_id)
        self._ensure_registered_model(name, manifest.description)
        version = self._client.create_model_version(
            name,
            source=f"{self._client.get_run(run_id).info.artifact_uri}/{ARTIFACT_DIR}",
            run_id=run_id,
            tags=self._tags(manifest),
            description=manifest.description or None,
        )
        number = int(version.version)
        for alias in aliases:
            self.set_alias(name, alias, number)
        logger.info("registered %s/%s (sha256 %s)", name, number, weights_hash[:12])
        return self.get_version(name, number)

    def _log_run(self, name: str, source_dir: Path, manifest: Manifest, run_id: str | None) -> str:
        own_run = run_id is None
        if run_id is None:
            run_id = self._client.create_run(self._experiment(), run_name=f"register-{name}").info.run_id
        try:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / ARTIFACT_DIR
                shutil.copytree(source_dir, staged)
                manifest.write(staged)
                self._client.log_artifacts(run_id, str(staged), ARTIFACT_DIR)
            for key, value in manifest.metrics.items():
                self._client.log_metric(run_id, key.replace("@", "_at_"), float(value))
            if own_run:
                self._client.set_terminated(run_id)
        except Exception:
            if own_run:
                self._client.set_terminated(run_id, status="FAILED")
            raise
        return run_id

    def _experiment(self) -> str:
        if self._experiment_id is None:
            found = self._client.get_experiment_by_name(EXPERIMENT)
            if found is not None:
                self._experiment_id = found.experiment_id
            else:
                self._experiment_id = self._client.create_experiment(
                    EXPERIMENT, artifact_location=self._artifact_location
                )
        return self._experiment_id

    def _ensure_registered_model(self, name: str, description: str) -> None:
        if not self.has_model(name):
            self._client.create_registered_model(name, description=description or None)

    @staticmethod
    def _tags(manifest: Manifest) -> dict[str, str]:
        contract = manifest.contract
        return {
            "duet.dimension": str(contract.dimension),
            "duet.modalities": ",".join(contract.modalities),
            "duet.trained": str(manifest.trained).lower(),
            "duet.weights_sha256": manifest.lineage.weights_sha256 or "",
        }

    def set_alias(self, name: str, alias: str, version: int | str, require_compatible: bool = False) -> None:
        """Point `alias` at `version`. `require_compatible`: only if that version already holds it, or its
        manifest claims compatibility with the holder (`registry.compat.alias_move`), so collections pinned
        to the holder stay searchable with the alias; else `IncompatibleVersionError` saying why.

        The check and the move hold `_ALIAS_MOVES` (as every alias move and delete in this process does), so
        another move cannot change the holder between them. Moves from other processes are not covered."""
        validate_name(name)
        validate_alias(alias)
        number = validate_version(version)
        info = self.get_version(name, number)
        with _ALIAS_MOVES:
            if require_compatible:
                answer = alias_move(self, info, alias)
                if not answer.allowed:
                    raise IncompatibleVersionError(
                        f"{name}@{alias} was not moved to {info.ref}: {answer.reason}. Register a version trained "
                        "with compatible_with, re-embed the collections, or move the alias without require_compatible"
                    )
            self._client.set_registered_model_alias(name, alias, str(number))

    def delete_alias(self, name: str, alias: str) -> None:
        validate_alias(alias)
        self._require_model(name)
        with _ALIAS_MOVES:
            self._client.delete_registered_model_alias(name, alias)

    # -- reading -----------------------------------------------------------------------

    def has_model(self, name: str) -> bool:
        validate_name(name)
        try:
            self._client.get_registered_model(name)
        except Exception as exc:
            if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def _require_model(self, name: str) -> RegisteredModel:
        validate_name(name)
        try:
            return self._client.get_registered_model(name)
        except Exception as exc:
            if _mlflow_error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
                raise ModelNotFoundError(f"no model named {name!r}; GET /v1/models lists them") from None
            raise

    def resolve(self, ref: ModelRef | str) -> ModelVersionInfo:
        """Turn `name`, `name@alias` or `name/version` into one concrete version."""
        if isinstance(ref, str):
            ref = parse_model_ref(ref)
        registered = self._require_model(ref.name)
        if ref.version is not None:
            return self.get_version(ref.name, ref.version)
        if ref.alias == LATEST:
            latest = self._latest_version(ref.name)
            if latest is None:
                raise VersionNotFoundError(f"model {ref.name!r} has no versions yet")
            return self.get_version(ref.name, latest)
        aliases = dict(registered.aliases or {})
        if ref.alias not in aliases:
            known = ", ".join(sorted(aliases)) or "none"
            raise VersionNotFoundError(f"model {ref.name!r} has no alias {ref.alias!r} (aliases: {known})")
        return self.get_version(ref.name, int(aliases[ref.alias]))

    def get_version(self, name: str, version: int | str, verify: bool = False) -> ModelVersionInfo:
        """One version's record; `verify=True` also re-hashes its files (do it before loading)."""
        validate_name(name)
        number = validate_version(version)
        self._require_model(name)
        try:
            found = self._client.get_model_version(name, str(number))
        except Exception as exc:
            if _mlflow_error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise VersionNotFoundError(f"model {name!r} has no version {number}") from None
            raise
        if found.source is None:  # every version registered here has one
            raise RegistryError(f"model {name!r} version {number} has no artifact source")
        path = self._local_path(name, number, found.source)
        try:
            manifest = Manifest.read(path)
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            reason = _manifest_problem(exc)
            raise ManifestError(
                f"{name}/{number}'s manifest cannot be read ({reason}); register the model again or use another version"
            ) from None
        info = ModelVersionInfo(
            name=name,
            version=number,
            path=path,
            manifest=manifest,
            aliases=tuple(sorted(found.aliases or ())),
            created_at_ms=int(found.creation_timestamp or 0),
        )
        if verify:
            self.verify(info)
        return info

    def _local_path(self, name: str, version: int, source: str) -> Path:
        from mlflow.artifacts import download_artifacts

        if source.startswith("file:") or "://" not in source:
            return Path(download_artifacts(artifact_uri=source, tracking_uri=self.tracking_uri))
        if self._cache_dir is None:
            raise RegistryError("a remote artifact store needs a local cache directory")
        target = self._cache_dir / name / str(version)
        if not (target / ARTIFACT_DIR / MANIFEST_FILE).is_file():
            target.mkdir(parents=True, exist_ok=True)
            download_artifacts(artifact_uri=source, dst_path=str(target), tracking_uri=self.tracking_uri)
        return target / ARTIFACT_DIR

    @staticmethod
    def verify(info: ModelVersionInfo) -> None:
        """Raise `IntegrityError` if the version's files changed since it was registered."""
        from encoders.hashing import hash_directory

        recorded = info.manifest.lineage.weights_sha256
        actual = hash_directory(info.path, exclude=frozenset({MANIFEST_FILE}))
        if recorded and actual != recorded:
            raise IntegrityError(
                f"{info.ref} was modified after registration (sha256 {actual[:12]} != {recorded[:12]})"
            )

    def _latest_version(self, name: str) -> int | None:
        versions = self._client.search_model_versions(f"name='{name}'")
        return max((int(v.version) for v in versions), default=None)

    def list_models(self) -> list[RegisteredModelSummary]:
        summaries = []
        for model in self._client.search_registered_models(order_by=["name ASC"]):
            summaries.append(
                RegisteredModelSummary(
                    name=model.name,
                    description=model.description or "",
                    latest_version=self._latest_version(model.name),
                    aliases={alias: int(v) for alias, v in (model.aliases or {}).items()},
                    created_at_ms=int(model.creation_timestamp or 0),
                )
            )
        return summaries

    def aliases(self, name: str) -> dict[str, int]:
        registered = self._require_model(name)
        return {alias: int(v) for alias, v in (registered.aliases or {}).items()}

    def list_versions(self, name: str) -> list[ModelVersionInfo]:
        self._require_model(name)
        versions = self._client.search_model_versions(f"name='{name}'")
        found = []
        for number in sorted(int(v.version) for v in versions):
            try:
                found.append(self.get_version(name, number))
            except ManifestError as exc:  # one unreadable version: left out (logged), not the whole listing
                logger.warning("%s", exc)
        return found

    # -- optimised variants (derived from a version, kept beside it) -----------------------

    def _variant_folder(self, info: ModelVersionInfo, variant: str) -> Path:
        if not _VARIANT_NAME.match(variant):
            raise InvalidNameError(f"invalid variant name {variant!r}: use '<backend>-<precision>', e.g. onnx-int8")
        if self.variants_dir is None:
            raise RegistryError("this registry has no local folder for variants (no cache directory)")
        return self.variants_dir / info.name / str(info.version) / variant

    def save_variant(self, info: ModelVersionInfo, staged: Path, record: VariantRecord) -> VariantInfo:
        """Move the variant files in `staged` beside `info` with their record (hash filled in),
        replacing an earlier variant of the same name in one rename. The version itself is untouched."""
        from encoders.hashing import hash_directory

        folder = self._variant_folder(info, record.name)
        record = record.model_copy(
            update={
                "source_ref": info.ref,
                "source_weights_sha256": info.manifest.lineage.weights_sha256,
                "files_sha256": hash_directory(staged, exclude=frozenset({VARIANT_FILE})),
            }
        )
        record.write(staged)
        folder.parent.mkdir(parents=True, exist_ok=True)
        incoming = folder.with_name(f".{record.name}.{uuid.uuid4().hex}")
        shutil.move(str(staged), incoming)
        if folder.exists():
            retired = folder.with_name(f".{record.name}.old.{uuid.uuid4().hex}")
            folder.rename(retired)
            incoming.rename(folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            incoming.rename(folder)
        logger.info(
            "saved variant %s:%s (gate %s)", info.ref, record.name, "passed" if record.fidelity.passed else "refused"
        )
        return VariantInfo(info, folder, record)

    def get_variant(self, info: ModelVersionInfo, variant: str, verify: bool = False) -> VariantInfo:
        """The variant `variant` of `info`; `verify=True` also checks its files and source (before loading)."""
        folder = self._variant_folder(info, variant)
        if not (folder / VARIANT_FILE).is_file():
            backend, _, precision = variant.partition("-")
            flag = " --int8" if precision == "int8" else ""
            raise VersionNotFoundError(
                f"{info.ref} has no {variant} variant; create it with "
                f"`duet models optimize {info.ref} --backend {backend}{flag}`"
            )
        found = VariantInfo(info, folder, VariantRecord.read(folder))
        if verify:
            self.verify_variant(found)
        return found

    def list_variants(self, info: ModelVersionInfo) -> dict[str, VariantRecord]:
        root = self._variant_folder(info, "x-x").parent
        if not root.is_dir():
            return {}
        return {
            folder.name: VariantRecord.read(folder)
            for folder in sorted(root.iterdir())
            if _VARIANT_NAME.match(folder.name) and (folder / VARIANT_FILE).is_file()
        }

    @staticmethod
    def verify_variant(variant: VariantInfo) -> None:
        """Raise `IntegrityError` if the variant's files changed, or were derived from other weights."""
        from encoders.hashing import hash_directory

        record = variant.record
        actual = hash_directory(variant.path, exclude=frozenset({VARIANT_FILE}))
        if actual != record.files_sha256:
            raise IntegrityError(
                f"{variant.ref} was modified after it was saved (sha256 {actual[:12]} != {record.files_sha256[:12]})"
            )
        weights = variant.version.manifest.lineage.weights_sha256
        if record.source_weights_sha256 != weights:
            raise IntegrityError(
                f"{variant.ref} was derived from other weights than {variant.version.ref}'s; optimize again"
            )
