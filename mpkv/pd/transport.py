"""How a messager moves one layer of some blocks into a decode instance's pool: one small interface.

``SameHost`` copies into the decode pool mapped in this process (shm on cpu, a CUDA IPC share on cuda).
A cross-host transport implements the same three calls over an existing transfer engine.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mpkv.pool.copy import CpuPool, Runs, checked_runs, copy_blocks, copy_runs, runs_pay
from mpkv.pool.runs import merge_runs

MAX_CACHED_RUNS = 256


class Transport(Protocol):
    def write_layer(
        self,
        layer: int,
        src: torch.Tensor,
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        lease: tuple[int, int, int],
    ) -> None:
        """Queue (or do) the copy of layer ``layer``'s K and V of ``src_blocks`` into ``dst_blocks``: every
        block of ``lease`` (slot, generation, token) of the decode instance, in order."""
        ...

    def flush(self) -> None:
        """Return when every write queued so far is complete in the destination's memory."""
        ...

    def close(self) -> None: ...


class SameHost:
    """The destination pool is mapped here: a layer is one copy per (K/V, run of consecutive blocks) on the cpu
    (NOTE [ runs on the cpu backend ] in mpkv.pool.copy), where the runs are long; else one per (K/V, block)."""

    def __init__(self, dst: torch.Tensor) -> None:
        self.dst = dst
        self._pool = CpuPool.of(dst) if dst.device.type == "cpu" else None
        # Checked runs by (source pool, source blocks, destination blocks): a batch ships the same blocks of each of
        # its items layer after layer; None where copy_blocks serves them better.
        self._runs: dict[tuple[CpuPool, bytes, bytes], Runs | None] = {}

    def _runs_of(self, dst: CpuPool, src: CpuPool, src_blocks: np.ndarray, dst_blocks: np.ndarray) -> Runs | None:
        key = (src, np.asarray(src_blocks, dtype=np.int64).tobytes(), np.asarray(dst_blocks, dtype=np.int64).tobytes())
        if key not in self._runs:
            if len(self._runs) >= MAX_CACHED_RUNS:  # the items of earlier batches
                self._runs.clear()
            runs = merge_runs(dst_blocks, src_blocks)
            self._runs[key] = checked_runs(dst, src, runs) if runs_pay(runs) else None
        return self._runs[key]

    def write_layer(
        self,
        layer: int,
        src: torch.Tensor,
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        lease: tuple[int, int, int],
    ) -> None:
        # The lease is the engine's to check here: this process maps the pool under the links protocol.
        if self._pool is not None and src.device.type == "cpu":
            runs = self._runs_of(self._pool, CpuPool.of(src), src_blocks, dst_blocks)
            if runs is not None:
                per_layer = self.dst.shape[1]  # K and V
                copy_runs(runs, range(layer * per_layer, (layer + 1) * per_layer))
                return
        copy_blocks(self.dst[layer : layer + 1], dst_blocks, src[layer : layer + 1], src_blocks, complete=False)

    def flush(self) -> None:  # the copies were queued on this stream (NOTE in mpkv.pool.copy)
        if self.dst.device.type == "cuda":
            torch.cuda.current_stream(self.dst.device).synchronize()

    def close(self) -> None:
        self.__dict__.pop("dst", None)
        self._pool = None  # it and the runs hold the pool's address
        self._runs.clear()
