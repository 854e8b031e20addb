"""How a messager moves one layer of some blocks into a decode instance's pool: one small interface.

``SameHost`` copies into the decode pool mapped in this process (shm on cpu, a CUDA IPC share on cuda).
A cross-host transport implements the same three calls over an existing transfer engine.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from mpkv.pool.copy import copy_blocks


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
    """The destination pool is mapped here: a layer is one block copy per (K/V, block)."""

    def __init__(self, dst: torch.Tensor) -> None:
        self.dst = dst

    def write_layer(
        self,
        layer: int,
        src: torch.Tensor,
        src_blocks: np.ndarray,
        dst_blocks: np.ndarray,
        lease: tuple[int, int, int],
    ) -> None:
        # The lease is the engine's to check here: this process maps the pool under the links protocol.
        copy_blocks(self.dst[layer : layer + 1], dst_blocks, src[layer : layer + 1], src_blocks, complete=False)

    def flush(self) -> None:  # the copies were queued on this stream (NOTE in mpkv.pool.copy)
        if self.dst.device.type == "cuda":
            torch.cuda.current_stream(self.dst.device).synchronize()

    def close(self) -> None:
        self.__dict__.pop("dst", None)
