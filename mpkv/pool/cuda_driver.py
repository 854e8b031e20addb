"""The few CUDA driver calls of mpkv's default cuda path, through ctypes: device memory allocated outside torch's
caching allocator, shared by the driver's own IPC handles.

Note [CUDA IPC without torch's reductions]
torch shares CUDA memory with ``reduce_tensor``/``rebuild_cuda_tensor`` (torch/multiprocessing/reductions.py,
torch/csrc/CudaIPCTypes.cpp). Each share carries a cross-process reference counter that starts at 1 and that its
one receiver decrements when it drops the storage; the producer's block, once freed, waits in torch's "limbo"
until that counter is 0 (``torch.cuda.ipc_collect``). So a share nobody opens (a PD link slot that never connects,
a worker that skipped a load) pins the whole allocation for the life of the producer, a share opened twice counts
below zero, and a pool "freed" at a clear is not given back: the release measures ~0 bytes and the next restore
allocates a second pool. torch's sharing also depends on its allocator's settings: with ``expandable_segments`` it
passes file descriptors by ``pidfd_getfd`` (ptrace-gated between sibling processes under Yama), and memory of the
``cudaMallocAsync`` backend cannot be exported by ``cudaIpcGetMemHandle`` at all.

So mpkv allocates what it shares itself (``cuMemAlloc``), outside torch's allocator (whatever
``PYTORCH_CUDA_ALLOC_CONF`` says), and shares it by the driver's IPC: ONE ``cuIpcGetMemHandle`` per allocation,
which any number of processes open (``cuIpcOpenMemHandle``; the driver counts the opens of one process) and each
closes (``cuIpcCloseMemHandle``). No share is made per receiver, so none can be left unopened or opened twice, and
a link that opens again gets the same allocation. The driver's one rule, every importer closes before the
exporter frees (``cuMemFree`` under a live import is undefined), is the handshake's order: the owner frees only
after every attacher and link published DETACHED or STOPPED (NOTE [ clear handshake ] in mpkv.handshake), and a
peer that never does is named when the wait's deadline passes.

So the accounting of shares is the handshake's accounting of mappings, and tests/test_handshake_model.py explores
it: every import is an actor's or a link's "mapped" flag; no interleaving (with a crash anywhere) lets the owner
free while one is set (its sanity test breaks that rule and is caught), none lets a process map a pool of an
older epoch, and links open and close several times per epoch (``test_links_into_a_decode_pool``).

Tensors over this memory come from ``torch.as_tensor`` of an object with ``__cuda_array_interface__``: torch keeps
that object alive while any view of it lives, so ``free``/``close`` can tell a view is still held and refuse (as the
cpu pool refuses to unmap under a view) rather than unmap memory that a tensor still points at.

Driver calls act on the calling thread's current context: ``on_device(device)`` makes the device current (torch
then creates its primary context if it has none, as it does for its own allocations) and checks which one it got.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

from mpkv.errors import MpkvError

if TYPE_CHECKING:
    import torch

IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE
_LAZY_ENABLE_PEER_ACCESS = 1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: an importer on another GPU maps it by peer access
_HOST_PORTABLE = 1  # CU_MEMHOSTALLOC_PORTABLE


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]  # bytes, NULs included (c_char would stop at one)


_PTR = ctypes.c_uint64  # CUdeviceptr on 64-bit hosts
_SIGNATURES: dict[str, list[type]] = {
    "cuMemAlloc_v2": [ctypes.POINTER(_PTR), ctypes.c_size_t],
    "cuMemFree_v2": [_PTR],
    "cuIpcGetMemHandle": [ctypes.POINTER(_IpcHandle), _PTR],
    "cuIpcOpenMemHandle_v2": [ctypes.POINTER(_PTR), _IpcHandle, ctypes.c_uint],
    "cuIpcCloseMemHandle": [_PTR],
    "cuCtxGetDevice": [ctypes.POINTER(ctypes.c_int)],
    "cuMemHostAlloc": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint],
    "cuMemFreeHost": [ctypes.c_void_p],
    "cuGetErrorString": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
}


@cache
def _driver() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise MpkvError(f"backend 'cuda' needs the NVIDIA driver, but libcuda.so.1 cannot be loaded ({e})") from None
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


def _call(name: str, *args: object) -> None:
    status = getattr(_driver(), name)(*args)
    if status != 0:
        text = ctypes.c_char_p()
        _driver().cuGetErrorString(status, ctypes.byref(text))
        raise MpkvError(f"{name} failed: {(text.value or b'unknown error').decode()} (CUresult {status})")


# -- the driver calls, on the current context (no torch here: tests/test_cuda_driver.py runs them on a stand-in) ----


def mem_alloc(nbytes: int) -> int:
    ptr = _PTR()
    _call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
    return int(ptr.value)


def mem_free(ptr: int) -> None:
    _call("cuMemFree_v2", _PTR(ptr))


def ipc_handle_of(ptr: int) -> bytes:
    handle = _IpcHandle()
    _call("cuIpcGetMemHandle", ctypes.byref(handle), _PTR(ptr))
    return bytes(handle.reserved)


def ipc_open(handle: bytes) -> int:
    if len(handle) != IPC_HANDLE_BYTES:
        raise MpkvError(f"a CUDA IPC handle is {IPC_HANDLE_BYTES} bytes, this one {len(handle)}")
    ptr = _PTR()
    flags = ctypes.c_uint(_LAZY_ENABLE_PEER_ACCESS)
    _call("cuIpcOpenMemHandle_v2", ctypes.byref(ptr), _IpcHandle.from_buffer_copy(handle), flags)
    return int(ptr.value)


def ipc_close(ptr: int) -> None:
    _call("cuIpcCloseMemHandle", _PTR(ptr))


def host_alloc(nbytes: int) -> int:
    """Pinned host memory, usable by every context (CU_MEMHOSTALLOC_PORTABLE)."""
    ptr = ctypes.c_void_p()
    _call("cuMemHostAlloc", ctypes.byref(ptr), ctypes.c_size_t(nbytes), ctypes.c_uint(_HOST_PORTABLE))
    return int(ptr.value or 0)


def host_free(ptr: int) -> None:
    _call("cuMemFreeHost", ctypes.c_void_p(ptr))


def context_device() -> int:
    current = ctypes.c_int(-1)
    _call("cuCtxGetDevice", ctypes.byref(current))
    return current.value


# -- with torch --------------------------------------------------------------------------------------------------


@contextmanager
def on_device(device: torch.device) -> Iterator[None]:
    """Run driver calls in ``device``'s primary context, after the work queued on it ended."""
    import torch

    with torch.cuda.device(device):
        torch.cuda.synchronize(device)  # creates the primary context if torch has not yet; it is current now
        if context_device() != device.index:
            raise MpkvError(f"the current CUDA context is on device {context_device()}, not on {device}")
        yield


class _Memory:
    """What torch views: alive while any view of it is (torch holds it from the tensor's deleter)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def view_of(ptr: int, nbytes: int) -> tuple[torch.Tensor, weakref.ref[_Memory]]:
    import torch

    mem = _Memory(ptr, nbytes)
    return torch.as_tensor(mem), weakref.ref(mem)  # on the device the memory is on (torch asks the driver)


def check_no_views(alive: Callable[[], object], what: str) -> None:
    if alive() is not None:
        raise MpkvError(
            f"cannot release {what}: this process still holds a tensor view of it (a stale view would read freed "
            "memory after a restore)"
        )


class _Held:
    """Memory viewed as ``tensor`` at ``ptr`` on ``device``: ``_let_go`` drops our view and releases it, once."""

    device: torch.device
    ptr: int
    _alive: Callable[[], object]

    def _let_go(self, release: Callable[[int], None], what: str, check_views: bool) -> None:
        """``check_views=False``: a failure is propagating whose traceback may still hold views nobody will use."""
        if self.ptr == 0:
            return
        self.__dict__.pop("tensor", None)
        if check_views:
            check_no_views(self._alive, f"{what} at {self.ptr:#x}")
        with on_device(self.device):  # the work queued on it ends first
            release(self.ptr)
        self.ptr = 0


class Allocation(_Held):
    """``nbytes`` of device memory of ours, viewed as ``tensor`` (uint8); ``ipc_handle`` shares it."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.device, self.nbytes = device, nbytes
        with on_device(device):
            self.ptr = mem_alloc(nbytes)
        try:
            self.tensor, self._alive = view_of(self.ptr, nbytes)
        except BaseException:
            with on_device(device):
                mem_free(self.ptr)
            raise

    def ipc_handle(self) -> bytes:
        """The handle any other process opens with ``Imported`` (one for all of them, for as long as we live)."""
        with on_device(self.device):
            return ipc_handle_of(self.ptr)

    def free(self, check_views: bool = True) -> None:
        """Give the memory back to the device. Every importer must have closed it first (the handshake's order)."""
        self._let_go(mem_free, "the CUDA allocation", check_views)


class Imported(_Held):
    """Another process's ``Allocation``, mapped into this one by its IPC handle, as ``tensor``; ``close`` unmaps."""

    def __init__(self, handle: bytes, nbytes: int, device: torch.device) -> None:
        self.device, self.nbytes = device, nbytes
        with on_device(device):
            self.ptr = ipc_open(handle)
        try:
            self.tensor, self._alive = view_of(self.ptr, nbytes)
        except BaseException:
            with on_device(device):
                ipc_close(self.ptr)
            raise

    def close(self, check_views: bool = True) -> None:
        self._let_go(ipc_close, "the CUDA IPC mapping", check_views)


class _HostMemory:
    """What torch views as a CPU tensor, through numpy: alive while any view of it is."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3}


class PinnedHost(_Held):
    """``nbytes`` of pinned host memory of ours (cuMemHostAlloc), viewed as ``tensor`` (uint8, cpu): unlike torch's
    ``pin_memory=True``, whose caching host allocator keeps a freed block for reuse, ``free`` gives it back."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        import numpy as np
        import torch

        self.device = device
        with on_device(device):  # the allocation is made in a context (and portable to the others)
            self.ptr = host_alloc(nbytes)
        try:
            mem = _HostMemory(self.ptr, nbytes)
            self.tensor, self._alive = torch.from_numpy(np.asarray(mem)), weakref.ref(mem)
        except BaseException:
            host_free(self.ptr)
            raise

    def free(self, check_views: bool = True) -> None:
        self._let_go(host_free, "the pinned host memory", check_views)


def device_for(rank: int) -> torch.device:
    """The GPU of ``rank``'s three processes: rank r on visible device r mod the count (CUDA_VISIBLE_DEVICES decides
    which those are). Every process of a rank calls ``torch.cuda.set_device`` with it first, so that nothing of a
    rank >= 1 lands on (or opens a context on) device 0."""
    import torch

    if not torch.cuda.is_available():
        raise MpkvError("backend 'cuda' was asked for, but torch sees no CUDA device here")
    return torch.device("cuda", rank % torch.cuda.device_count())
