"""The cuda backend: one device allocation per rank, shared with the other roles by CUDA IPC.

Note [CUDA IPC handle lifetime]
The owner allocates one ``uint8`` tensor of the pool's size and exports it with torch's own reduction
(``torch.multiprocessing.reductions.reduce_tensor``), once per attacher: a cudaIpcMemHandle for the
allocation's base, the byte offset of our tensor inside it (the caching allocator may sub-allocate), and a
cross-process reference counter that the one receiver of that share decrements when it drops the storage.
An attacher rebuilds a tensor from its own share (``rebuild_cuda_tensor``), which opens the handle once per
process. The handshake guarantees the owner frees only after every attacher dropped its tensor and
released the mapping (DETACHED); the owner then drops its tensor and calls ``torch.cuda.empty_cache()`` so the
caching allocator really returns the memory, and measures the release with ``torch.cuda.mem_get_info``.
Restores allocate a new tensor, hence a new handle: an attacher never reuses a handle across epochs.
The host pool is pinned memory private to the transfer manager (nobody else maps it).
"""

from __future__ import annotations

import os

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from mpkv.config import CacheConfig
from mpkv.pool import PoolHandle


def _device(rank: int) -> torch.device:
    if not torch.cuda.is_available():
        raise RuntimeError("backend 'cuda' was asked for, but torch sees no CUDA device here")
    return torch.device("cuda", rank % torch.cuda.device_count())


def _free_bytes(dev: torch.device) -> int:
    torch.cuda.synchronize(dev)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free)


class CudaPool:
    def __init__(self, cfg: CacheConfig, rank: int, epoch: int, wv: int, attachers: tuple[int, ...]) -> None:
        self._dev = _device(rank)
        nbytes = cfg.pool_bytes(cfg.device_blocks)
        self._raw = torch.zeros(nbytes, dtype=torch.uint8, device=self._dev)
        self.tensor = self._raw.view(cfg.torch_dtype).view(cfg.pool_shape(cfg.device_blocks))
        # One share per attacher: torch counts the receivers of a share with one counter that its receiver
        # decrements once; two attachers rebuilding from one share would drive it below zero, and the owner's
        # memory would never be returned (it would wait in torch's limbo forever).
        shares = {role: share_of(self._raw) for role in (attachers or (0,))}
        self._handle = PoolHandle("cuda", rank, epoch, wv, nbytes, cuda=shares)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        before = _free_bytes(self._dev)
        self.__dict__.pop("tensor", None)
        self.__dict__.pop("_raw", None)
        torch.cuda.empty_cache()
        return max(0, _free_bytes(self._dev) - before)


class AttachedCudaPool:
    def __init__(self, cfg: CacheConfig, handle: PoolHandle, role: int) -> None:
        if role not in handle.cuda:
            raise ValueError(f"the pool of rank {handle.rank} has no CUDA IPC share for role {role}")
        raw = open_share(handle.cuda[role])
        self.tensor = raw.view(cfg.torch_dtype).view(cfg.pool_shape(handle.nbytes // cfg.block_bytes))

    def close(self) -> None:
        self.__dict__.pop("tensor", None)
        torch.cuda.synchronize()
        torch.cuda.ipc_collect()


class PinnedHostPool:
    def __init__(self, cfg: CacheConfig, rank: int, epoch: int, wv: int) -> None:
        nbytes = cfg.pool_bytes(cfg.host_blocks)
        self.tensor = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=True).view(cfg.torch_dtype)
        self.tensor = self.tensor.view(cfg.pool_shape(cfg.host_blocks))
        self._handle = PoolHandle("cuda-host", rank, epoch, wv, nbytes)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        before = _rss_bytes()
        self.__dict__.pop("tensor", None)
        return max(0, before - _rss_bytes())


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def share_of(t: torch.Tensor) -> tuple:
    """A CUDA IPC share of ``t`` for exactly one receiver (``open_share``), as plain data (msgpack-able)."""
    return _encode(reduce_tensor(t)[1])


def open_share(share: tuple | list) -> torch.Tensor:
    """The tensor a ``share_of`` share names, mapped into this process; dropping it releases the share."""
    return rebuild_cuda_tensor(*_decode(tuple(share)))


# reduce_tensor's arguments hold torch types (tensor class, storage class, dtype, Size); keep them as names.
def _encode(args: tuple) -> tuple:
    (_cls, size, stride, offset, _scls, dtype, dev, handle, size_b, off_b, rg, rc_h, rc_off, ev_h, ev_sync) = args
    return (
        list(size),
        list(stride),
        offset,
        str(dtype).removeprefix("torch."),
        dev,
        bytes(handle),
        size_b,
        off_b,
        rg,
        bytes(rc_h),
        rc_off,
        bytes(ev_h) if ev_h else b"",
        ev_sync,
    )


def _decode(enc: tuple) -> tuple:
    (size, stride, offset, dtype, dev, handle, size_b, off_b, rg, rc_h, rc_off, ev_h, ev_sync) = enc
    return (
        torch.Tensor,
        torch.Size(size),
        tuple(stride),
        offset,
        torch.UntypedStorage,
        getattr(torch, dtype),
        dev,
        handle,
        size_b,
        off_b,
        rg,
        rc_h,
        rc_off,
        ev_h or None,
        ev_sync,
    )
