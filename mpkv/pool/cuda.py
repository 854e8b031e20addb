"""The cuda backend: one device allocation per rank, shared with the rank's other roles (and, on a decode
instance, with the links into it) by one CUDA IPC handle (NOTE [ CUDA IPC without torch's reductions ] in
mpkv.pool.cuda_driver: the allocation is ours, not torch's, so nothing of torch's IPC reference counting applies).

The owner allocates a new pool at every restore and publishes its handle; attachers open it at ATTACH and close it
at DETACH; the owner frees it at FREE, after every attacher and link acknowledged DETACHED (the driver's rule), and
measures the release as NVML sees this process (``mpkv.gpumem``), or by ``cudaMemGetInfo`` where NVML cannot see it.
The host pool is pinned memory private to the transfer manager (nobody else maps it).
"""

from __future__ import annotations

import os

import torch

from mpkv.config import CacheConfig
from mpkv.pool import PoolHandle
from mpkv.pool.cuda_driver import Allocation, Imported, PinnedHost, device_for


def held_bytes(device: torch.device) -> int:
    """The device memory this process holds as NVML counts it; where NVML cannot see this process (no NVML, or a
    container whose pids NVML does not know) the device's used memory, which counts the other processes too."""
    from mpkv.gpumem import GpuMemory

    mine = GpuMemory.open().process_bytes([os.getpid()]).get(os.getpid())
    if mine:  # a process with a CUDA context is always listed, with at least the context's memory
        return mine
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free)


class CudaPool:
    def __init__(self, cfg: CacheConfig, rank: int, epoch: int, wv: int) -> None:
        nbytes = cfg.pool_bytes(cfg.device_blocks)
        self._mem = Allocation(nbytes, device_for(rank))
        try:
            self._mem.tensor.zero_()
            torch.cuda.synchronize(self._mem.device)  # zeroed before any other process maps it
            self.tensor = self._mem.tensor.view(cfg.torch_dtype).view(cfg.pool_shape(cfg.device_blocks))
            self._handle = PoolHandle("cuda", rank, epoch, wv, nbytes, cuda=self._mem.ipc_handle())
        except BaseException:
            self.__dict__.pop("tensor", None)
            self._mem.free(check_views=False)
            raise

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        before = held_bytes(self._mem.device)
        self.__dict__.pop("tensor", None)
        self._mem.free()
        return max(0, before - held_bytes(self._mem.device))


class AttachedCudaPool:
    def __init__(self, cfg: CacheConfig, handle: PoolHandle) -> None:
        self._mem = Imported(handle.cuda, handle.nbytes, device_for(handle.rank))
        try:
            self.tensor = self._mem.tensor.view(cfg.torch_dtype).view(cfg.pool_shape(handle.nbytes // cfg.block_bytes))
        except BaseException:  # a handle whose size does not fit the geometry
            self._mem.close(check_views=False)
            raise

    def close(self) -> None:
        self.__dict__.pop("tensor", None)
        self._mem.close()


class PinnedHostPool:
    """The transfer manager's host pool: pinned memory of ours (``PinnedHost``), so a clear really returns it."""

    def __init__(self, cfg: CacheConfig, rank: int, epoch: int, wv: int) -> None:
        nbytes = cfg.pool_bytes(cfg.host_blocks)
        self._mem = PinnedHost(nbytes, device_for(rank))
        try:
            self._mem.tensor.zero_()  # touch every page: the memory is really there, and measurable
            self.tensor = self._mem.tensor.view(cfg.torch_dtype).view(cfg.pool_shape(cfg.host_blocks))
        except BaseException:
            self.__dict__.pop("tensor", None)
            self._mem.free(check_views=False)
            raise
        self._handle = PoolHandle("cuda-host", rank, epoch, wv, nbytes)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        before = _rss_bytes()
        self.__dict__.pop("tensor", None)
        self._mem.free()
        return max(0, before - _rss_bytes())


def _rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
