"""Library and code versions, recorded in every manifest's lineage."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

_LIBRARIES = ("duet", "torch", "transformers", "sentence-transformers", "numpy")


def library_versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def code_version() -> str:
    """The git commit of the checkout Duet runs from, else the installed package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"duet=={metadata.version('duet')}"
        except metadata.PackageNotFoundError:
            return "unknown"
