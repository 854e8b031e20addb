"""The cache-transfer manager: swaps blocks between its rank's device pool and its own host pool.

Host slots are allocated here (the client never names a free slot), and every slot carries the weight version
of the KV it holds: a swap-in of KV from another weight version is refused (invariant I7), and adopting a new
weight version drops every older entry.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from mpkv.actors.runtime import Actor, TaskError
from mpkv.blocks import BadBlocks, check_ids
from mpkv.instance import Instance
from mpkv.pool import OwnedPool, allocate_host_pool
from mpkv.pool.copy import copy_blocks
from mpkv.protocol import Done, HostTier, ReadBlocks, Role, SwapIn, SwapOut

FREE = -1


class TransferManager(Actor):
    role = Role.TRANSFER

    def __init__(self, inst: Instance, rank: int) -> None:
        self.host: OwnedPool | None = None
        self.slot_version = np.full(inst.cfg.host_blocks, FREE, dtype=np.int64)
        self._usage_w = inst.usage.writer(rank)
        self._usage_shown: tuple[HostTier, int] | None = None
        super().__init__(inst, rank)

    # -- host pool life cycle (driven by the handshake) --------------------------------------------------------------
    def owns_host(self) -> bool:
        return True

    def host_live(self) -> bool:
        return self.host is not None

    def restore_host(self, epoch: int, weight_version: int) -> None:
        self.host = allocate_host_pool(self.inst.registry, self.cfg, self.rank, epoch, weight_version)
        self.slot_version[:] = FREE
        self.on_task_end(None)

    def release_host(self) -> int:
        host, self.host = self.host, None
        self.slot_version[:] = FREE
        self.on_task_end(None)
        return host.free() if host is not None else 0

    def on_task_end(self, task: object) -> None:
        """Publish how many host slots hold KV (mpkv-top), when a swap (or the life cycle: ``None``) may have
        changed it; a write only if it did."""
        if task is not None and not isinstance(task, (SwapOut, SwapIn)):
            return
        in_use = int(np.count_nonzero(self.slot_version != FREE))
        tier = HostTier.LIVE if self.host is not None else HostTier.CLEARED
        if (tier, in_use) != self._usage_shown:
            self._usage_shown = (tier, in_use)
            self._usage_w.write(tier, in_use, self.cfg.host_blocks)

    def on_new_weights(self, weight_version: int) -> None:
        self.slot_version[self.slot_version != weight_version] = FREE
        self.on_task_end(None)

    def teardown(self) -> None:
        super().teardown()
        self.release_host()

    # -- tasks ----------------------------------------------------------------------------------------------------
    def _ids(self, ids: object, limit: int, what: str, seq: int) -> np.ndarray:
        try:
            return check_ids(ids, limit, what)
        except BadBlocks as e:
            raise TaskError(f"task {seq}: {e}") from None

    def _host(self) -> torch.Tensor:
        if self.host is None:
            raise TaskError(f"{self.name} has no host pool now: the host tier is cleared")
        return self.host.tensor

    def _owned_slots(self, slots: object, seq: int) -> np.ndarray:
        s = self._ids(slots, self.cfg.host_blocks, "host slots", seq)
        versions = self.slot_version[s]
        unowned = s[versions == FREE]
        if unowned.size:
            raise TaskError(f"task {seq}: host slots {unowned.tolist()[:8]} hold nothing (never swapped out, or freed)")
        stale = s[versions != self.weight_version]
        if stale.size:
            raise TaskError(
                f"task {seq}: host slots {stale.tolist()[:8]} hold KV of weight version "
                f"{int(self.slot_version[stale[0]])}, the instance serves {self.weight_version}: refusing stale KV"
            )
        return s

    def swap_out(self, task: SwapOut) -> Done:
        blocks = self._ids(task.blocks, self.cfg.device_blocks, "device blocks", task.seq)
        host = self._host()
        free = np.flatnonzero(self.slot_version == FREE)
        if len(free) < len(blocks):
            raise TaskError(f"task {task.seq}: host pool full: {len(blocks)} slots needed, {len(free)} free")
        # Give ascending slots to ascending blocks: both sides of the copy are then walked in address order.
        slots = np.empty(len(blocks), dtype=np.int64)
        slots[np.argsort(blocks, kind="stable")] = free[: len(blocks)]
        assert self.pool is not None
        copy_blocks(host, slots, self.pool.tensor, blocks)
        self.slot_version[slots] = self.weight_version
        return Done(task.seq, self.rank, slots=slots.astype(np.int32), weight_version=self.weight_version)

    def swap_in(self, task: SwapIn) -> Done:
        blocks = self._ids(task.blocks, self.cfg.device_blocks, "device blocks", task.seq)
        slots = self._owned_slots(task.slots, task.seq)
        if len(slots) != len(blocks):
            raise TaskError(f"task {task.seq}: {len(slots)} host slots for {len(blocks)} device blocks")
        host = self._host()
        assert self.pool is not None
        copy_blocks(self.pool.tensor, blocks, host, slots)
        if task.free_slots:
            self.slot_version[slots] = FREE
        return Done(task.seq, self.rank, weight_version=self.weight_version)

    def read_blocks(self, task: ReadBlocks) -> Done:
        if task.host:
            ids = self._owned_slots(task.blocks, task.seq)
            data = self._host()[:, :, torch.as_tensor(ids)]
        else:
            ids = self._ids(task.blocks, self.cfg.device_blocks, "device blocks", task.seq)
            assert self.pool is not None
            data = self.pool.tensor[:, :, torch.as_tensor(ids, device=self.pool.tensor.device)]
        raw = data.contiguous().cpu().view(torch.uint8).numpy().tobytes()
        return Done(task.seq, self.rank, weight_version=self.weight_version, data=raw)

    handlers: ClassVar[dict[type, Any]] = {SwapOut: swap_out, SwapIn: swap_in, ReadBlocks: read_blocks}
