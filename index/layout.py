"""The faiss backend's files: where a collection's config, store and index snapshot live on disk,
and how they are replaced durably."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from common.durable import fsync_dir
from index.config import CollectionConfig

logger = logging.getLogger(__name__)

SNAPSHOT_FILE = "index.snapshot"
STORE_FILE = "store.sqlite"
CONFIG_FILE = "collection.json"
_GENERATION = re.compile(r"^gen-(\d+)$")


def data_folder(folder: Path, generation: int) -> Path:
    """Where a generation's store and index snapshot live: generation 0 in the collection folder itself
    (the layout from before re-embeds), later ones in `gen-N/`, so two generations never share a path."""
    return folder if generation == 0 else folder / f"gen-{generation}"


def remove_generation(folder: Path, generation: int) -> None:
    """Delete one generation's store and snapshot (never the collection's config)."""
    if generation:
        shutil.rmtree(data_folder(folder, generation), ignore_errors=True)
        return
    for path in folder.glob("*"):
        if path.is_file() and path.name.startswith((STORE_FILE, "index.")):
            path.unlink(missing_ok=True)


def remove_stale_generations(folder: Path, current: int) -> None:
    """Leftovers of a re-embed that never flipped, or of the generation one replaced, cut short by a restart."""
    for path in folder.glob("gen-*"):
        match = _GENERATION.match(path.name)
        if match and int(match.group(1)) != current:
            logger.warning("collection %s: removing unused %s", folder.name, path.name)
            remove_generation(folder, int(match.group(1)))
    if current and (folder / STORE_FILE).exists():
        remove_generation(folder, 0)


def write_config(folder: Path, config: CollectionConfig) -> None:
    """Replace `collection.json` atomically and durably: the on-disk commit point of a re-embed."""
    tmp = folder / f"{CONFIG_FILE}.tmp"
    with open(tmp, "w") as handle:
        handle.write(json.dumps(config.to_json(), indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, folder / CONFIG_FILE)
    fsync_dir(folder)
