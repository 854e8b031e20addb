"""Block ids merged into runs: pairs (dst[i], src[i]) whose ids both advance by one become one copy of ``count``
consecutive blocks, so a copy of n blocks costs one copy call per run rather than one per block.

The pairs are ordered by source id first (stable: equal source ids keep their order), so blocks that are
consecutive in the source but were listed out of order still merge, and the source is read in address order.
"""

from __future__ import annotations

import numpy as np


def _ids(name: str, ids: object) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise ValueError(f"{name} block ids must be a 1-D sequence of integers, got {a.dtype} of shape {a.shape}")
    a = a.astype(np.int64, copy=False)
    if a.size and int(a.min()) < 0:
        raise ValueError(f"{name} block id {int(a.min())} is negative")
    return a


def merge_runs(dst_ids: object, src_ids: object) -> np.ndarray:
    """Rows (dst, src, count), int64 of shape [n, 3]: run k copies blocks src..src+count-1 to dst..dst+count-1.
    Expanding the runs gives back exactly the input pairs. A destination id listed twice is an error (which copy
    would win?); a source id listed twice is not (one block copied to two places)."""
    dst, src = _ids("destination", dst_ids), _ids("source", src_ids)
    if len(dst) != len(src):
        raise ValueError(f"{len(src)} source blocks for {len(dst)} destination blocks")
    if not len(dst):
        return np.empty((0, 3), dtype=np.int64)
    ordered = np.sort(dst)
    twice = ordered[1:][ordered[1:] == ordered[:-1]]
    if len(twice):
        raise ValueError(f"destination block {int(twice[0])} is listed more than once; each block has one source")
    order = np.argsort(src, kind="stable")
    dst, src = dst[order], src[order]
    # A run starts at the first pair and wherever either id does not advance by exactly one.
    starts = np.flatnonzero(np.concatenate(([True], (np.diff(dst) != 1) | (np.diff(src) != 1))))
    counts = np.diff(np.append(starts, len(dst)))
    return np.stack((dst[starts], src[starts], counts), axis=1).astype(np.int64, copy=False)
