"""Moving blocks between pools: [layers, 2, blocks, ...] tensors, block ``src[i]`` of every layer's K and V to
block ``dst[i]``. On the cpu backend one memcpy per (layer, K/V, block) in C; on cuda one gather and one copy."""

from __future__ import annotations

import numpy as np
import torch

from mpkv import _native


def copy_blocks(dst: torch.Tensor, dst_ids: np.ndarray, src: torch.Tensor, src_ids: np.ndarray) -> None:
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
    s = torch.as_tensor(np.asarray(src_ids, dtype=np.int64), device=src.device)
    d = torch.as_tensor(np.asarray(dst_ids, dtype=np.int64), device=dst.device)
    staged = src.index_select(2, s)  # one gather on the source's device
    dst.index_copy_(2, d, staged.to(dst.device, non_blocking=False))
