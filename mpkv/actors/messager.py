"""The messager: an attacher of its rank's device pool that, on a prefill instance, ships KV into a decode
instance's pool layer by layer as its worker finishes each layer.

It reads the workers' task ring (as reader tp + rank), so it sees exactly the batches the workers run, in the
same order, with the same ring positions (invariant I4: nothing here is decided from local timing). For each
PrefillSend batch:
  1. map the decode pool of rank r through a link (mpkv.pd.link), if not mapped yet;
  2. for l in layers: wait until the worker's progress passes layer l of this batch, then copy layer l of
     every request of the batch, in order, into its destination blocks;
  3. meet the other ranks' messagers at the barrier keyed (seq, digest of the batch's request ids): a rank
     that batched differently raises ProtocolError naming both ranks and keys instead of hanging (seed 000);
  4. report Done: error empty only if every layer of every request was shipped.
Every batch reaches step 3 on every rank, whatever failed before it (no pool, no link, a cleared decode
instance, a dead worker): a failure changes what a rank reports, never which barriers it enters.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, ClassVar

from mpkv import naming
from mpkv.actors.entry import fault_point, jitter
from mpkv.actors.runtime import PEER_TIMEOUT_S, Actor, TaskError
from mpkv.blocks import BadBlocks, check_ids
from mpkv.errors import MpkvError, PeerDied, WaitTimeout
from mpkv.instance import Instance
from mpkv.pd.link import Link
from mpkv.pd.nixl import Endpoint, NixlLink, Receiver
from mpkv.protocol import (
    ActorState,
    Decode,
    Done,
    PdRole,
    Prefill,
    PrefillBatch,
    PrefillSend,
    Role,
    WaitKind,
    actor_slot,
    pack_slots,
)
from mpkv.shm.barrier import Barrier, BarrierKey
from mpkv.shm.waiting import Peer, WakeSet, Word, wait_until


def batch_key(task: PrefillSend) -> BarrierKey:
    digest = hashlib.blake2b("\0".join(it.request for it in task.items).encode(), digest_size=12).hexdigest()
    return BarrierKey(task.seq, digest)


def _diverge() -> tuple[int, int] | None:
    """Test hook MPKV_DIVERGE=rank:n: on that rank, the n-th batch (from 1) is keyed as if this rank had split
    it after its first request: the reference's bug (seed 000), to show it ends in a ProtocolError."""
    spec = os.environ.get("MPKV_DIVERGE")
    if not spec:
        return None
    rank, nth = spec.split(":")
    return int(rank), int(nth)


class Messager(Actor):
    role = Role.MESSAGER
    poolless = (PrefillSend,)  # every batch reaches the barrier, pool or not
    ignores = (Prefill, PrefillBatch, Decode)  # the workers' plain prefills and decode steps ship nothing

    def __init__(self, inst: Instance, rank: int) -> None:
        self.links: dict[str, Link | NixlLink] = {}
        self._gone: list[Link | NixlLink] = []  # links into instances that went away, closed at the next poll
        self.batches = 0
        self.busy_s = 0.0
        self.barrier: Barrier | None = None
        self._diverge = _diverge()
        # PD across hosts (--nixl-port): a NIXL agent; on a decode instance it also receives (NOTE [ nixl path ]).
        self.nixl: Endpoint | None = None
        self.receiver: Receiver | None = None
        if inst.cfg.pd_role == PdRole.PREFILL:
            self.barrier = Barrier(inst.name_of(naming.SENDBAR), rank, label=f"messager:r{rank}")
        super().__init__(inst, rank)
        if inst.cfg.nixl_port and inst.cfg.pd_role != PdRole.MIXED:
            self.nixl = Endpoint(inst.name, rank, inst.cfg)
            if inst.cfg.pd_role == PdRole.DECODE:
                self.receiver = Receiver(self.nixl, inst.cfg, inst.leases)

    # -- links: watched while idle, so a decode instance's clear never waits for our next batch ----------------------
    def extra_words(self) -> list[Word]:
        return [link.command_word for link in self.links.values() if link.command_word is not None]

    def max_sleep_s(self) -> float:
        if self.receiver is None:
            return super().max_sleep_s()
        # NIXL runs without a progress thread: poll it often while a sender is active, now and then otherwise.
        return 0.001 if time.monotonic() - self.receiver.last_active < 0.25 else 0.05

    def reap(self) -> None:
        while self._gone:  # closed here, before the loop snapshots the words it sleeps on: never a stale buffer
            self._gone.pop().close()

    def poll(self, check_alive: bool = False) -> None:
        if self.receiver is not None:
            self.receiver.poll(self.pool.tensor if self.pool is not None else None, self.pool_epoch)
        for dest, link in list(self.links.items()):
            if link.poll():
                continue
            if check_alive and link.gone():
                self._gone.append(self.links.pop(dest))

    def _link(self, dest: str) -> Link | NixlLink:
        link = self.links.get(dest)
        if link is not None and link.gone():
            self._gone.append(self.links.pop(dest))
            link = None
        if link is None:
            if dest.startswith("nixl://"):
                link = NixlLink(dest, self.rank, self.cfg, self.nixl)
            else:
                link = Link(dest, self.rank, self.cfg)
            self.links[dest] = link
        return link

    # -- a batch --------------------------------------------------------------------------------------------------
    def prefill_send(self, task: PrefillSend) -> Done:
        jitter(self.role, self.rank)
        self.batches += 1
        error, layers, self.busy_s = "", 0, 0.0
        if self.barrier is None:
            raise TaskError(f"{self.name}: only a prefill instance ships KV (mpkv launch --role prefill)")
        try:
            fault_point(self.role, self.rank, "ship")
            layers = self._ship(task)
        except Exception as e:  # whatever failed (task, link, transport, a bug): this batch fails on this rank,
            error = str(e) if isinstance(e, MpkvError) else f"{type(e).__name__}: {e}"  # and every rank meets below
        key = batch_key(task)
        if self._diverge == (self.rank, self.batches) and len(task.items) > 1:
            key = batch_key(PrefillSend(task.seq, task.dest, task.items[:1]))
        others = [actor_slot(Role.MESSAGER, r) for r in range(self.cfg.tp) if r != self.rank]
        self._note_wait(WaitKind.BARRIER, pack_slots(others[:4]))
        try:
            # Links are polled while we wait: a decode instance clearing its pool never waits for our peers.
            self.barrier.wait(key, timeout_s=PEER_TIMEOUT_S, between=self._at_barrier)
        finally:
            self._note_wait(WaitKind.NONE, 0)
        return Done(task.seq, self.rank, error=error, layers_done=layers, data=str(key).encode(), busy_s=self.busy_s)

    def _at_barrier(self) -> None:
        """Between the slices of a wait at the batch barrier: poll the links, and name only the messagers that have
        not arrived (naming all of them would draw a cycle among the ranks that wait for the same late one)."""
        self.poll()
        assert self.barrier is not None
        late = [actor_slot(Role.MESSAGER, r) for r in self.barrier.pending]
        self._note_wait(WaitKind.BARRIER, pack_slots(late[:4]))

    def _ship(self, task: PrefillSend) -> int:
        if self.pool is None:
            raise TaskError(f"{self.name} has no KV pool now ({self.state_words()}): the cache is cleared")
        jitter(self.role, self.rank)
        link = self._link(task.dest)
        transport = link.open()
        dst_blocks = link.dest_blocks
        pairs = []
        for it in task.items:
            try:
                src = check_ids(it.blocks, self.cfg.device_blocks, "source blocks")
                dst = check_ids(it.dest_blocks, dst_blocks, f"destination blocks of {task.dest!r}")
            except BadBlocks as e:
                raise TaskError(f"send {it.request!r}: {e}") from None
            if len(src) != len(dst):
                raise TaskError(f"send {it.request!r}: {len(src)} source blocks for {len(dst)} destination blocks")
            pairs.append((src, dst, (it.lease, it.lease_gen, it.lease_token)))
        src_pool = self.pool.tensor
        if not task.layerwise:
            self._wait_layer(self.cfg.layers - 1, link)
        for layer in range(self.cfg.layers):
            self._wait_layer(layer, link)
            t0 = time.perf_counter()
            for src, dst, lease in pairs:
                transport.write_layer(layer, src_pool, src, dst, lease)
            self.busy_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        transport.flush()
        self.busy_s += time.perf_counter() - t0
        why = link.broken()
        if why:
            raise TaskError(f"{self.name}: {why} while the batch was being shipped")
        return self.cfg.layers

    def _wait_layer(self, layer: int, link: Link | NixlLink) -> None:
        """Until the worker's progress passes ``layer`` of this batch (the shared bounded wait: deadline
        PEER_TIMEOUT_S, the worker's liveness checked every slice). The decode side's clear ends it at once,
        a dead or FAILED worker or a broken link within a slice, each with the reason."""
        progress, pos = self.inst.progress, self.task_pos
        worker = actor_slot(Role.WORKER, self.rank)

        def shipping_stops(why: str) -> TaskError:
            return TaskError(f"{self.name}: {why} while the batch was being shipped")

        def step(slice_s: float, spin_s: float) -> bool:
            # The words we may sleep on, read before the state they guard: a change in between still wakes us.
            wake = WakeSet()
            wake.add(progress.word(self.rank))
            if link.command_word is not None:
                wake.add(link.command_word)
            wake.snapshot()
            sig = progress.read(self.rank)
            if sig.epoch > pos or (sig.epoch == pos and sig.aux > layer):
                return True
            why = link.poll()
            if why:
                raise shipping_stops(why)
            if slice_s > 0:
                wake.sleep(slice_s)
            return False

        def peers() -> list[Peer]:
            why = link.broken()
            if why:
                raise shipping_stops(why)
            w = self.inst.status.read(worker)
            p = progress.read(self.rank)
            return [
                Peer(
                    f"worker r{self.rank}",
                    w.writer if w.seq else None,
                    detail=lambda: f"{w.value.name}@{w.epoch}; progress {p.aux} layers at ring position {p.epoch}",
                    gone=lambda: "FAILED" if w.value == ActorState.FAILED else None,
                )
            ]

        self._note_wait(WaitKind.PROGRESS, pack_slots([worker]))
        try:
            wait_until(
                step,
                what=f"waiting for layer {layer} of batch {self.batches} (ring position {pos})",
                timeout_s=PEER_TIMEOUT_S,
                peers=peers,
            )
        except (WaitTimeout, PeerDied) as e:
            raise TaskError(f"{self.name}: {e}") from None
        finally:
            self._note_wait(WaitKind.NONE, 0)

    handlers: ClassVar[dict[type, Any]] = {PrefillSend: prefill_send}

    def teardown(self) -> None:
        try:
            while self.links:
                self.links.popitem()[1].close()
            while self._gone:
                self._gone.pop().close()
            if self.nixl is not None:
                self.nixl.close()
                self.nixl = self.receiver = None
        finally:
            super().teardown()
            if self.barrier is not None:
                self.barrier.close()
                self.barrier = None
