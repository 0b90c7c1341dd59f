"""A model version's calibration for quantised embeddings out, kept beside the version.

int8/uint8 output needs per-dimension ranges measured on a calibration sample (encoders/quantize.py).
They are measured once per version and kept as `calibration.json` in the folder that holds the
version's artifact folder (`ModelVersionInfo.path.parent`), not inside it: the artifact folder is
hashed at registration and re-hashed before every load, so a file added there would make the
version look tampered with; and the manifest stays untouched (versions are immutable). With a
remote artifact store that folder is the version's local cache, so each machine keeps its own.

The file holds the sample's embeddings themselves (float32, base64), not only their ranges: a
request that truncates (`dimensions`) is quantised with ranges of the sample truncated the same
way, which min/max over the full vectors cannot give.

Publishing is first-writer-wins: two processes that calibrate the same version at once both
write a temporary file, and only one is linked into place; the other reads and uses the winner's.
So every replica quantises a version with the same ranges, and they never change once written.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from common.durable import fsync_dir
from registry.store import ModelVersionInfo

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


class Calibration(BaseModel):
    """Embeddings of a calibration sample by one model version, and where they came from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = 1
    ref: str = Field(description="The version that embedded the sample ('name/version').")
    weights_sha256: str | None = Field(description="The version's weights hash: a file of another version is ignored.")
    sample: str = Field(description="Which sample was embedded, e.g. 'duet-builtin-v1'.")
    sample_sha256: str
    count: int = Field(ge=2)
    dimension: int = Field(ge=1)
    embeddings_b64: str = Field(description="count x dimension little-endian float32, row-major, base64.")
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @model_validator(mode="after")
    def _embeddings_fit_the_shape(self) -> Calibration:
        """A truncated or hand-edited file is refused here, not when a request decodes it."""
        try:
            size = len(base64.b64decode(self.embeddings_b64, validate=True))
        except binascii.Error:
            raise ValueError("embeddings_b64 is not base64") from None
        if size != self.count * self.dimension * 4:
            raise ValueError(f"embeddings_b64 holds {size} bytes, not {self.count} x {self.dimension} float32")
        return self


def calibration_path(info: ModelVersionInfo) -> Path:
    """Where `info`'s calibration lives: beside its artifact folder, never inside it."""
    return info.path.parent / CALIBRATION_FILE


def _belongs_to(calibration: Calibration, info: ModelVersionInfo) -> bool:
    return (
        calibration.ref == info.ref
        and calibration.weights_sha256 == info.manifest.lineage.weights_sha256
        and calibration.dimension == info.manifest.contract.dimension
    )


def read_calibration(info: ModelVersionInfo) -> Calibration | None:
    """The version's calibration, or None when there is none yet. A file that does not parse, or
    that another version wrote (another ref, weights or dimension), counts as none, logged."""
    path = calibration_path(info)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable (permissions, a directory in its place): calibrate afresh
        logger.warning("ignoring %s: cannot read it (%s)", path, exc)
        return None
    try:
        calibration = Calibration.model_validate_json(text)
    except ValidationError as exc:
        logger.warning("ignoring %s: not a calibration file (%s)", path, exc.errors()[0].get("msg"))
        return None
    if not _belongs_to(calibration, info):
        logger.warning("ignoring %s: it was written for %s, not %s", path, calibration.ref, info.ref)
        return None
    return calibration


def publish_calibration(info: ModelVersionInfo, calibration: Calibration) -> Calibration:
    """Store `calibration` for `info` unless a valid one is already there; return the one in force.

    The file is written and fsynced under a temporary name, then hard-linked into place, which
    fails if the name exists: the first writer wins and a reader never sees a partial file. An
    existing file that is unreadable or another version's is replaced (atomically, by rename).
    """
    if not _belongs_to(calibration, info):
        raise ValueError(f"a calibration for {calibration.ref} cannot be stored for {info.ref}")
    path = calibration_path(info)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(json.dumps(calibration.model_dump(mode="json"), sort_keys=True) + "\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            existing = read_calibration(info)
            if existing is not None:
                return existing
            os.replace(tmp, path)
        fsync_dir(path.parent)  # so a crash cannot lose a calibration already served
        return read_calibration(info) or calibration  # another process may have replaced it since
    finally:
        tmp.unlink(missing_ok=True)
