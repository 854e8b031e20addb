"""A checked barrier: N ranks, each arrival carries a key; disagreeing ranks get a ProtocolError, not a hang.

Byte map: NOTE [ barrier layout ] in mpkv.layout. Each rank writes only its own line pair: the key for this
generation, then (release) its ``arrived_gen``. A rank then waits until every rank's ``arrived_gen`` reached
the generation, comparing keys as they arrive: the first rank seen with another key ends the wait at once
with an error naming both ranks and both keys (invariant I4). A dead rank is named within a liveness slice;
a late one at the deadline, with the generation it last reached.

Keys are (sequence number, tag): the engine's task sequence number and a request id or batch id. Two ranks
that batched differently present different keys at the same generation; that is exactly the reference's
deadlock (seed 000), turned into an error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from mpkv import _native, layout
from mpkv.errors import AttachError, ProtocolError
from mpkv.layout import SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S, Peer, wait_until

_BASE = layout.SEGMENT_HEADER_BYTES
_RANKS = _BASE + layout.LINE_BYTES  # payload line 0: nranks u64


@dataclass(frozen=True)
class BarrierKey:
    seq: int
    tag: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.seq < 2**64:
            raise ValueError(f"barrier key sequence number must fit in 64 bits, got {self.seq}")
        if len(self.tag.encode()) > layout.BAR_TAG_BYTES:
            raise ValueError(f"barrier key tag {self.tag!r} is longer than {layout.BAR_TAG_BYTES} bytes")

    def __str__(self) -> str:
        return f"(seq={self.seq}, tag={self.tag!r})"


def create_barrier(registry: Registry, obj: str, nranks: int) -> Segment:
    if not 1 <= nranks <= 256:
        raise ValueError(f"a barrier has 1 to 256 ranks, got {nranks}")
    seg = registry.create_segment(obj, SegmentKind.BARRIER, layout.LINE_BYTES + nranks * layout.BARRIER_RANK_BYTES)
    _native.store_u64(seg.buf, _BASE, nranks)
    seg.mark_ready()
    return seg


class Barrier:
    """Rank ``rank``'s side of a barrier. One process per rank."""

    def __init__(self, name: str, rank: int, *, label: str = "") -> None:
        self.name = name
        self.seg = Segment.attach(name, SegmentKind.BARRIER)
        self.nranks = int(_native.load_u64(self.seg.buf, _BASE))
        if not 0 <= rank < self.nranks:
            self.seg.close()
            raise AttachError(f"barrier {name} has ranks 0..{self.nranks - 1}; there is no rank {rank}")
        self.rank = rank
        self.label = label
        self._off = self._rank_off(rank)
        try:
            self._claim()
        except BaseException:
            self.seg.close()
            raise
        self.generation = int(_native.load_u64(self.seg.buf, self._off + layout.BAR_ARRIVED))
        self.pending: list[int] = []  # in a wait: the ranks not seen arriving yet (a wait record names them)

    def _rank_off(self, rank: int) -> int:
        return _RANKS + rank * layout.BARRIER_RANK_BYTES

    def _proc(self, rank: int) -> ProcId:
        off = self._rank_off(rank)
        buf = self.seg.buf
        return ProcId(int(_native.load_u64(buf, off + layout.BAR_PID)), _native.load_u64(buf, off + layout.BAR_START))

    def _claim(self) -> None:
        buf, off, me = self.seg.buf, self._off, ProcId.me()
        holder = self._proc(self.rank)
        # Judged by pid alone: a claimer that won the compare-and-swap has not written its start time yet.
        if holder.pid and holder.pid != me.pid and ProcId.of(holder.pid).alive():
            raise AttachError(f"rank {self.rank} of barrier {self.name} is already held by {holder.describe()}")
        won, _ = _native.cas_u64(buf, off + layout.BAR_PID, holder.pid, me.pid)
        if not won:
            raise AttachError(f"rank {self.rank} of barrier {self.name} was claimed by another process just now")
        _native.store_u64(buf, off + layout.BAR_START, me.start_ticks)

    def _peer(self, rank: int, gen: int) -> Peer:
        last = int(_native.load_u64(self.seg.buf, self._rank_off(rank) + layout.BAR_ARRIVED))
        proc = self._proc(rank)
        state = f"last arrived at generation {last}, this is {gen}"
        return Peer(f"rank {rank} of barrier {self.name}", proc if proc.pid else None, lambda: state)

    def _key(self, rank: int, gen: int) -> BarrierKey:
        off = self._rank_off(rank) + layout.BAR_KEY0 + (gen % 2) * layout.BAR_KEY_BYTES
        seq, tag = layout.BAR_KEY.unpack_from(self.seg.buf, off)
        return BarrierKey(seq, tag.rstrip(b"\0").decode(errors="replace"))

    def wait(
        self, key: BarrierKey, timeout_s: float = DEFAULT_TIMEOUT_S, between: Callable[[], None] | None = None
    ) -> int:
        """Arrive with ``key`` and wait for every rank to arrive with the same key. Returns the generation.
        ``between`` runs between liveness slices (0.1 s): a caller's duties that must not wait for the barrier (it
        may read ``pending``: the ranks it still waits for)."""
        buf, off = self.seg.buf, self._off
        gen = self.generation + 1
        key_off = off + layout.BAR_KEY0 + (gen % 2) * layout.BAR_KEY_BYTES
        layout.BAR_KEY.pack_into(buf, key_off, key.seq, key.tag.encode())
        flags = _RANKS + layout.BAR_SLEEPING
        _native.store_notify(buf, off + layout.BAR_ARRIVED, gen, flags, layout.BARRIER_RANK_BYTES, self.nranks)
        self.generation = gen
        pending = self.pending = [r for r in range(self.nranks) if r != self.rank]
        _native.store_u64(buf, off + layout.BAR_WAIT_SINCE, time.monotonic_ns())

        def step(slice_s: float, spin_s: float) -> bool:
            while pending:
                r = pending[0]
                arrived_off = self._rank_off(r) + layout.BAR_ARRIVED
                arrived = _native.load_u64(buf, arrived_off)
                if arrived < gen:
                    if slice_s > 0:
                        _native.wait_word_change(buf, arrived_off, arrived, off + layout.BAR_SLEEPING, spin_s, slice_s)
                    return False
                theirs = self._key(r, gen)
                if theirs != key:
                    raise ProtocolError(
                        f"barrier {self.name} generation {gen}: rank {self.rank} arrived with key {key} but "
                        f"rank {r} arrived with key {theirs}; the ranks disagree on what they synchronize"
                    )
                pending.pop(0)
            return True

        def peers() -> list[Peer]:
            if between is not None:
                between()
            return [self._peer(r, gen) for r in pending]

        try:
            wait_until(
                step,
                what=f"at barrier {self.name} generation {gen} with key {key}",
                timeout_s=timeout_s,
                peers=peers,
            )
        finally:
            _native.store_u64(buf, off + layout.BAR_WAIT_SINCE, 0)
            self.pending = []
        return gen

    def close(self) -> None:
        self.seg.close()
