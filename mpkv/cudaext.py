"""ctypes binding of cuda/'s library (``mpkv/_cuda/libmpkv_cuda.so``, built by ``tools/build-cuda``).

The library is loaded from the package directory only, never from a search path, a temporary directory or an
environment variable, and only when it is ours to trust: a regular file (not a link), owned by us or root, that
nobody else may write (another local user must not be able to plant code in our processes). It opens libcuda.so.1
itself at first use; a machine without the driver gets MpkvError naming libcuda.so.1 from the first call.

Every call acts on the calling thread's current CUDA context. The wrappers that know their device make it torch's
current device and run one runtime call on it, which makes its primary context current on this thread (the runtime
binds it lazily: a thread on which torch has launched nothing may have no current context yet).
"""

from __future__ import annotations

import ctypes
import os
import stat
from functools import cache
from pathlib import Path

import numpy as np
import torch

from mpkv.errors import MpkvError

LIB_PATH = Path(__file__).resolve().parent / "_cuda" / "libmpkv_cuda.so"

_U64, _I32 = ctypes.c_uint64, ctypes.c_int
_SIGNATURES: dict[str, list[type]] = {
    "mpkv_copy_runs": [_U64, _U64, _U64, _U64, _U64, _U64, ctypes.POINTER(ctypes.c_int64), _U64, _U64],
    "mpkv_vmm_granularity": [_I32, ctypes.POINTER(_U64)],
    "mpkv_vmm_reserve": [_U64, ctypes.POINTER(_U64)],
    "mpkv_vmm_unreserve": [_U64, _U64],
    "mpkv_vmm_create_and_map": [_I32, _U64, _U64, ctypes.POINTER(_U64), ctypes.POINTER(_I32)],
    "mpkv_vmm_import_and_map": [_I32, _I32, _U64, _U64, ctypes.POINTER(_U64)],
    "mpkv_vmm_unmap_and_release": [_U64, _U64, _U64],
}


def missing() -> str:
    """ "" when the library is built, else one sentence saying how to build it."""
    if LIB_PATH.is_file():
        return ""
    return f"mpkv's CUDA helper library {LIB_PATH} is not built: run tools/build-cuda (needs cuda.h; cuda/README.md)"


def _trusted(path: Path) -> None:
    # Compared with the package path itself, and checked without following a final link: what is loaded is what
    # was checked (a link could be retargeted between the check and the load).
    if path != LIB_PATH:
        raise MpkvError(f"refusing to load {path}: mpkv loads its CUDA helper only from {LIB_PATH}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise MpkvError(missing()) from None
    folder = os.stat(path.parent)
    if folder.st_uid not in (os.getuid(), 0) or folder.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MpkvError(
            f"refusing to load {path}: its directory is owned by uid {folder.st_uid} with mode "
            f"{stat.S_IMODE(folder.st_mode):o}; another user could replace the library. Make it 0755 and yours"
        )
    if not stat.S_ISREG(st.st_mode):
        raise MpkvError(
            f"refusing to load {path}: not a regular file (a link or a device); rebuild with tools/build-cuda"
        )
    if st.st_uid not in (os.getuid(), 0) or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise MpkvError(
            f"refusing to load {path}: owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}; another user "
            "could have written it. Delete it and rebuild with tools/build-cuda"
        )


def _open(path: Path) -> ctypes.CDLL:
    _trusted(path)
    lib = ctypes.CDLL(str(path), mode=os.RTLD_NOW | os.RTLD_LOCAL)  # a path with a slash: no search
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    lib.mpkv_cuda_error.argtypes, lib.mpkv_cuda_error.restype = [ctypes.c_int], ctypes.c_char_p
    return lib


@cache
def load() -> ctypes.CDLL:
    """The library, loaded once per process from the package directory; MpkvError when absent or untrusted."""
    return _open(LIB_PATH)


def _call(name: str, *args: object) -> None:
    lib = load()
    status = getattr(lib, name)(*args)
    if status != 0:
        text = (lib.mpkv_cuda_error(status) or b"no description").decode(errors="replace")
        raise MpkvError(f"{name} failed: {text} (status {status})")


def _bind(device: torch.device) -> None:
    # A runtime call on the device makes torch's primary context current on this thread; a stream query is the
    # cheapest one that needs the context and waits for nothing.
    torch.cuda.current_stream(device).query()


def _pool_geometry(name: str, pool: torch.Tensor) -> tuple[int, int]:
    """(planes, block_bytes) of a [layers, 2, blocks, ...] pool."""
    if pool.dim() < 3 or pool.shape[1] != 2:
        raise ValueError(f"{name} pool has shape {tuple(pool.shape)}; a pool is [layers, 2, blocks, ...]")
    if not pool.is_contiguous():
        raise ValueError(f"{name} pool is not contiguous; plane strides are derived from its shape")
    return pool.shape[0] * 2, pool[0, 0, 0].numel() * pool.element_size()


def _check_ids(name: str, first: np.ndarray, counts: np.ndarray, blocks: int) -> None:
    bad = np.flatnonzero((first < 0) | (first + counts > blocks))
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"run {i} covers {name} blocks {int(first[i])}..{int(first[i] + counts[i]) - 1}, outside the {name} "
            f"pool's {blocks} blocks; nothing was copied"
        )


def _check_memory(name: str, pool: torch.Tensor) -> None:
    if pool.device.type == "cuda" or (pool.device.type == "cpu" and pool.is_pinned()):
        return
    raise ValueError(
        f"{name} pool is on {pool.device} and not pinned: copy_runs copies between CUDA memory and pinned host memory"
    )


def copy_runs(dst: torch.Tensor, src: torch.Tensor, runs: np.ndarray, stream: int) -> None:
    """Enqueue on ``stream`` (a CUstream handle, 0 the legacy default) the copy of every run (dst_block, src_block,
    count) of ``runs`` (int64 [n, 3], see mpkv.pool.runs.merge_runs): blocks src_block.. of every layer's K and V of
    ``src`` to dst_block.. of ``dst``. Only enqueues: the caller synchronizes the stream before the blocks are read.
    Bad input raises ValueError and issues nothing."""
    planes, block_bytes = _pool_geometry("destination", dst)
    _pool_geometry("source", src)
    if (dst.shape[0], dst.shape[3:], dst.dtype) != (src.shape[0], src.shape[3:], src.dtype):
        raise ValueError(
            f"pools differ: destination {tuple(dst.shape)} {dst.dtype}, source {tuple(src.shape)} {src.dtype}; "
            "only the number of blocks (dim 2) may differ"
        )
    r = np.asarray(runs)
    if r.ndim != 2 or r.shape[1] != 3 or (r.size and r.dtype.kind not in "iu"):
        raise ValueError(f"runs must be integer rows of (dst_block, src_block, count), got {r.dtype} {r.shape}")
    r = np.ascontiguousarray(r, dtype=np.int64)
    if len(r) and int(r[:, 2].min()) <= 0:
        raise ValueError(f"run {int(np.argmin(r[:, 2]))} has a count of {int(r[:, 2].min())}; counts are positive")
    _check_ids("destination", r[:, 0], r[:, 2], dst.shape[2])
    _check_ids("source", r[:, 1], r[:, 2], src.shape[2])
    _check_memory("destination", dst)
    _check_memory("source", src)
    if not len(r):
        return
    device = dst.device if dst.device.type == "cuda" else src.device
    with torch.cuda.device(device):
        _bind(device)
        _call(
            "mpkv_copy_runs",
            dst.data_ptr(),
            dst.shape[2] * block_bytes,
            src.data_ptr(),
            src.shape[2] * block_bytes,
            planes,
            block_bytes,
            r.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
            len(r),
            stream,
        )


def vmm_granularity(device: int) -> int:
    """The recommended granularity (bytes) of pinned, fd-exportable memory on ``device``: sizes and addresses of
    the other vmm calls are multiples of it."""
    out = _U64()
    _call("mpkv_vmm_granularity", device, ctypes.byref(out))
    return out.value


def vmm_reserve(size: int) -> int:
    """Reserve ``size`` bytes of virtual addresses (no memory behind them); returns the address."""
    va = _U64()
    _call("mpkv_vmm_reserve", size, ctypes.byref(va))
    return va.value


def vmm_unreserve(va: int, size: int) -> None:
    """Give back a reservation of vmm_reserve (unmapped first)."""
    _call("mpkv_vmm_unreserve", va, size)


def vmm_create_and_map(device: int, va: int, size: int) -> tuple[int, int]:
    """Create ``size`` bytes on ``device``, map them read-write at ``va`` (reserved), and export them: returns
    (handle, fd). The fd is the caller's to pass on (SCM_RIGHTS) and to close; the handle goes to
    vmm_unmap_and_release."""
    handle, fd = _U64(), _I32(-1)
    with torch.cuda.device(device):
        _bind(torch.device("cuda", device))
        _call("mpkv_vmm_create_and_map", device, va, size, ctypes.byref(handle), ctypes.byref(fd))
    return handle.value, fd.value


def vmm_import_and_map(device: int, fd: int, va: int, size: int) -> int:
    """Import the memory another process exported as ``fd`` and map it read-write at ``va`` (reserved, ``size``
    bytes, on ``device``); returns the handle. ``fd`` stays open: the caller closes it."""
    handle = _U64()
    with torch.cuda.device(device):
        _bind(torch.device("cuda", device))
        _call("mpkv_vmm_import_and_map", device, fd, va, size, ctypes.byref(handle))
    return handle.value


def vmm_unmap_and_release(va: int, size: int, handle: int) -> None:
    """Unmap ``va`` and release ``handle``. The memory is freed once every process that created or imported it has
    done so (and closed its fds); a failed unmap keeps the handle for a retry."""
    _call("mpkv_vmm_unmap_and_release", va, size, handle)
