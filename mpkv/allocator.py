"""Device blocks as the engine hands them out: a free list per instance, kept by the one client that allocates
(``Client.blocks``). On a decode instance the lease allocator (mpkv.pd.leases) takes its leases from the same
list, so blocks leased to transfers and blocks allocated for local requests never meet."""

from __future__ import annotations

import numpy as np

from mpkv.errors import BadBlocks


class BlockAllocator:
    def __init__(self, n_blocks: int, where: str) -> None:
        self.n_blocks, self.where = n_blocks, where
        self._free = list(range(n_blocks - 1, -1, -1))  # popped from the end: block 0 first
        self._taken: set[int] = set()

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self, n: int, what: str) -> np.ndarray:
        """``n`` blocks (int32, lowest first) for ``what``, or BadBlocks saying how many are free."""
        if n > len(self._free):
            raise BadBlocks(
                f"{what}: {n} blocks needed, {len(self._free)} of {self.n_blocks} free in {self.where}; "
                "wait for running requests to finish, or launch with more --device-blocks"
            )
        blocks = self._free[len(self._free) - n :][::-1]
        del self._free[len(self._free) - n :]
        self._taken.update(blocks)
        return np.array(blocks, dtype=np.int32)

    def give_back(self, blocks: np.ndarray) -> None:
        """Return blocks taken from here; a block not taken (or returned twice) is refused, nothing returned."""
        ids = [int(b) for b in np.asarray(blocks).reshape(-1)]
        stray = sorted(set(ids) - self._taken)
        if stray or len(set(ids)) != len(ids):
            raise BadBlocks(f"blocks {stray[:8] or ids[:8]} of {self.where} were not allocated (or are given twice)")
        self._taken.difference_update(ids)
        self._free.extend(reversed(ids))
