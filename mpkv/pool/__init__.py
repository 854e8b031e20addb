"""KV pools: one device pool per rank (owned by one role, attached by the others) and one host pool per rank.

The owner allocates a fresh pool for every restore, under a new name (``pool.dev.r<rank>.e<epoch>.<random>``:
the random part keeps another user from creating the name first), and publishes a ``PoolHandle`` (with that
full name) in the instance's handle table; attachers map it from the handle, never from a name they build.
Freeing refuses while this process still holds a view (a stale tensor is an error here, not a use-after-free
later).
Backends: ``cpu`` (POSIX shared memory; all CI) and ``cuda`` (one device allocation shared by one CUDA IPC handle).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import msgspec

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.shm.registry import Registry

if TYPE_CHECKING:
    import torch


class PoolHandle(msgspec.Struct, frozen=True):
    """What an attacher needs to map a rank's device pool. Written by the owner, read after PUBLISHED."""

    backend: str
    rank: int
    epoch: int
    weight_version: int
    nbytes: int
    name: str = ""  # cpu: the shm segment's full name (it has a random part: attachers cannot derive it); cuda-vmm:
    # the abstract socket that hands out the memory's file descriptor (mpkv.pool.vmm)
    space: str = ""  # cuda-vmm: the pool's identity across epochs; a process maps each at one address for its life
    cuda: bytes = b""  # cuda: the allocation's CUDA IPC handle (every attacher and link opens this one)


class OwnedPool(Protocol):
    """The owner's side of a pool."""

    tensor: torch.Tensor  # [layers, 2, blocks, block_size, heads_per_rank, head_dim]

    def handle(self) -> PoolHandle: ...

    def free(self) -> int:
        """Release the memory; returns the bytes released, as measured. The caller must hold no other view."""
        ...


class AttachedPool(Protocol):
    tensor: torch.Tensor

    def close(self) -> None: ...


def allocate_device_pool(registry: Registry, cfg: CacheConfig, rank: int, epoch: int, weight_version: int) -> OwnedPool:
    if cfg.backend == "cuda" and cfg.stable_addresses:
        from mpkv.pool import vmm

        return vmm.StablePool(registry, cfg, rank, epoch, weight_version)
    if cfg.backend == "cuda":
        from mpkv.pool import cuda

        return cuda.CudaPool(cfg, rank, epoch, weight_version)
    from mpkv.pool import cpu

    return cpu.ShmPool(registry, cfg, naming.device_pool(rank, epoch), cfg.device_blocks, rank, epoch, weight_version)


def allocate_host_pool(registry: Registry, cfg: CacheConfig, rank: int, epoch: int, weight_version: int) -> OwnedPool:
    if cfg.backend == "cuda":
        from mpkv.pool import cuda

        return cuda.PinnedHostPool(cfg, rank, epoch, weight_version)
    from mpkv.pool import cpu

    return cpu.ShmPool(registry, cfg, naming.host_pool(rank, epoch), cfg.host_blocks, rank, epoch, weight_version)


def attach_device_pool(cfg: CacheConfig, handle: PoolHandle) -> AttachedPool:
    """Map the pool of ``handle`` (an attacher of its rank, or a link into it)."""
    if handle.backend == "cuda-vmm":
        from mpkv.pool import vmm

        return vmm.AttachedStablePool(cfg, handle)
    if handle.backend == "cuda":
        from mpkv.pool import cuda

        return cuda.AttachedCudaPool(cfg, handle)
    from mpkv.pool import cpu

    return cpu.AttachedShmPool(cfg, handle)
