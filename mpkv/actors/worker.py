"""The model worker: runs the model plug-in (mpkv.model) on prefill and decode tasks, writing K/V into its rank's
device pool and answering with each request's next token.

On a prefill instance it also publishes, per PrefillSend batch, how many layers are final in the pool (object
``progress``, slot = rank; epoch = the batch's ring position, which every reader of the ring sees alike). Its
messager ships layer l as soon as the count passes l. On cuda a layer counts only once its kernels completed:
an event is recorded after each layer and the count advances as events complete (no device-wide sync).

Under tensor parallelism with a checkpoint model, the workers of an instance sum their partial products through
the instance's ``allreduce`` object (mpkv.shm.allreduce): every wait there is bounded and names a dead or late
rank. Every rank reads the same tasks in the same order and checks them alike, so every rank runs the same
collectives (invariant I4); a failed collective leaves the all-reduce unusable, so the worker fails (FAILED,
naming the rank), never serves on with ranks out of step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mpkv import naming
from mpkv.actors.entry import jitter
from mpkv.actors.runtime import PEER_TIMEOUT_S, Actor, TaskError
from mpkv.blocks import (
    BadBlocks,
    BadTask,
    check_ids,
    check_sampling,
    check_tokens,
    checked_decode_step,
    checked_prefill_batch,
)
from mpkv.errors import ModelError
from mpkv.instance import Instance
from mpkv.model import AllReduce, ModelRunner, build_runner
from mpkv.protocol import (
    Decode,
    Done,
    PdRole,
    Prefill,
    PrefillBatch,
    PrefillSend,
    Progress,
    Role,
    Sampling,
    WaitKind,
    actor_slot,
    pack_slots,
)
from mpkv.publication import Publication
from mpkv.shm.allreduce import AllReduce as ShmAllReduce


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


def _no_progress(layer: int) -> None:
    pass


class Worker(Actor):
    role = Role.WORKER

    def __init__(self, inst: Instance, rank: int) -> None:
        self.progress = inst.progress.writer(rank) if inst.cfg.pd_role == PdRole.PREFILL else None
        self.collective: ShmAllReduce | None = None
        self._weights_live = False
        super().__init__(inst, rank)
        if naming.ALLREDUCE in inst.topology:
            self.collective = ShmAllReduce(
                inst.name_of(naming.ALLREDUCE), rank, timeout_s=PEER_TIMEOUT_S, between=self._beat
            )
        self.model: ModelRunner = build_runner(inst.cfg, rank, self.device, self._all_reduce())

    def _beat(self) -> None:
        """Between the slices of a wait in the all-reduce (one that outlasts a slice): still alive, and waiting
        for the other workers (I2: mpkv-top draws the wait)."""
        self.heartbeat()
        assert self.collective is not None
        late = [actor_slot(Role.WORKER, r) for r in self.collective.waiting_for]  # not the ranks arrived already
        self._note_wait(WaitKind.BARRIER, pack_slots(late[:4]))

    def _all_reduce(self) -> AllReduce | None:
        collective = self.collective
        if collective is None:
            return None

        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            # The shared buffers are host memory: a device tensor goes through the host (NCCL is the GPU's way).
            host = t.contiguous() if t.device.type == "cpu" else t.cpu()
            collective(host)
            if self._waiting[0] == WaitKind.BARRIER:  # a long wait was published (``_beat``): it is over
                self._note_wait(WaitKind.NONE, 0)
            return host if host.device == t.device else host.to(t.device)

        return all_reduce

    def _published(self, weight_version: int) -> Publication | None:
        published = self.inst.read_weights().named(weight_version)
        if published is not None and not published.manifest.startswith(self.inst.name_of(naming.WEIGHTS_STEM)):
            raise ModelError(f"the weights record names {published.manifest!r}, not a segment of this instance")
        return published

    def on_new_weights(self, weight_version: int) -> None:
        # Loaded, if need be, by LOAD_WEIGHTS: after the pool is published, so its attachers do not wait for it.
        self._weights_live = self._weights_live and self.model.holds(weight_version, self._published(weight_version))

    def load_weights(self) -> None:
        self.model.load(self.weight_version, self._published(self.weight_version))
        self._weights_live = True

    def owns_weights(self) -> bool:
        return True

    def weights_live(self) -> bool:
        return self._weights_live

    def release_weights(self) -> int:
        self._weights_live = False
        return self.model.release()

    # -- checks: the client checked each task too, but a ring may have another writer, and a bad task must fail
    # itself, never the worker (nor leave the pool half-written)
    def _checked(self, seq: int, request: str, tokens: object, blocks: object, sampling: Sampling) -> Prefill:
        cfg = self.cfg
        try:
            ids = check_ids(blocks, cfg.device_blocks, "device blocks")
            toks = check_tokens(tokens, cfg.vocab, cfg.block_size, len(ids), f"prefill {request!r:.80}")
            check_sampling(sampling.temperature, sampling.top_p, sampling.seed, f"prefill {request!r:.80}")
        except BadTask as e:
            raise TaskError(f"prefill {request!r:.80}: {e}" if isinstance(e, BadBlocks) else str(e)) from None
        return Prefill(seq, request, toks, ids, sampling)

    def _task_checked(self, check: Any, items: Any) -> Any:
        """``check(items, vocab, block_size, blocks)``; what it refuses fails the task (alike on every rank: the same
        bytes), not the worker."""
        try:
            return check(items, self.cfg.vocab, self.cfg.block_size, self.cfg.device_blocks)
        except BadTask as e:
            raise TaskError(str(e)) from None

    # -- tasks -----------------------------------------------------------------------------------------------------
    def _done(self, seq: int, tokens: list[int], layers_done: int = 0) -> Done:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the K/V are in the pool before we say so
        return Done(
            seq,
            self.rank,
            weight_version=self.weight_version,
            layers_done=layers_done,
            tokens=np.asarray(tokens, dtype=np.int32),
            pool_epoch=self.pool_epoch,
        )

    def _pool(self) -> torch.Tensor:
        assert self.pool is not None
        return self.pool.tensor

    def prefill(self, task: Prefill) -> Done:
        checked = self._checked(task.seq, task.request, task.tokens, task.blocks, task.sampling)
        tokens = self._run(lambda: self.model.prefill([checked], self._pool(), _no_progress))
        return self._done(task.seq, tokens, self.cfg.layers)

    def prefill_batch(self, task: PrefillBatch) -> Done:
        items = self._task_checked(checked_prefill_batch, task.items)
        batch = [Prefill(task.seq, it.request, it.tokens, it.blocks, it.sampling) for it in items]
        tokens = self._run(lambda: self.model.prefill(batch, self._pool(), _no_progress))
        return self._done(task.seq, tokens, self.cfg.layers)

    def decode(self, task: Decode) -> Done:
        items = self._task_checked(checked_decode_step, task.items)
        return self._done(task.seq, self._run(lambda: self.model.decode(items, self._pool())))

    def prefill_send(self, task: PrefillSend) -> Done:
        if self.progress is None:
            raise TaskError(
                f"{self.name}: this is a {self.cfg.pd_role.name.lower()} instance; PD batches go to a "
                "prefill instance (mpkv launch --role prefill)"
            )
        batch = [self._checked(task.seq, it.request, it.tokens, it.blocks, it.sampling) for it in task.items]
        progress = LayerProgress(self, self.task_pos)
        tokens = self._run(lambda: self.model.prefill(batch, self._pool(), progress.layer_done))
        progress.finish()
        return self._done(task.seq, tokens, progress.final)

    def _run(self, step: Any) -> list[int]:
        """A model call; input the model refuses (BadTask: checked before it wrote anything) fails the task only."""
        try:
            tokens: list[int] = step()
        except BadTask as e:
            raise TaskError(f"{self.name}: {e}") from None
        return tokens

    def on_task_end(self, task: object) -> None:
        # Whatever happened, the batch's layers are as final as they will get: the messager waits no longer.
        if isinstance(task, PrefillSend) and self.progress is not None:
            self.progress.write(Progress.DONE, self.task_pos, self.cfg.layers)

    def close(self) -> None:
        if self.collective is not None:
            self.collective.close()
        super().close()

    handlers: ClassVar[dict[type, Any]] = {
        Prefill: prefill,
        PrefillBatch: prefill_batch,
        Decode: decode,
        PrefillSend: prefill_send,
    }
