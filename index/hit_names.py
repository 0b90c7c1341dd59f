"""Item id and modality by FAISS id, in memory: what a search hit needs when it carries nothing else.

Why: a 256-query batch of top-10 is 2,560 hits. Looking their rows up in SQLite (one statement, plain
tuples) still cost about twice the IVF search itself at nprobe 4, so an ANN index answered at half its
speed through a collection (bench/search.py). Hits without payload, content or vector (`include: []`,
the cheap search wire) only need two columns, and those fit in memory: two arrays indexed by the
FAISS id (`vid`), about 9 bytes per vid ever handed out plus the id strings, ~70 MB at a million items.

Vids are handed out in increasing order and never reused (index/store.py), so the arrays only grow;
a vid whose item was replaced or deleted reads as absent. Kept in step by the collection, under its
write lock: names go in before their vectors reach the index and leave after the vectors left it, so
any vid a search can find has its name (or was deleted meanwhile, as with a row lookup).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from index.config import MODALITIES

_GROWTH = 1.5
_MIN_CAPACITY = 1024
# Modality codes: 0 means "no item has this vid".
_CODE = {modality: code for code, modality in enumerate(MODALITIES, start=1)}
_NAME = np.array([None, *MODALITIES], dtype=object)


class HitNames:
    """vid -> (id, modality). Writers call `add` / `remove` one at a time (the collection's write lock);
    readers call `lookup` from any thread without a lock: a grown array is a new object swapped in whole,
    and a reader that holds the old one sees every name it held before."""

    def __init__(self) -> None:
        self._ids = np.full(_MIN_CAPACITY, None, dtype=object)
        self._codes = np.zeros(_MIN_CAPACITY, dtype=np.uint8)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[int, str, str]]) -> HitNames:
        """From (vid, id, modality) rows, e.g. the store's `names()`."""
        names = cls()
        for vid, item_id, modality in rows:
            names._put(int(vid), item_id, modality)
        return names

    def __len__(self) -> int:
        return int(np.count_nonzero(self._codes))

    def _put(self, vid: int, item_id: str, modality: str) -> None:
        if vid >= len(self._ids):
            self._grow(vid + 1)
        self._ids[vid] = item_id
        self._codes[vid] = _CODE[modality]

    def _grow(self, needed: int) -> None:
        capacity = max(needed, int(len(self._ids) * _GROWTH))
        ids = np.full(capacity, None, dtype=object)
        codes = np.zeros(capacity, dtype=np.uint8)
        ids[: len(self._ids)] = self._ids
        codes[: len(self._codes)] = self._codes
        # Codes first: a reader pairing new codes with old ids finds a vid past the old ids' end and reads
        # it as absent; the other way round it could read a name whose code says "none".
        self._codes, self._ids = codes, ids

    def add(self, vids: Iterable[int], ids: Iterable[str], modalities: Iterable[str]) -> None:
        for vid, item_id, modality in zip(vids, ids, modalities, strict=True):
            self._put(int(vid), item_id, modality)

    def remove(self, vids: Iterable[int]) -> None:
        ids, codes = self._ids, self._codes
        for vid in vids:
            if 0 <= vid < len(ids):
                codes[vid] = 0
                ids[vid] = None

    def lookup(self, vids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, modalities, present) shaped like `vids`: ids and modalities are object arrays (None where
        absent), `present` says where both are known. Absent: FAISS's -1 padding, vids past the end, and
        vids whose item is gone."""
        codes, ids = self._codes, self._ids  # one consistent pair for this call (see `_grow`)
        vids = np.asarray(vids, dtype=np.int64)
        known = (vids >= 0) & (vids < min(len(ids), len(codes)))
        at = np.where(known, vids, 0)
        found = codes[at] * known  # code 0 (absent) where the vid is unknown
        names = ids[at]
        # An id read while `remove` runs may already be None under a code not yet cleared; ids are never
        # empty strings (index.config.validate_item_id), so truthiness tells a name from None.
        present = (found > 0) & names.astype(bool)
        names[~present] = None
        found[~present] = 0
        return names, _NAME[found], present
