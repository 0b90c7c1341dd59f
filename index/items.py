"""The two records every backend trades in: an item as stored, and a search hit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class StoredItem:
    id: str
    modality: str
    vector: np.ndarray
    payload: dict[str, Any] = field(default_factory=dict)
    content: str | None = None
    vid: int = -1  # the faiss backend's integer id for the item's vector; unused by others


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    modality: str
    content: str | None
