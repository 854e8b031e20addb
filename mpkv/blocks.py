"""Validation of block ids, before anything is copied: range, duplicates, count. Errors name the bad ids."""

from __future__ import annotations

import numpy as np

from mpkv.errors import MpkvError


class BadBlocks(MpkvError, ValueError):
    """Block or slot ids that cannot be used; nothing was copied."""


def check_ids(ids: object, limit: int, what: str) -> np.ndarray:
    """``ids`` as an int64 array, after checking 0 <= id < limit and no duplicates."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise BadBlocks(f"{what} must be a 1-D array of integers, got shape {arr.shape} of {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= limit)]
    if bad.size:
        raise BadBlocks(f"{what} {sorted(set(bad.tolist()))[:8]} out of range: valid ids are 0..{limit - 1}")
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        raise BadBlocks(f"{what} {uniq[counts > 1].tolist()[:8]} appear more than once")
    return arr
