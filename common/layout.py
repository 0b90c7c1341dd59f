"""Where each kind of state lives under the data dir, named once for every process.

The server's settings, the job worker and the training process it spawns all find the same
folders from the same data dir; spelling the paths out in each of them let them drift.
"""

from __future__ import annotations

from pathlib import Path


def registry_dir(data_dir: Path) -> Path:
    """The embedded MLflow registry (SQLite) and the artifacts of registered versions."""
    return data_dir / "registry"


def collections_dir(data_dir: Path) -> Path:
    """The faiss backend's collections (one folder each), and the data-dir lock."""
    return data_dir / "collections"


def datasets_dir(data_dir: Path) -> Path:
    """Uploaded datasets; relative dataset paths in job configs resolve here."""
    return data_dir / "datasets"


def jobs_db(data_dir: Path) -> Path:
    """The embedded job store (SQLite), used when no Redis is configured."""
    return data_dir / "jobs.sqlite3"


def job_run_dir(data_dir: Path, job_id: str) -> Path:
    """Per job, not per attempt: a resumed attempt finds the checkpoints of the last one."""
    return data_dir / "jobs" / job_id


def milvus_lite_file(data_dir: Path) -> Path:
    """milvus-lite's embedded database, the milvus backend's default when DUET_MILVUS_URI is unset."""
    return data_dir / "milvus.db"
