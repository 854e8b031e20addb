"""Run by tests/test_cuda_build.py in a child process whose libcuda.so.1 is tests/cuda_stand_in_driver.c: calls the
built library (argv[1]) as scenario argv[2] and prints what each call returned, as JSON."""

from __future__ import annotations

import ctypes
import json
import os
import sys

U64 = ctypes.c_uint64
DST, SRC = 0x10000000, 0x20000000
RUNS = ((1, 3, 2), (7, 0, 1))  # destination plane: 8 blocks of 512 bytes; source plane: 16 blocks


def ipc() -> dict[str, object]:
    """mpkv.pool.cuda_driver's calls (ctypes, the driver's exported names): allocate, export, open, close, free."""
    from mpkv.errors import MpkvError
    from mpkv.pool import cuda_driver as d

    out: dict[str, object] = {}
    try:
        ptr = d.mem_alloc(1 << 20)
        handle = d.ipc_handle_of(ptr)
        out |= {"ptr": ptr, "handle": handle.hex(), "device": d.context_device()}
        out["imported"] = d.ipc_open(handle)
        d.ipc_close(out["imported"])  # type: ignore[arg-type]
        d.mem_free(ptr)
        host = d.host_alloc(4096)
        ctypes.memset(host, 7, 4096)  # the stand-in's memory is real: writable, as pinned memory is
        d.host_free(host)
    except MpkvError as e:
        out["error"] = str(e)
    return out


def main() -> None:
    if sys.argv[2] == "ipc":
        print(json.dumps(ipc()))
        return
    lib = ctypes.CDLL(sys.argv[1])
    lib.mpkv_cuda_error.argtypes, lib.mpkv_cuda_error.restype = [ctypes.c_int], ctypes.c_char_p
    out: dict[str, object] = {}
    if sys.argv[2] == "copy":
        runs = (ctypes.c_int64 * 6)(*(v for run in RUNS for v in run))
        out["copy"] = lib.mpkv_copy_runs(
            U64(DST), U64(8 * 512), U64(SRC), U64(16 * 512), U64(4), U64(512), runs, U64(2), U64(0xABC)
        )
    else:
        g, va, handle, fd = U64(), U64(), U64(), ctypes.c_int(-7)
        out["granularity"] = (lib.mpkv_vmm_granularity(0, ctypes.byref(g)), g.value)
        out["reserve"] = (lib.mpkv_vmm_reserve(U64(4 << 20), ctypes.byref(va)), va.value)
        if sys.argv[2] == "create":
            status = lib.mpkv_vmm_create_and_map(1, va, U64(4 << 20), ctypes.byref(handle), ctypes.byref(fd))
            out["create"] = (status, handle.value, fd.value)
            if fd.value >= 0:
                os.close(fd.value)
        else:
            status = lib.mpkv_vmm_import_and_map(1, 42, va, U64(4 << 20), ctypes.byref(handle))
            out["import"] = (status, handle.value)
        out["error"] = lib.mpkv_cuda_error(status).decode()
        if status == 0:
            out["release"] = lib.mpkv_vmm_unmap_and_release(va, U64(4 << 20), handle)
        out["unreserve"] = lib.mpkv_vmm_unreserve(va, U64(4 << 20))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
