"""The model worker: runs the model plug-in on prefill tasks, writing K/V into its rank's device pool."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mpkv.actors.runtime import Actor, TaskError
from mpkv.blocks import BadBlocks, check_ids
from mpkv.instance import Instance
from mpkv.model import SyntheticModel
from mpkv.protocol import Done, Prefill, Role


class PoolKV:
    """The KVWriter a plug-in writes through: one rank's pool tensor [layers, 2, blocks, block_size, h, d]."""

    def __init__(self, pool: torch.Tensor, block_size: int) -> None:
        self.pool, self.block_size = pool, block_size

    def write(self, layer: int, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        n_tokens, full = k.shape[0], len(blocks) * self.block_size
        for kv_index, x in ((0, k), (1, v)):
            if n_tokens < full:
                x = torch.cat([x, x.new_zeros((full - n_tokens, *x.shape[1:]))])
            self.pool[layer, kv_index, blocks] = x.view(len(blocks), self.block_size, *x.shape[1:])


class Worker(Actor):
    role = Role.WORKER

    def __init__(self, inst: Instance, rank: int) -> None:
        self.model = SyntheticModel(inst.cfg, rank, "cuda" if inst.cfg.backend == "cuda" else "cpu")
        super().__init__(inst, rank)

    def on_new_weights(self, weight_version: int) -> None:
        self.model.load(weight_version)

    def prefill(self, task: Prefill) -> Done:
        cfg = self.cfg
        n_tokens = len(task.tokens)
        try:
            blocks = check_ids(task.blocks, cfg.device_blocks, "device blocks")
        except BadBlocks as e:
            raise TaskError(f"prefill {task.request!r}: {e}") from None
        need = -(-n_tokens // cfg.block_size)
        if n_tokens == 0 or len(blocks) != need:
            raise TaskError(
                f"prefill {task.request!r}: {n_tokens} tokens need {need} blocks of {cfg.block_size}, got {len(blocks)}"
            )
        assert self.pool is not None
        kv = PoolKV(self.pool.tensor, cfg.block_size)
        task = Prefill(task.seq, task.request, np.asarray(task.tokens), blocks)
        self.model.forward([task], kv, on_layer_done=lambda layer: None)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return Done(task.seq, self.rank, weight_version=self.weight_version, layers_done=cfg.layers)

    handlers: ClassVar[dict[type, Any]] = {Prefill: prefill}
