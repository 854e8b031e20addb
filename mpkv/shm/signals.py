"""Signal arrays: typed, epoch-tagged, single-writer slots (NOTE [ signal slot ] in mpkv.layout).

A slot holds ``value`` (an IntEnum of the array's type), ``epoch``, the writer's identity, a timestamp and
one auxiliary word. Records are written and read whole through a seqlock, so a reader never sees the value
of one write with the epoch of another. A slot knows its one writer: the first ``SignalWriter`` of a slot
records its pid; another live process trying to write the same slot gets a ``ProtocolError``.

Waits are on monotone predicates ("value >= READY at epoch >= 7"), never on "value == 0", and like every
wait in mpkv they are bounded, check the writer's liveness, and name it on failure (DESIGN I2).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mpkv import _native, layout
from mpkv.errors import AttachError, PeerDied, ProtocolError
from mpkv.layout import SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S, Peer, wait_until

E = TypeVar("E", bound=enum.IntEnum)
_BASE = layout.SEGMENT_HEADER_BYTES
_COUNT = 8  # payload word 0: number of slots; slots start at the next line
_SLOTS = _BASE + layout.LINE_BYTES


@dataclass(frozen=True)
class Signal(Generic[E]):
    value: E
    epoch: int
    writer: ProcId
    timestamp_ns: int  # time.monotonic_ns() of the write (CLOCK_MONOTONIC is shared by all processes)
    aux: int
    seq: int  # number of writes * 2; 0 = never written

    def at_least(self, value: E, epoch: int) -> bool:
        """The monotone predicate every wait should use: this epoch reached at least ``value``."""
        return self.epoch > epoch or (self.epoch == epoch and self.value >= value)


def create_signals(registry: Registry, obj: str, nslots: int) -> Segment:
    if not 1 <= nslots <= 4096:
        raise ValueError(f"a signal array has 1 to 4096 slots, got {nslots}")
    seg = registry.create_segment(obj, SegmentKind.SIGNALS, layout.LINE_BYTES * (1 + nslots))
    _native.store_u64(seg.buf, _BASE, nslots)
    seg.mark_ready()
    return seg


class SignalArray(Generic[E]):
    """A view of a signal array; ``values`` is the IntEnum its slots hold."""

    def __init__(self, name: str, values: type[E], *, labels: Callable[[int], str] | None = None) -> None:
        if 0 not in values._value2member_map_:
            raise ValueError(f"{values.__name__} needs a member with value 0: a slot never written holds 0")
        self.name = name
        self.values = values
        self.seg = Segment.attach(name, SegmentKind.SIGNALS)
        self.nslots = int(_native.load_u64(self.seg.buf, _BASE))
        self._labels = labels or (lambda i: f"slot {i}")

    def _off(self, slot: int) -> int:
        if not 0 <= slot < self.nslots:
            raise IndexError(f"signal array {self.name} has {self.nslots} slots; there is no slot {slot}")
        return _SLOTS + slot * layout.SIGNAL_SLOT_BYTES

    def read(self, slot: int) -> Signal[E]:
        try:
            seq, value, epoch, pid, start, ts, aux = _native.seq_read(
                self.seg.buf, self._off(slot), layout.SIGNAL_WORDS
            )
        except TimeoutError as e:
            raise PeerDied(f"{self._labels(slot)} of {self.name}: {e}") from None
        signed = value - (1 << 64) if value >= 1 << 63 else value
        try:
            typed = self.values(signed)
        except ValueError:
            raise ProtocolError(
                f"{self._labels(slot)} of {self.name} holds {signed}, not a {self.values.__name__} "
                f"(written by pid {pid})"
            ) from None
        return Signal(typed, epoch, ProcId(pid, start), ts, aux, seq)

    def writer(self, slot: int) -> SignalWriter[E]:
        return SignalWriter(self, slot)

    def wait(
        self,
        slot: int,
        predicate: Callable[[Signal[E]], bool],
        *,
        what: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        writer: ProcId | None = None,
    ) -> Signal[E]:
        """Block until ``predicate(read(slot))``. ``writer`` names the expected writer for liveness checks
        before the slot was ever written; afterwards the slot's recorded writer is checked."""
        off = self._off(slot)
        result: list[Signal[E]] = []

        def step(slice_s: float, spin_s: float) -> bool:
            sig = self.read(slot)
            if predicate(sig):
                result.append(sig)
                return True
            _native.wait_word_change(self.seg.buf, off, sig.seq, -1, spin_s, slice_s)
            return False

        def peers() -> list[Peer]:
            sig = self.read(slot)
            who = sig.writer if sig.writer.pid else writer
            state = f"holds {sig.value.name} at epoch {sig.epoch}" if sig.seq else "never written"
            return [Peer(f"writer of {self._labels(slot)} of {self.name}", who, lambda: state)]

        wait_until(step, what=f"waiting for {what}", timeout_s=timeout_s, peers=peers)
        return result[0]

    def close(self) -> None:
        self.seg.close()


class SignalWriter(Generic[E]):
    """The one writer of one slot."""

    def __init__(self, array: SignalArray[E], slot: int) -> None:
        self.array = array
        self.slot = slot
        self._off = array._off(slot)
        self._me = ProcId.me()
        # Claim the slot by compare-and-swap of our pid into its claim word: of two processes claiming at once,
        # one wins. A claim held by a live process is refused; one left by a dead process is taken over.
        claim = self._off + layout.SIGNAL_CLAIM
        while True:
            held = _native.load_u64(array.seg.buf, claim)
            if held == self._me.pid:
                break
            holder = array.read(slot).writer if held else ProcId(0, 0)
            if held and (holder.pid != held or holder.alive()) and ProcId.of(int(held)).alive():
                raise AttachError(
                    f"{array._labels(slot)} of {array.name} is written by {ProcId.of(int(held)).describe()}; "
                    f"pid {self._me.pid} may not write it too"
                )
            if _native.cas_u64(array.seg.buf, claim, held, self._me.pid)[0]:
                break

    def write(self, value: E, epoch: int, aux: int = 0) -> None:
        if not isinstance(value, self.array.values):
            raise ProtocolError(f"{value!r} is not a {self.array.values.__name__}")
        words = (
            int(value) & (2**64 - 1),
            epoch,
            self._me.pid,
            self._me.start_ticks,
            time.monotonic_ns(),
            aux,
        )
        _native.seq_write(self.array.seg.buf, self._off, words)
        _native.futex_wake(self.array.seg.buf, self._off)
