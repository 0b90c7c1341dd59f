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


# What a search hit may carry beyond id, score and modality (a search's `include`), and what it carries when
# the search does not say: payload and content, as every answer had before `include` existed.
HIT_FIELDS = ("payload", "content", "vector")
HIT_DEFAULT = frozenset({"payload", "content"})


@dataclass
class Hit:
    id: str
    score: float
    payload: dict[str, Any]
    modality: str
    content: str | None
    vector: np.ndarray | None = None  # only when the search asks for it (`include`)
