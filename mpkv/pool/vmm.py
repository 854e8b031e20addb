"""The stable-address device pool (``--stable-addresses``): each process maps its rank's pool at one virtual
address for its whole life, so a CUDA graph captured over the pool stays valid across clear and restore.

Note [stable addresses and who frees the memory]
Every process reserves a range of virtual addresses once (``cuMemAddressReserve``, cuda/vmm_pool.c) and keeps it.
At a restore the owner creates physical memory (``cuMemCreate``), maps it into its range and exports it as a file
descriptor (``cuMemExportToShareableHandle``); each attacher and link receives that descriptor (SCM_RIGHTS over an
abstract unix socket the owner serves for the epoch, ``FdServer``), imports it and maps it into its own range. At a
clear each of them unmaps and releases its import (DETACH), then the owner does (FREE) and closes its descriptor:
the driver frees the physical memory only when every process released every handle and descriptor of it, which
is why the handshake makes each attacher and link release at every clear and import afresh at every restore (a
descriptor kept across epochs would pin the old memory). ``cudaIpcGetMemHandle`` cannot export such memory, hence
the descriptors. The ranges are never freed while the process lives: that is the point.

The socket's name travels in the 0600 handle record, but abstract names are listed in /proc/net/unix, so nothing
rests on keeping it secret: both ends check the other's uid (SO_PEERCRED), another user can neither get the memory
nor pose as the owner, and an abstract socket disappears with the process that holds it, ``kill -9`` included.

Each process keeps one range per pool it maps (``space``: the owner's instance run and rank), so a prefill
messager that maps its own pool and, through a link, a decode instance's pool of the same size maps them at two
addresses, each stable.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.pool import PoolHandle
from mpkv.shm.registry import Registry

if TYPE_CHECKING:
    import torch

FD_TIMEOUT_S = 30.0


def _peer_uid(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class FdServer:
    """Hands ``fd`` to every process of our uid that connects to ``name``, until ``close``."""

    def __init__(self, name: str, fd: int) -> None:
        self.name, self._fd, self._closing = name, fd, False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(name)
            self._sock.listen(16)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._serve, name="mpkv-vmm-fd", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn:
                if self._closing:  # close()'s own connection: the epoch is over
                    return
                try:
                    _pid, uid = _peer_uid(conn)
                    if uid == os.getuid():  # another user gets nothing (and learns nothing)
                        socket.send_fds(conn, [b"fd"], [self._fd])
                except OSError:
                    continue  # that peer went away; the others still get theirs

    def close(self) -> None:
        """Stop serving (who connects later gets nothing); the caller closes ``fd``. The accept is woken by a
        connection of our own (shutting a listening socket down wakes it on Linux only)."""
        if self._closing:
            return
        self._closing = True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as wake:
                wake.settimeout(FD_TIMEOUT_S)
                wake.connect(self.name)
        except OSError:
            pass  # the thread is gone already (it only ends on an accept error)
        self._thread.join(timeout=FD_TIMEOUT_S)
        self._sock.close()


def receive_fd(name: str, owner: str, timeout_s: float = FD_TIMEOUT_S) -> int:
    """The descriptor the ``FdServer`` at ``name`` hands out; MpkvError naming ``owner`` if none comes in time."""
    deadline = time.monotonic() + timeout_s
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect(name)
            _pid, uid = _peer_uid(sock)
            if uid != os.getuid():
                raise MpkvError(f"the pool socket of {owner} belongs to uid {uid}, not to us: refusing its memory")
            sock.settimeout(max(1e-3, deadline - time.monotonic()))
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1, socket.MSG_CMSG_CLOEXEC)
        except (OSError, TimeoutError) as e:
            raise MpkvError(f"no pool memory from {owner} within {timeout_s:g} s ({e})") from None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise MpkvError(f"{owner} sent {len(fds)} descriptors for its pool memory, expected 1")
    return fds[0]


@dataclass
class _Range:
    """This process's reservation for one pool (rounded to the granularity), kept while the process lives."""

    va: int
    nbytes: int


_ranges: dict[tuple[str, int, int], _Range] = {}  # (space, device, bytes) -> its range


def _range(space: str, device: torch.device, nbytes: int) -> _Range:
    from mpkv import cudaext
    from mpkv.pool.cuda_driver import on_device

    assert device.index is not None
    with on_device(device):  # the VMM calls act on the current context
        grain = cudaext.vmm_granularity(device.index)
        size = -(-nbytes // grain) * grain
        key = (space, device.index, size)
        if key not in _ranges:
            _ranges[key] = _Range(cudaext.vmm_reserve(size), size)
    return _ranges[key]


class _Mapped:
    """Memory mapped at a range: ``release`` unmaps it and lets go of our handle, once (a retry after a failure
    does not release twice)."""

    def __init__(self, device: torch.device, where: _Range, handle: int, nbytes: int, what: str) -> None:
        from mpkv.pool.cuda_driver import view_of

        self.device, self.where, self.handle, self.what = device, where, handle, what
        try:
            self.raw, self.alive = view_of(where.va, nbytes)
        except BaseException:
            self.release(check_views=False)
            raise

    def release(self, check_views: bool = True) -> None:
        from mpkv import cudaext
        from mpkv.pool.cuda_driver import check_no_views, on_device

        self.__dict__.pop("raw", None)
        if self.handle == 0:
            return
        if check_views and hasattr(self, "alive"):
            check_no_views(self.alive, self.what)
        with on_device(self.device):  # queued work on it ends first
            cudaext.vmm_unmap_and_release(self.where.va, self.where.nbytes, self.handle)
        self.handle = 0


class StablePool:
    """The owner's pool: new memory at the same address every restore."""

    def __init__(self, registry: Registry, cfg: CacheConfig, rank: int, epoch: int, wv: int) -> None:
        import torch

        from mpkv import cudaext
        from mpkv.pool.cuda_driver import device_for, on_device

        dev = device_for(rank)
        nbytes = cfg.pool_bytes(cfg.device_blocks)
        space = f"{registry.instance}.{registry.run_id}.r{rank}"
        where = _range(space, dev, nbytes)
        with on_device(dev):
            handle, self._fd = cudaext.vmm_create_and_map(dev.index or 0, where.va, where.nbytes)
        try:
            self._mem = _Mapped(dev, where, handle, nbytes, f"the stable-address pool of rank {rank}")
        except BaseException:  # it released the memory itself
            os.close(self._fd)
            raise
        try:
            self._mem.raw.zero_()
            torch.cuda.synchronize(dev)  # zeroed before any other process maps it
            self.tensor = self._mem.raw.view(cfg.torch_dtype).view(cfg.pool_shape(cfg.device_blocks))
            self._server = FdServer(naming.vmm_socket(registry.instance, registry.run_id, rank, epoch), self._fd)
        except BaseException:
            self.__dict__.pop("tensor", None)
            os.close(self._fd)
            self._mem.release(check_views=False)
            raise
        self._handle = PoolHandle("cuda-vmm", rank, epoch, wv, nbytes, name=self._server.name, space=space)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        from mpkv.pool.cuda import held_bytes

        before = held_bytes(self._mem.device)
        self.__dict__.pop("tensor", None)
        self._server.close()
        if self._fd >= 0:  # ours was the last descriptor: with every import released the memory can go
            os.close(self._fd)
            self._fd = -1
        self._mem.release()
        return max(0, before - held_bytes(self._mem.device))


class AttachedStablePool:
    """An attacher's (or a link's) import of the owner's memory, at this process's own stable address."""

    def __init__(self, cfg: CacheConfig, handle: PoolHandle) -> None:
        from mpkv import cudaext
        from mpkv.pool.cuda_driver import device_for, on_device

        dev = device_for(handle.rank)
        where = _range(handle.space, dev, handle.nbytes)
        fd = receive_fd(handle.name, f"the pool owner of rank {handle.rank}")
        try:
            with on_device(dev):
                mem = cudaext.vmm_import_and_map(dev.index or 0, fd, where.va, where.nbytes)
        finally:
            os.close(fd)  # the import holds the memory now; a kept descriptor would pin it past the clear
        self._mem = _Mapped(dev, where, mem, handle.nbytes, f"the attached pool of rank {handle.rank}")
        try:
            self.tensor = self._mem.raw.view(cfg.torch_dtype).view(cfg.pool_shape(handle.nbytes // cfg.block_bytes))
        except BaseException:  # a handle whose size does not fit the geometry: the range must be free again
            self._mem.release(check_views=False)
            raise

    def close(self) -> None:
        self.__dict__.pop("tensor", None)
        self._mem.release()
