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
"""

from __future__ import annotations

import numpy as np
import torch

from mpkv import _native


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
