"""The decode instance's block allocator, as the engine sees it: destination blocks are granted to one transfer
as a lease, and are readable only once the transfer is complete on every rank.

A lease's state lives in the decode instance's ``leases`` signal array (one slot per lease; value LeaseState,
epoch = the lease's generation, aux = the decode pool's restore epoch at grant), written only by this
allocator, so the decode side and mpkv-top see every transfer in flight. The generation is also the lease's
check word: ``lease_check`` of a secret token (64 random bits, known only to the engine and the senders it
gives the lease to), the slot, the pool epoch and the destination blocks. A decode messager receiving a remote
write recomputes it from what the sender claims: only the lease's token with the lease's own blocks match
(NOTE [ nixl path ] in mpkv.pd.nixl). 63 bits of a keyed hash of a fresh token: never reused for a slot
(a late message of an earlier lease is refused), except with probability 2**-63. A lease is granted against one pool
epoch: once the decode instance clears its pool, every lease of the old epoch is failed and its blocks come
back (the links dropped the old pool before the clear finished, so nothing can write them any more).

Such a lease is *retired*: the allocator settled and released it itself, once, at the first call after the
restore (``sync``), and says why in ``Lease.retired``. The engine still holds it (in a batch it sends or waits
for): completing it then returns that reason, failing or releasing it changes nothing, sending it is refused.
"""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mpkv.allocator import BlockAllocator
from mpkv.errors import LeaseError
from mpkv.instance import MAX_LEASES, Instance
from mpkv.protocol import LeaseState, PdRole
from mpkv.shm.signals import SignalWriter
from mpkv.status import decode_pool_gone


def lease_check(token: int, slot: int, pool_epoch: int, blocks: Sequence[int] | np.ndarray) -> int:
    """A lease's generation: a MAC, under its token, of where its KV may go (63 bits, never 0)."""
    mac = hashlib.blake2b(token.to_bytes(8, "little"), digest_size=8, key=b"mpkv.lease")
    mac.update(struct.pack("<QQ", slot, pool_epoch))
    mac.update(np.asarray(blocks, dtype="<i4").tobytes())
    return (int.from_bytes(mac.digest(), "little") >> 1) or 1


@dataclass
class Lease:
    slot: int
    gen: int
    request: str
    blocks: np.ndarray  # int32 destination block ids, in order
    pool_epoch: int
    weight_version: int  # the decode instance's weights: KV of any other version is refused (invariant I7)
    state: LeaseState = LeaseState.GRANTED
    reason: str = ""
    in_use: str = ""  # who may still write or read the blocks (a transfer not settled): release refuses until ""
    retired: str = ""  # why the allocator took the lease back itself (its pool was cleared): settled and released
    token: int = field(default=0, repr=False)  # the secret a remote sender shows with every write (lease_check)


class Allocator:
    """Grants the blocks of a decode instance. One per instance at a time (it claims the lease slots)."""

    def __init__(self, inst: Instance) -> None:
        if inst.cfg.pd_role != PdRole.DECODE:
            raise LeaseError(
                f"instance {inst.name} is a {inst.cfg.pd_role.name.lower()} instance; only a decode "
                "instance leases its blocks to transfers"
            )
        self.inst = inst
        self._writers: dict[int, SignalWriter[LeaseState]] = {}
        self.pool_epoch, self.weight_version = self._current_pool()
        self.blocks = BlockAllocator(inst.cfg.device_blocks, inst.name)  # shared with local requests (Client.blocks)
        self.leases: dict[int, Lease] = {}  # by slot
        self._free_slots = list(range(MAX_LEASES - 1, -1, -1))

    def _current_pool(self) -> tuple[int, int]:
        """(restore epoch, weight version) of the pool the ranks serve now (their handles; the newest)."""
        handles = [self.inst.read_handle(r) for r in range(self.inst.cfg.tp)]
        newest = max(handles, key=lambda h: h.epoch)
        return newest.epoch, newest.weight_version

    def pool_gone(self, lease: Lease) -> str:
        """Why the pool the lease was granted on is no longer (or soon no longer) there, or ""."""
        self.sync()
        if lease.pool_epoch != self.pool_epoch:
            return f"the decode pool of epoch {lease.pool_epoch} was cleared"
        return decode_pool_gone(self.inst, range(self.inst.cfg.tp))

    def _write(self, lease: Lease) -> None:
        w = self._writers.get(lease.slot)
        if w is None:
            w = self._writers[lease.slot] = self.inst.leases.writer(lease.slot)
        w.write(lease.state, lease.gen, lease.pool_epoch)

    def sync(self) -> None:
        """Notice a clear/restore of the decode pool: every lease of an older pool fails, its blocks come back."""
        epoch, wv = self._current_pool()
        if epoch == self.pool_epoch:
            return
        self.pool_epoch, self.weight_version = epoch, wv
        for lease in list(self.leases.values()):
            if lease.pool_epoch != epoch:
                why = (
                    f"the decode pool of epoch {lease.pool_epoch} was cleared (the decode instance restored "
                    f"epoch {epoch} since); the allocator took the lease back"
                )
                if lease.state == LeaseState.GRANTED:
                    self._settle(lease, LeaseState.FAILED, why)
                lease.in_use = ""  # the links let go of that pool before its clear finished: nothing writes it
                self.release(lease)
                lease.retired = why

    def grant(self, request: str, n_blocks: int) -> Lease:
        self.sync()
        if n_blocks <= 0:
            raise LeaseError(f"lease for {request!r}: {n_blocks} blocks asked; a lease holds at least one block")
        if self.blocks.free < n_blocks:
            raise LeaseError(
                f"lease for {request!r}: {n_blocks} blocks asked, {self.blocks.free} of "
                f"{self.inst.cfg.device_blocks} free in {self.inst.name} ({len(self.leases)} leases held)"
            )
        if not self._free_slots:
            raise LeaseError(f"lease for {request!r}: {MAX_LEASES} leases are held already in {self.inst.name}")
        slot = self._free_slots.pop()
        blocks = self.blocks.take(n_blocks, f"lease for {request!r}")
        try:
            # A generation never reused for a slot, even across allocators: late messages of an old lease are refused.
            previous, token, gen = self.inst.leases.read(slot).epoch, 0, 0
            while gen in (0, previous):
                token = secrets.randbits(64)
                gen = lease_check(token, slot, self.pool_epoch, blocks)
            lease = Lease(slot, gen, request, blocks, self.pool_epoch, self.weight_version, token=token)
            self._write(lease)
        except BaseException:
            self._free_slots.append(slot)
            self.blocks.give_back(blocks)
            raise
        self.leases[lease.slot] = lease
        return lease

    def complete(self, leases: list[Lease]) -> str:
        """Every rank shipped every layer of a batch and every prefill worker succeeded: its leases' blocks become
        readable, all of them, if the pool they were shipped into is still the one served. Returns why not (then
        every lease still in flight is failed with it, none completed), or ""."""
        self.sync()
        held = [lease for lease in leases if self._held(lease)]
        why = next((lease.retired for lease in leases if lease.retired), "")
        for lease in held:
            if lease.state != LeaseState.GRANTED:  # an earlier wait_send gave up on it: it stays as it is
                why = why or f"lease of {lease.request!r} was {lease.state.name} already: {lease.reason}"
            why = why or self.pool_gone(lease)
        for lease in held:
            if lease.state == LeaseState.GRANTED:
                self._settle(lease, LeaseState.FAILED if why else LeaseState.COMPLETE, why)
        return why

    def fail(self, lease: Lease, reason: str, in_use: str = "") -> None:
        """The transfer failed: the blocks hold garbage. ``in_use`` names who may still write them (release
        refuses until a later fail clears it). A lease the allocator retired already stays as it is."""
        self.sync()
        if not self._held(lease):
            return
        if lease.state == LeaseState.GRANTED:
            self._settle(lease, LeaseState.FAILED, reason)
        lease.in_use = in_use

    def _settle(self, lease: Lease, state: LeaseState, reason: str) -> None:
        if lease.state != LeaseState.GRANTED:
            raise LeaseError(f"lease {lease.slot} of {lease.request!r} is {lease.state.name} already")
        lease.state, lease.reason = state, reason
        self._write(lease)

    def release(self, lease: Lease) -> None:
        """Give the blocks back (the decode side is done with them, or the transfer failed). A lease the allocator
        retired already (its pool was cleared) was given back then: nothing happens."""
        if not self._held(lease):
            return
        if lease.state == LeaseState.GRANTED:
            raise LeaseError(f"lease {lease.slot} of {lease.request!r} is still in flight: complete or fail it first")
        if lease.in_use:
            raise LeaseError(
                f"lease {lease.slot} of {lease.request!r} failed, but its blocks may still be written: {lease.in_use}"
            )
        del self.leases[lease.slot]
        self.blocks.give_back(lease.blocks)
        self._free_slots.append(lease.slot)
        lease.state = LeaseState.FREE
        self._write(lease)

    def check_readable(self, blocks: np.ndarray) -> None:
        """Refuse to read blocks that belong to a transfer not complete on every rank (or a failed one)."""
        self.sync()
        wanted = set(np.asarray(blocks).tolist())
        for lease in self.leases.values():
            if lease.state != LeaseState.COMPLETE and wanted.intersection(lease.blocks.tolist()):
                raise LeaseError(
                    f"blocks of {lease.request!r} (lease {lease.slot}) are {lease.state.name}"
                    f"{': ' + lease.reason if lease.reason else ''}; they are readable once the transfer completed"
                )

    def _held(self, lease: Lease) -> bool:
        """True if this allocator holds the lease, False if it retired it; anything else is a caller's mistake."""
        if self.leases.get(lease.slot) is lease:
            return True
        if lease.retired and lease.pool_epoch != self.pool_epoch:
            return False
        raise LeaseError(
            f"lease {lease.slot} of {lease.request!r} is not held by the allocator of {self.inst.name} "
            f"({lease.state.name}{': released already' if lease.state == LeaseState.FREE else ''})"
        )
