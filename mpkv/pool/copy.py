"""Moving blocks between pools: [layers, 2, blocks, ...] tensors, block ``src[i]`` of every layer's K and V to
block ``dst[i]``. On the cpu backend one memcpy per (layer, K/V, block) in C. On cuda, where cuda/ is built
(``mpkv.cudaext``), the block ids merged into runs of consecutive ids (``mpkv.pool.runs``) and one 2-D copy per run
covering every layer; else one gather and one scatter through torch.

Note [cuda copies complete before they are announced]
A cuda copy is only queued (on the current stream of the GPU involved): ``index_copy_`` and the copy engines run
after the call returns. The blocks are read next by another process (a worker after a swap-in, a decode worker
after a PD ship), in another CUDA context, told by a ring message that no CUDA stream orders after the copy. So
the process that copies waits for the copy to end before it says it is done: ``copy_blocks`` synchronizes the
stream unless the caller passes ``complete=False`` and synchronizes later itself (a PD transport's ``flush``, once
per batch of layers).

Note [runs on the cpu backend]
Where the ids run consecutively (a PD ship: a lease's blocks, a prompt's blocks), ``copy_runs`` copies each run
of each plane as one streamed copy: a layer of a PD ship is then two copies (K and V) rather than two per block,
and one Python call instead of copy_blocks' per-call set-up, which costs as much as copying a few blocks
(measured: 1.3x at 2 MiB per layer, 2.7x at 512 KiB). A call costs ~1 us of Python per (plane, run), so ids that
do not run (a swap of scattered blocks) are better served by copy_blocks' one C loop: ``runs_pay`` says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mpkv import _native

MIN_RUN = 4  # blocks per run, on average, from which a copy per run beats copy_blocks' C loop per block
_ZERO = np.zeros(1, dtype=np.int64)  # the one block id of a one-block view: copy_runs' calls into copy_blocks


def copy_blocks(
    dst: torch.Tensor, dst_ids: np.ndarray, src: torch.Tensor, src_ids: np.ndarray, *, complete: bool = True
) -> None:
    if len(dst_ids) != len(src_ids):
        raise ValueError(f"{len(src_ids)} source blocks for {len(dst_ids)} destination blocks")
    if dst.device.type == "cpu" and src.device.type == "cpu":
        if not (dst.is_contiguous() and src.is_contiguous() and dst.dtype == src.dtype):
            raise ValueError("copy_blocks needs contiguous pools of one dtype")
        planes = dst.shape[0] * dst.shape[1]
        block_bytes = dst[0, 0, 0].numel() * dst.element_size()
        s_ids = np.asarray(src_ids, dtype=np.int64)
        order = np.argsort(s_ids, kind="stable")  # read the source in address order: the prefetcher helps
        _native.copy_blocks(
            dst.data_ptr(),
            dst.shape[2],
            src.data_ptr(),
            src.shape[2],
            planes,
            block_bytes,
            np.ascontiguousarray(np.asarray(dst_ids, dtype=np.int64)[order]),
            np.ascontiguousarray(s_ids[order]),
        )
        return
    device = dst.device if dst.device.type == "cuda" else src.device
    stream = torch.cuda.current_stream(device)
    import mpkv.cudaext as cudaext

    if not cudaext.missing() and all(t.is_cuda or t.is_pinned() for t in (dst, src)):  # DMA needs pinned host memory
        from mpkv.pool.runs import merge_runs

        cudaext.copy_runs(dst, src, merge_runs(dst_ids, src_ids), stream.cuda_stream)
    else:
        s = torch.as_tensor(np.asarray(src_ids, dtype=np.int64), device=src.device)
        d = torch.as_tensor(np.asarray(dst_ids, dtype=np.int64), device=dst.device)
        staged = src.index_select(2, s)  # one gather on the source's device
        dst.index_copy_(2, d, staged.to(dst.device, non_blocking=False))
    if complete:  # both GPUs' streams, where two are involved (a PD copy between two devices)
        for gpu in {t.device for t in (dst, src) if t.device.type == "cuda"}:
            torch.cuda.current_stream(gpu).synchronize()


def runs_pay(runs: np.ndarray) -> bool:
    """Whether ``copy_runs`` of ``runs`` (``merge_runs``' rows) beats ``copy_blocks`` of the same ids on the cpu
    (NOTE [ runs on the cpu backend ]): the runs are long, on average."""
    return len(runs) * MIN_RUN <= int(runs[:, 2].sum()) if len(runs) else True


@dataclass(frozen=True)
class CpuPool:
    """A contiguous cpu pool [layers, 2, blocks, ...] as ``copy_runs`` addresses it. It holds the pool's address,
    not the pool: the caller keeps the tensor alive while it copies."""

    ptr: int
    planes: int
    blocks: int
    block_bytes: int
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> CpuPool:
        if t.device.type != "cpu" or not t.is_contiguous() or t.dim() < 3:
            raise ValueError(f"copy_runs copies between contiguous cpu pools, got {t.device} {tuple(t.shape)}")
        shape = t.shape
        return cls(t.data_ptr(), shape[0] * shape[1], shape[2], math.prod(shape[3:]) * t.element_size(), t.dtype)


@dataclass(frozen=True)
class Runs:
    """Runs (dst, src, count) checked against both pools: ``checked_runs`` makes them, ``copy_runs`` copies them."""

    dst: CpuPool
    src: CpuPool
    rows: tuple[tuple[int, int, int], ...]


def checked_runs(dst: CpuPool, src: CpuPool, runs: np.ndarray) -> Runs:
    """``merge_runs``' rows, checked once against both pools (a batch copies the same runs layer after layer)."""
    if (dst.planes, dst.block_bytes, dst.dtype) != (src.planes, src.block_bytes, src.dtype):
        raise ValueError(f"copy_runs between pools of different geometry: {dst} and {src}")
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    # Compared without adding: start + count could wrap around int64 and pass, then be written out of the pool.
    count = runs[:, 2]
    if len(runs) and (
        runs.min() < 0
        or count.min() < 1
        or (runs[:, 0] > dst.blocks - count).any()
        or (runs[:, 1] > src.blocks - count).any()
    ):
        raise ValueError(
            f"copy_runs: a run is out of range of the pools ({dst.blocks} destination, {src.blocks} source blocks)"
        )
    return Runs(dst, src, tuple((d, s, count) for d, s, count in runs.tolist()))


def copy_runs(runs: Runs, planes: range) -> None:
    """Copy ``runs`` of the given planes (layer l's K and V: planes 2l and 2l+1), one streamed copy per (plane,
    run): blocks src..src+count-1 of a plane to dst..dst+count-1."""
    dst, src = runs.dst, runs.src
    if planes.step != 1 or planes.start < 0 or planes.stop > dst.planes:
        raise ValueError(f"copy_runs: planes {planes} out of the pools' planes range(0, {dst.planes})")
    bb = dst.block_bytes
    for p in planes:
        d0, s0 = dst.ptr + p * dst.blocks * bb, src.ptr + p * src.blocks * bb
        for d, s, count in runs.rows:
            _native.copy_blocks(d0 + d * bb, 1, s0 + s * bb, 1, 1, count * bb, _ZERO, _ZERO)
