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

The socket's name has a random part and travels in the 0600 handle record; both ends check the other's uid
(SO_PEERCRED), and an abstract socket disappears with the process that holds it, ``kill -9`` included.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import torch

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.errors import MpkvError
from mpkv.pool import PoolHandle
from mpkv.shm.registry import Registry

FD_TIMEOUT_S = 30.0


def _peer_uid(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class FdServer:
    """Hands ``fd`` to every process of our uid that connects to ``name``, until ``close``."""

    def __init__(self, name: str, fd: int) -> None:
        self.name, self._fd = name, fd
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.bind(name)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="mpkv-vmm-fd", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed: the epoch is over
                return
            with conn:
                try:
                    _pid, uid = _peer_uid(conn)
                    if uid == os.getuid():  # another user gets nothing (and learns nothing)
                        socket.send_fds(conn, [b"fd"], [self._fd])
                except OSError:
                    continue  # that peer went away; the others still get theirs

    def close(self) -> None:
        """Stop serving (who connects later gets nothing); the caller closes ``fd``."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=FD_TIMEOUT_S)


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
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        except (OSError, TimeoutError) as e:
            raise MpkvError(f"no pool memory from {owner} within {timeout_s:g} s ({e})") from None
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise MpkvError(f"{owner} sent {len(fds)} descriptors for its pool memory, expected 1")
    return fds[0]


@dataclass
class _Range:
    """This process's reservation for a pool of ``nbytes`` (rounded to the granularity), kept while it lives."""

    va: int
    nbytes: int


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_ranges: dict[tuple[int, int], _Range] = {}  # (device, bytes) -> the range: one per pool size per process


def _range(device: torch.device, nbytes: int) -> _Range:
    from mpkv import cudaext

    index = _index(device)
    grain = cudaext.vmm_granularity(index)
    size = -(-nbytes // grain) * grain
    key = (index, size)
    if key not in _ranges:
        _ranges[key] = _Range(cudaext.vmm_reserve(size), size)
    return _ranges[key]


class StablePool:
    """The owner's pool: new memory at the same address every restore."""

    def __init__(self, registry: Registry, cfg: CacheConfig, rank: int, epoch: int, wv: int) -> None:
        from mpkv import cudaext
        from mpkv.pool.cuda_driver import device_for, view_of

        self._dev = device_for(rank)
        nbytes = cfg.pool_bytes(cfg.device_blocks)
        self._range = _range(self._dev, nbytes)
        self._mem, fd = cudaext.vmm_create_and_map(_index(self._dev), self._range.va, self._range.nbytes)
        try:
            self._fd = fd
            raw, self._alive = view_of(self._range.va, nbytes)
            raw.zero_()
            torch.cuda.synchronize(self._dev)
            self.tensor = raw.view(cfg.torch_dtype).view(cfg.pool_shape(cfg.device_blocks))
            self._server = FdServer(naming.vmm_socket(registry.instance, registry.run_id, rank, epoch), fd)
        except BaseException:
            self.__dict__.pop("tensor", None)
            os.close(fd)
            cudaext.vmm_unmap_and_release(self._range.va, self._range.nbytes, self._mem)
            raise
        self._handle = PoolHandle("cuda-vmm", rank, epoch, wv, nbytes, name=self._server.name)

    def handle(self) -> PoolHandle:
        return self._handle

    def free(self) -> int:
        from mpkv import cudaext
        from mpkv.pool.cuda import held_bytes
        from mpkv.pool.cuda_driver import check_no_views

        before = held_bytes(self._dev)
        self.__dict__.pop("tensor", None)
        check_no_views(self._alive, f"the stable-address pool of rank {self._handle.rank}")
        self._server.close()
        os.close(self._fd)
        torch.cuda.synchronize(self._dev)
        cudaext.vmm_unmap_and_release(self._range.va, self._range.nbytes, self._mem)
        return max(0, before - held_bytes(self._dev))


class AttachedStablePool:
    """An attacher's (or a link's) import of the owner's memory, at this process's own stable address."""

    def __init__(self, cfg: CacheConfig, handle: PoolHandle) -> None:
        from mpkv import cudaext
        from mpkv.pool.cuda_driver import device_for, view_of

        self._dev = device_for(handle.rank)
        self._range = _range(self._dev, handle.nbytes)
        fd = receive_fd(handle.name, f"the pool owner of rank {handle.rank}")
        try:
            self._mem = cudaext.vmm_import_and_map(_index(self._dev), fd, self._range.va, self._range.nbytes)
        finally:
            os.close(fd)  # the import holds the memory now; a kept descriptor would pin it past the clear
        raw, self._alive = view_of(self._range.va, handle.nbytes)
        self.tensor = raw.view(cfg.torch_dtype).view(cfg.pool_shape(handle.nbytes // cfg.block_bytes))

    def close(self) -> None:
        from mpkv import cudaext
        from mpkv.pool.cuda_driver import check_no_views

        self.__dict__.pop("tensor", None)
        check_no_views(self._alive, "an attached stable-address pool")
        torch.cuda.synchronize(self._dev)
        cudaext.vmm_unmap_and_release(self._range.va, self._range.nbytes, self._mem)
