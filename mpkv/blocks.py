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
    if arr.size == 0:
        return arr
    ordered = np.sort(arr)  # on the hot path of every task: a sort, not np.unique (ten times slower here)
    if ordered[0] < 0 or ordered[-1] >= limit:
        bad = ordered[(ordered < 0) | (ordered >= limit)]
        raise BadBlocks(f"{what} {sorted(set(bad.tolist()))[:8]} out of range: valid ids are 0..{limit - 1}")
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise BadBlocks(f"{what} {sorted(set(repeated.tolist()))[:8]} appear more than once")
    return arr
