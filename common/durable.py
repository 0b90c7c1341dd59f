"""Durable file replacement: the one piece every package that writes a file in place needs.

A rename (or a new hard link) is atomic but not durable until the folder's own entry list is
fsynced too: after a power cut the old name could come back. Snapshots, collection configs and
model calibrations all end with this call.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (the folder's own entry list)."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
