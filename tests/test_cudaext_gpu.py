"""mpkv.cudaext on a real GPU: block copies against a per-block reference, and a VMM pool shared with another process
by file descriptor. Skipped cleanly where torch sees no CUDA device or cuda/ is not built (tools/build-cuda).

Run them where a GPU is: `tools/build-cuda && tools/test -m gpu tests/test_cudaext_gpu.py`."""

from __future__ import annotations

import os
import random
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle, send_handle

import pytest
import torch
from helpers import Child

from mpkv import cudaext
from mpkv.errors import MpkvError
from mpkv.pool.runs import merge_runs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    pytest.mark.skipif(bool(cudaext.missing()), reason=cudaext.missing() or "built"),
]
DEV = torch.device("cuda", 0)


def _pairs(rng: random.Random, dst_blocks: int, src_blocks: int) -> tuple[list[int], list[int]]:
    # Mostly consecutive on both sides (so runs merge), some strays, listed in a shuffled order.
    n = rng.randrange(1, dst_blocks)
    dst = sorted(rng.sample(range(dst_blocks), n))
    shift = rng.randrange(0, src_blocks - dst_blocks + 1)
    src = [d + shift if rng.random() < 0.8 else rng.randrange(src_blocks) for d in dst]
    order = list(range(n))
    rng.shuffle(order)
    return [dst[i] for i in order], [src[i] for i in order]


@pytest.mark.parametrize("stream_kind", ["side stream", "legacy default stream"])
@pytest.mark.parametrize("where", ["device->device", "pinned->device", "device->pinned"])
def test_copy_runs_matches_a_per_block_copy(rng: random.Random, where: str, stream_kind: str) -> None:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    dst_cpu = torch.randn(3, 2, 40, 4, 2, 8, generator=gen).half()
    src_cpu = torch.randn(3, 2, 50, 4, 2, 8, generator=gen).half()
    src_kind, dst_kind = where.split("->")
    dst = dst_cpu.to(DEV) if dst_kind == "device" else dst_cpu.clone().pin_memory()
    src = src_cpu.to(DEV) if src_kind == "device" else src_cpu.clone().pin_memory()
    dst_ids, src_ids = _pairs(rng, 40, 50)
    expected = dst_cpu.clone()
    expected[:, :, dst_ids] = src_cpu[:, :, src_ids]
    runs = merge_runs(dst_ids, src_ids)
    torch.cuda.synchronize(DEV)  # the pools' contents are in place before another stream reads them
    if stream_kind == "side stream":
        side = torch.cuda.Stream(DEV)
        cudaext.copy_runs(dst, src, runs, side.cuda_stream)
        side.synchronize()
    else:
        cudaext.copy_runs(dst, src, runs, 0)
        torch.cuda.synchronize(DEV)
    assert torch.equal(dst.cpu(), expected), f"{len(dst_ids)} pairs in {len(runs)} runs"


def test_copy_runs_with_planes_wider_than_the_2d_pitch_limit() -> None:
    # Planes of 2100 MiB: beyond CU_DEVICE_ATTRIBUTE_MAX_PITCH (2^31 - 1 on current GPUs), so the runs go plane by
    # plane; the result must not depend on the path.
    blocks, per_block = 2100, 1 << 18  # float32: 1 MiB blocks
    src = torch.arange(blocks, device=DEV, dtype=torch.float32).view(1, 1, blocks, 1).repeat(1, 2, 1, per_block)
    src[:, 1] += 10_000  # V differs from K
    dst = torch.zeros_like(src)
    runs = merge_runs([*range(0, 50), 2095, 2096, 2097, 2098, 2099, 100], [*range(2000, 2050), 3, 4, 5, 6, 7, 100])
    assert runs.tolist() == [[2095, 3, 5], [100, 100, 1], [0, 2000, 50]]
    cudaext.copy_runs(dst, src, runs, torch.cuda.current_stream(DEV).cuda_stream)
    torch.cuda.synchronize(DEV)
    for d, s, n in runs.tolist():
        assert torch.equal(dst[:, :, d : d + n], src[:, :, s : s + n]), (d, s, n)
    assert int(dst[:, :, 50:100].count_nonzero()) == 0 and int(dst[:, :, 101:2095].count_nonzero()) == 0


class _Memory:
    """A raw device range as torch sees it (torch keeps this object alive while a view of it lives)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 2}


def _import_and_write(size: int, conn: Connection) -> None:
    try:
        fd = recv_handle(conn)
        torch.cuda.set_device(0)
        va = cudaext.vmm_reserve(size)
        try:
            handle = cudaext.vmm_import_and_map(0, fd, va, size)
        finally:
            os.close(fd)
        view = torch.as_tensor(_Memory(va, size), device=DEV)
        first_half_is_3 = bool(view[: size // 2].eq(3).all())
        view[size // 2 :].fill_(7)
        torch.cuda.synchronize()
        del view
        cudaext.vmm_unmap_and_release(va, size, handle)
        cudaext.vmm_unreserve(va, size)
        conn.send(("ok", first_half_is_3))
    except BaseException as e:
        conn.send(("error", type(e).__name__, str(e)))


def test_vmm_pool_is_shared_with_another_process_by_fd() -> None:
    torch.cuda.set_device(DEV)
    size = 2 * cudaext.vmm_granularity(0)
    va = cudaext.vmm_reserve(size)
    handle, fd = cudaext.vmm_create_and_map(0, va, size)
    try:
        view = torch.as_tensor(_Memory(va, size), device=DEV)
        view.zero_()
        view[: size // 2].fill_(3)
        torch.cuda.synchronize()
        child = Child(_import_and_write, size)
        send_handle(child.conn, fd, child.pid)  # SCM_RIGHTS
        os.close(fd)
        fd = -1
        assert child.result(120) is True  # the child saw our writes through its own mapping
        assert bool(view[size // 2 :].eq(7).all())  # and we see its writes, after it released its handle
        del view
    finally:
        if fd >= 0:
            os.close(fd)
        cudaext.vmm_unmap_and_release(va, size, handle)
        cudaext.vmm_unreserve(va, size)


def test_vmm_import_of_a_foreign_fd_fails_and_leaves_the_reservation_usable() -> None:
    torch.cuda.set_device(DEV)
    size = cudaext.vmm_granularity(0)
    va = cudaext.vmm_reserve(size)
    try:
        fd = os.open("/dev/null", os.O_RDONLY)
        try:
            with pytest.raises(MpkvError, match="mpkv_vmm_import_and_map failed"):
                cudaext.vmm_import_and_map(0, fd, va, size)
        finally:
            os.close(fd)
        # Nothing was left mapped: the range takes a new mapping.
        handle, fd = cudaext.vmm_create_and_map(0, va, size)
        os.close(fd)
        cudaext.vmm_unmap_and_release(va, size, handle)
    finally:
        cudaext.vmm_unreserve(va, size)
