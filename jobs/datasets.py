"""Uploaded datasets: stored once by content hash under `<data_dir>/datasets`.

An upload lands in a temporary file while it is hashed and measured, then moves to
`<sha256[:16]>/<filename>`; job configs name it by that relative path. A `.zip` upload (a
JSONL/CSV file plus the images it names) is unpacked beside it. The archive is untrusted:

- entries are counted (`max_files`) and their bytes are counted while they are written
  (`max_unpacked_bytes`, and what is left of the uploader's storage): a header's declared
  size proves nothing;
- refused: entries that would escape the folder, links, names with a part starting with `.`
  (our manifests are `.<name>.dataset.json`; `.` and `..`), the archive's own name, an entry
  that is both a file and a folder (`a` and `a/b`), and duplicates;
- it is unpacked into a staging folder first, so a refused archive leaves nothing behind, and
  files already in the dataset's folder are never overwritten with other bytes.

Each name's manifest records the keys that uploaded it and the disk it uses, which is what
`dataset_storage_per_key_bytes` counts. A key sees (lists, names in job configs) only the
datasets it uploaded; with auth off every upload is the one anonymous owner's. Listing skips
(and logs) anything on disk it cannot read instead of failing for everyone.
"""

from __future__ import annotations

import fcntl
import filecmp
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

logger = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALLOWED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".zip", ".txt")
MANIFEST = "dataset.json"
ANONYMOUS = ""  # the owner of uploads while auth is off: one storage allowance for all
_CHUNK = 1024 * 1024


class DatasetError(ValueError):
    """An upload that cannot be stored as it is; the message says what to change."""


class DatasetNameError(DatasetError):
    """The name given for an upload is not one it may be stored under (the API's `filename`)."""


class EmptyDatasetError(DatasetError):
    """An upload of no bytes: nothing to store."""


class DatasetTooLargeError(DatasetError):
    """Over a size, count or storage limit (HTTP 413); `code` says which."""

    def __init__(self, message: str, code: str = "dataset_too_large") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    path: str  # relative to the datasets folder: what a job config names
    filename: str
    sha256: str
    bytes: int
    files: int
    # Not shown to callers: which keys uploaded it, and the disk it takes (archive + unpacked).
    owners: tuple[str, ...] = field(default=(), repr=False)
    disk_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        public = {k: v for k, v in asdict(self).items() if k not in ("owners", "disk_bytes")}
        return {"object": "dataset", **public}

    @classmethod
    def from_json(cls, text: str) -> DatasetInfo:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        data["owners"] = tuple(str(o) for o in data.get("owners", ()))
        return cls(**data)


def check_filename(filename: str) -> str:
    name = filename.strip()
    if not _SAFE_NAME.match(name) or ".." in name:
        raise DatasetNameError(
            f"filename {filename!r} is not allowed: use letters, digits, '.', '_' and '-' (at most 128 characters), "
            "no folders"
        )
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        raise DatasetNameError(f"filename {filename!r} must end with one of {', '.join(ALLOWED_SUFFIXES)}")
    return name


@dataclass
class DatasetLimits:
    max_bytes: int  # one upload
    max_files: int = 10_000  # entries of one archive
    max_unpacked_bytes: int = 1024**3  # what one archive unpacks to
    storage_per_owner: int = 4 * 1024**3  # everything one key uploaded


class DatasetStore:
    def __init__(self, root: Path, limits: DatasetLimits | int) -> None:
        self.root = root
        self.limits = limits if isinstance(limits, DatasetLimits) else DatasetLimits(max_bytes=limits)

    @property
    def max_bytes(self) -> int:
        return self.limits.max_bytes

    def begin(self) -> tuple[Path, hashlib._Hash]:
        self.root.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        os.close(handle)
        return Path(name), hashlib.sha256()

    # -- storage per owner ---------------------------------------------------------------------

    def usage(self, owner: str) -> int:
        """Disk used by the datasets `owner` uploaded (a dataset two keys uploaded counts for both)."""
        return sum(info.disk_bytes for info in self._manifests() if owner in info.owners)

    def room(self, owner: str) -> int:
        return self.limits.storage_per_owner - self.usage(owner)

    def _quota_error(self, owner: str, needed: int, room: int) -> DatasetTooLargeError:
        who = f"API key '{owner}'" if owner else "uploads (auth is off: one allowance for all)"
        return DatasetTooLargeError(
            f"storage for datasets is full: {who} may use {self.limits.storage_per_owner} bytes "
            f"(DUET_DATASET_STORAGE_PER_KEY_BYTES), {max(room, 0)} are left and this upload needs {needed}",
            code="dataset_storage_full",
        )

    @contextmanager
    def _owner_lock(self, owner: str) -> Iterator[None]:
        """Check-and-store of one owner's uploads, one at a time (across processes on this host)."""
        name = hashlib.sha256(owner.encode()).hexdigest()[:16]
        with (self.root / f".lock-{name}").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- commit ----------------------------------------------------------------------------------

    def commit(self, temp: Path, digest: str, size: int, filename: str, owner: str = ANONYMOUS) -> DatasetInfo:
        """Move a fully received upload into place. Idempotent: the same bytes get the same
        id; the same bytes under another name are added beside the first name."""
        dataset_id = digest[:16]
        folder = self.root / dataset_id
        try:
            with self._owner_lock(owner):
                existing = self._existing(folder, filename)
                if existing is not None:
                    return self._add_owner(folder, existing, owner)
                room = self.room(owner)
                if size > room:
                    raise self._quota_error(owner, size, room)
                staging = Path(tempfile.mkdtemp(prefix=f".{dataset_id}-", dir=self.root))
                try:
                    shutil.move(str(temp), staging / filename)
                    files, unpacked = 1, 0
                    if filename.lower().endswith(".zip"):
                        count, unpacked = self._unpack(staging / filename, staging, owner, room - size)
                        files += count
                    info = DatasetInfo(
                        dataset_id, f"{dataset_id}/{filename}", filename, digest, size, files, (owner,), size + unpacked
                    )
                    self._write(staging, info)
                    self._place(staging, folder, self._manifest(staging, filename))
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
                return info
        finally:
            temp.unlink(missing_ok=True)

    def _existing(self, folder: Path, filename: str) -> DatasetInfo | None:
        """This name's manifest, if these bytes were uploaded under it before. A file of that
        name without one is an entry of an archive with the same bytes: the name is taken."""
        if not (folder / filename).exists():
            return None
        try:
            return self._read(folder, filename)
        except (OSError, ValueError, TypeError):
            raise DatasetError(
                f"{filename!r} is already a file of this dataset (an entry of an archive with the same content); "
                "upload it under another name"
            ) from None

    def _add_owner(self, folder: Path, info: DatasetInfo, owner: str) -> DatasetInfo:
        if owner in info.owners:
            return info
        room = self.room(owner)
        if info.disk_bytes > room:
            raise self._quota_error(owner, info.disk_bytes, room)
        info = replace(info, owners=(*info.owners, owner))
        self._write(folder, info)
        return info

    def _place(self, staging: Path, folder: Path, manifest: Path) -> None:
        """A new dataset: the staging folder becomes it, in one rename. The same bytes under a
        new name: its files join the folder; one already there must hold the same bytes, except
        `manifest` (this name's own, written in staging; an entry may be named `x.dataset.json`)."""
        try:
            staging.rename(folder)
            return
        except OSError:
            if not folder.is_dir():
                raise
        files = sorted(p for p in staging.rglob("*") if not p.is_dir())
        for source in files:
            target = folder / source.relative_to(staging)
            if source == manifest:
                continue  # written below
            if target.is_dir() or (target.exists() and not filecmp.cmp(source, target, shallow=False)):
                raise DatasetError(
                    f"entry {str(source.relative_to(staging))!r} would replace a different file of this dataset; "
                    "upload it under another name"
                )
        for source in files:
            target = folder / source.relative_to(staging)
            if source == manifest or not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)

    @staticmethod
    def _manifest(folder: Path, filename: str) -> Path:
        return folder / f".{filename}.{MANIFEST}"

    def _write(self, folder: Path, info: DatasetInfo) -> None:
        path = self._manifest(folder, info.filename)
        temp = path.with_name(path.name + ".tmp")
        temp.write_text(json.dumps({**asdict(info), "owners": list(info.owners)}))
        os.replace(temp, path)

    def _read(self, folder: Path, filename: str) -> DatasetInfo:
        return DatasetInfo.from_json(self._manifest(folder, filename).read_text())

    # -- archives --------------------------------------------------------------------------------

    def _unpack(self, archive: Path, folder: Path, owner: str, room: int) -> tuple[int, int]:
        """(files, bytes) unpacked from `archive` into `folder`, checking every entry first and
        every byte as it is written."""
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = self._check_members(zipped.infolist(), archive.name)
                budget = min(self.limits.max_unpacked_bytes, room)
                written = 0
                for member in members:
                    target = folder / member.filename
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(member) as source, target.open("xb") as sink:
                        while chunk := source.read(_CHUNK):
                            written += len(chunk)
                            if written > budget:
                                raise self._unpacked_error(written, budget, owner, room)
                            sink.write(chunk)
                return len(members), written
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
            raise DatasetError(f"the upload ends with .zip but is not a readable zip archive: {exc}") from None
        except (OSError, RuntimeError) as exc:  # e.g. an encrypted entry, a name the filesystem refuses
            raise DatasetError(
                f"the archive cannot be unpacked: {type(exc).__name__}: {exc.args[-1] if exc.args else ''}"
            ) from None

    def _unpacked_error(self, written: int, budget: int, owner: str, room: int) -> DatasetError:
        if budget == room and room < self.limits.max_unpacked_bytes:
            return self._quota_error(owner, written, room)
        return DatasetTooLargeError(
            f"the archive unpacks to more than the {self.limits.max_unpacked_bytes} bytes allowed "
            "(DUET_MAX_DATASET_UNPACKED_BYTES)"
        )

    def _check_members(self, infos: list[zipfile.ZipInfo], archive_name: str) -> list[zipfile.ZipInfo]:
        if len(infos) > self.limits.max_files:
            raise DatasetTooLargeError(
                f"the archive has {len(infos)} entries, more than the {self.limits.max_files} allowed "
                "(DUET_MAX_DATASET_FILES)",
                code="dataset_too_many_files",
            )
        files: dict[str, zipfile.ZipInfo] = {}
        folders: set[str] = set()
        for info in infos:
            name = info.filename
            parts = _entry_parts(name)
            if (info.external_attr >> 16) & 0o170000 == 0o120000:
                raise DatasetError(f"archive entry {name!r} is a symbolic link; links are refused")
            if parts == (archive_name,):
                raise DatasetError(f"archive entry {name!r} has the archive's own name; rename it")
            parents = {"/".join(parts[:i]) for i in range(1, len(parts))}
            key = "/".join(parts)
            if info.is_dir():
                folders |= parents | {key}
                continue
            if key in files:
                raise DatasetError(f"archive entry {name!r} appears twice")
            files[key] = info
            folders |= parents
        clash = sorted(folders & files.keys())
        if clash:
            raise DatasetError(f"archive entry {clash[0]!r} is both a file and a folder")
        return list(files.values())

    # -- listing ---------------------------------------------------------------------------------

    def _manifests(self) -> Iterator[DatasetInfo]:
        """Every readable manifest; anything else on disk is logged and skipped."""
        if not self.root.is_dir():
            return
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            for manifest in sorted(folder.glob(f".*.{MANIFEST}")):
                try:
                    yield DatasetInfo.from_json(manifest.read_text())
                except (OSError, ValueError, TypeError) as exc:
                    logger.warning("skipping unreadable dataset manifest %s: %s", manifest, exc)

    def list(self, owner: str | None = None) -> list[DatasetInfo]:
        """All datasets, or those `owner` uploaded (or that predate owners being recorded)."""
        return [info for info in self._manifests() if owner is None or _visible(info, owner)]

    def visible(self, path: str, owner: str) -> bool:
        """Whether `owner` may use `path` (`<id>/...`): some name of that upload is theirs."""
        dataset_id = PurePosixPath(path).parts[0] if path else ""
        folder = self.root / dataset_id
        if not dataset_id or dataset_id.startswith(".") or not folder.is_dir():
            return False
        for manifest in folder.glob(f".*.{MANIFEST}"):
            try:
                if _visible(DatasetInfo.from_json(manifest.read_text()), owner):
                    return True
            except (OSError, ValueError, TypeError):
                continue
        return False


def _visible(info: DatasetInfo, owner: str) -> bool:
    return owner in info.owners or not info.owners  # no owners: uploaded before they were recorded


def _entry_parts(name: str) -> tuple[str, ...]:
    """An entry's path parts, refusing anything that could leave the folder or clash with our
    own files: absolute paths, backslashes, empty parts, and parts starting with '.'."""
    pure = PurePosixPath(name)
    parts = tuple(p for p in name.split("/") if p != "")
    if not parts or pure.is_absolute() or "\\" in name or "\0" in name:
        raise DatasetError(f"archive entry {name[:200]!r} points outside the dataset folder")
    if any(p.startswith(".") for p in parts):
        what = "points outside the dataset folder" if any(p in (".", "..") for p in parts) else "is reserved"
        raise DatasetError(f"archive entry {name[:200]!r} {what}: names (and folders) may not start with '.'")
    return parts
