"""Uploaded datasets: stored once by content hash under `<data_dir>/datasets`.

An upload lands in a temporary file while it is hashed and measured, then moves to
`<sha256[:16]>/<filename>`; job configs name it by that relative path. A `.zip` upload (a
JSONL/CSV file plus the images it names) is unpacked beside it, refusing entries that would
escape the folder, links, and archives that inflate beyond the size limit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALLOWED_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".zip", ".txt")
MANIFEST = "dataset.json"


class DatasetError(ValueError):
    """An upload that cannot be stored as it is; the message says what to change."""


@dataclass(frozen=True)
class DatasetInfo:
    id: str
    path: str  # relative to the datasets folder: what a job config names
    filename: str
    sha256: str
    bytes: int
    files: int

    def to_dict(self) -> dict:
        return {"object": "dataset", **asdict(self)}


def check_filename(filename: str) -> str:
    name = filename.strip()
    if not _SAFE_NAME.match(name) or ".." in name:
        raise DatasetError(
            f"filename {filename!r} is not allowed: use letters, digits, '.', '_' and '-' (at most 128 characters), "
            "no folders"
        )
    if not name.lower().endswith(ALLOWED_SUFFIXES):
        raise DatasetError(f"filename {filename!r} must end with one of {', '.join(ALLOWED_SUFFIXES)}")
    return name


class DatasetStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def begin(self) -> tuple[Path, hashlib._Hash]:
        self.root.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".upload-", dir=self.root)
        os.close(handle)
        return Path(name), hashlib.sha256()

    def commit(self, temp: Path, digest: str, size: int, filename: str) -> DatasetInfo:
        """Move a fully received upload into place. Idempotent: the same bytes get the same
        id; the same bytes under another name are added beside the first name."""
        dataset_id = digest[:16]
        folder = self.root / dataset_id
        try:
            if folder.is_dir():
                if not (folder / filename).is_file():
                    shutil.move(str(temp), folder / filename)
                    files = 1 + (self._unpack(folder / filename, folder) if filename.lower().endswith(".zip") else 0)
                    self._write(
                        folder, DatasetInfo(dataset_id, f"{dataset_id}/{filename}", filename, digest, size, files)
                    )
                return self._read(folder, filename)
            staging = Path(tempfile.mkdtemp(prefix=f".{dataset_id}-", dir=self.root))
            try:
                shutil.move(str(temp), staging / filename)
                files = 1
                if filename.lower().endswith(".zip"):
                    files += self._unpack(staging / filename, staging)
                info = DatasetInfo(dataset_id, f"{dataset_id}/{filename}", filename, digest, size, files)
                self._write(staging, info)
                staging.rename(folder)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            return info
        finally:
            temp.unlink(missing_ok=True)

    @staticmethod
    def _manifest(folder: Path, filename: str) -> Path:
        return folder / f".{filename}.{MANIFEST}"

    def _write(self, folder: Path, info: DatasetInfo) -> None:
        self._manifest(folder, info.filename).write_text(json.dumps(asdict(info)))

    def _read(self, folder: Path, filename: str) -> DatasetInfo:
        return DatasetInfo(**json.loads(self._manifest(folder, filename).read_text()))

    def _unpack(self, archive: Path, folder: Path) -> int:
        try:
            with zipfile.ZipFile(archive) as zipped:
                members = [m for m in zipped.infolist() if not m.is_dir()]
                total = sum(m.file_size for m in members)
                if total > self.max_bytes:
                    raise DatasetError(
                        f"the archive unpacks to {total} bytes, more than the {self.max_bytes} allowed "
                        "(DUET_MAX_DATASET_BYTES)"
                    )
                for member in members:
                    target = (folder / member.filename).resolve()
                    if not target.is_relative_to(folder.resolve()) or member.filename.startswith("/"):
                        raise DatasetError(f"archive entry {member.filename!r} points outside the dataset folder")
                    if (member.external_attr >> 16) & 0o170000 == 0o120000:
                        raise DatasetError(f"archive entry {member.filename!r} is a symbolic link; links are refused")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zipped.open(member) as source, target.open("wb") as sink:
                        shutil.copyfileobj(source, sink)
                return len(members)
        except zipfile.BadZipFile as exc:
            raise DatasetError(f"the upload ends with .zip but is not a readable zip archive: {exc}") from None

    def list(self) -> list[DatasetInfo]:
        if not self.root.is_dir():
            return []
        return [
            DatasetInfo(**json.loads(manifest.read_text()))
            for folder in sorted(self.root.iterdir())
            if folder.is_dir() and not folder.name.startswith(".")
            for manifest in sorted(folder.glob(f".*.{MANIFEST}"))
        ]
