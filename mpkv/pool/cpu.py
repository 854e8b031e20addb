"""The cpu backend: a pool is a POSIX shared-memory segment viewed as one torch tensor.

Memory released is measured as the segment's allocated blocks on tmpfs just before it is unlinked (tmpfs
frees them when the last mapping goes; the protocol guarantees the owner's is the last one, and the
controller checks /proc/PID/maps of every actor for leftovers).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.layout import SegmentKind
from mpkv.pool import PoolHandle
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment


def _as_tensor(seg: Segment, cfg: CacheConfig, blocks: int) -> torch.Tensor:
    # Through numpy on purpose: a numpy array holds a buffer export of the mapping, and every torch view made
    # from it keeps that array alive. So unmapping while any view lives raises BufferError (see _close) instead
    # of leaving a tensor pointing at unmapped memory. (torch.frombuffer keeps only a reference, not an export.)
    flat = torch.from_numpy(np.frombuffer(seg.payload, dtype=np.uint8))
    return flat.view(cfg.torch_dtype).view(cfg.pool_shape(blocks))


def _close(seg: Segment, what: str) -> None:
    try:
        seg.close()
    except BufferError:
        raise MpkvError(
            f"cannot unmap {what} {seg.name}: this process still holds a tensor view of it "
            "(a stale view would read freed memory after a restore)"
        ) from None


class ShmPool:
    def __init__(
        self, registry: Registry, cfg: CacheConfig, obj: str, blocks: int, rank: int, epoch: int, wv: int
    ) -> None:
        self._registry = registry
        # A pool per restore: its name gets a random part, or another user could create it first from the run id.
        self._seg = registry.create_unique_segment(obj, SegmentKind.POOL, cfg.pool_bytes(blocks))
        self.tensor = _as_tensor(self._seg, cfg, blocks)
        self.tensor.view(torch.uint8).zero_()  # touch every page: the memory is really there, and measurable
        self._seg.mark_ready()
        self._handle = PoolHandle("cpu", rank, epoch, wv, cfg.pool_bytes(blocks), name=self._seg.name)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        held = os.stat(naming.shm_path(self._seg.name)).st_blocks * 512
        self.__dict__.pop("tensor", None)
        _close(self._seg, "pool")
        self._registry.release(self._seg)
        return int(held)


class AttachedShmPool:
    def __init__(self, cfg: CacheConfig, handle: PoolHandle) -> None:
        blocks = handle.nbytes // cfg.block_bytes
        self._seg = Segment.attach(handle.name, SegmentKind.POOL, handle.nbytes)
        self.tensor = _as_tensor(self._seg, cfg, blocks)

    def close(self) -> None:
        self.__dict__.pop("tensor", None)
        _close(self._seg, "attached pool")
