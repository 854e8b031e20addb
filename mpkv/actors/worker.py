"""The model worker: runs the model plug-in on prefill tasks, writing K/V into its rank's device pool.

On a prefill instance it also publishes, per PrefillSend batch, how many layers are final in the pool (object
``progress``, slot = rank; epoch = the batch's ring position, which every reader of the ring sees alike). Its
messager ships layer l as soon as the count passes l. On cuda a layer counts only once its kernels completed:
an event is recorded after each layer and the count advances as events complete (no device-wide sync).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from mpkv.actors.entry import jitter
from mpkv.actors.runtime import Actor, TaskError
from mpkv.blocks import BadBlocks, BadTask, check_ids, check_tokens
from mpkv.instance import Instance
from mpkv.model import SyntheticModel
from mpkv.protocol import Done, PdRole, Prefill, PrefillSend, Progress, Role


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


class LayerProgress:
    """Publishes "layers 0..n-1 of the task at ring position ``pos`` are final in the pool"."""

    def __init__(self, worker: Worker, pos: int) -> None:
        self.worker, self.pos, self.final = worker, pos, 0
        self.pending: list[torch.cuda.Event] = []

    def layer_done(self, layer: int) -> None:
        if self.worker.device.type != "cuda":
            self._publish(layer + 1)
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.worker.device))
        self.pending.append(event)
        while self.pending and self.pending[0].query():  # those done by now, without waiting
            self.pending.pop(0)
            self._publish(self.final + 1)

    def finish(self) -> None:
        for event in self.pending:  # each layer as its own kernels complete
            event.synchronize()
            self._publish(self.final + 1)
        self.pending.clear()

    def _publish(self, layers: int) -> None:
        jitter(Role.WORKER, self.worker.rank)
        self.final = layers
        assert self.worker.progress is not None
        self.worker.progress.write(Progress.RUNNING, self.pos, layers)


class Worker(Actor):
    role = Role.WORKER

    def __init__(self, inst: Instance, rank: int) -> None:
        self.model = SyntheticModel(inst.cfg, rank, "cuda" if inst.cfg.backend == "cuda" else "cpu")
        self.progress = inst.progress.writer(rank) if inst.cfg.pd_role == PdRole.PREFILL else None
        super().__init__(inst, rank)

    def on_new_weights(self, weight_version: int) -> None:
        self.model.load(weight_version)

    def _checked(self, seq: int, request: str, tokens: object, blocks: object) -> Prefill:
        """The task as the model may use it, or a TaskError: the client checked it too, but a ring may have
        another writer, and a bad task must fail itself, never the worker (nor leave the pool half-written)."""
        cfg = self.cfg
        try:
            ids = check_ids(blocks, cfg.device_blocks, "device blocks")
            toks = check_tokens(tokens, cfg.vocab, cfg.block_size, len(ids), f"prefill {request!r:.80}")
        except BadTask as e:
            raise TaskError(f"prefill {request!r:.80}: {e}" if isinstance(e, BadBlocks) else str(e)) from None
        return Prefill(seq, request, toks, ids)

    def _forward(self, batch: list[Prefill], on_layer_done: Any) -> None:
        assert self.pool is not None
        self.model.forward(batch, PoolKV(self.pool.tensor, self.cfg.block_size), on_layer_done=on_layer_done)

    def prefill(self, task: Prefill) -> Done:
        self._forward([self._checked(task.seq, task.request, task.tokens, task.blocks)], lambda layer: None)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return Done(task.seq, self.rank, weight_version=self.weight_version, layers_done=self.cfg.layers)

    def prefill_send(self, task: PrefillSend) -> Done:
        if self.progress is None:
            raise TaskError(
                f"{self.name}: this is a {self.cfg.pd_role.name.lower()} instance; PD batches go to a "
                "prefill instance (mpkv launch --role prefill)"
            )
        batch = [self._checked(task.seq, it.request, it.tokens, it.blocks) for it in task.items]
        progress = LayerProgress(self, self.task_pos)
        self._forward(batch, progress.layer_done)
        progress.finish()
        return Done(task.seq, self.rank, weight_version=self.weight_version, layers_done=progress.final)

    def on_task_end(self, task: object) -> None:
        # Whatever happened, the batch's layers are as final as they will get: the messager waits no longer.
        if isinstance(task, PrefillSend) and self.progress is not None:
            self.progress.write(Progress.DONE, self.task_pos, self.cfg.layers)

    handlers: ClassVar[dict[type, Any]] = {Prefill: prefill, PrefillSend: prefill_send}
