"""Signal arrays: typed, epoch-tagged, single-writer slots (NOTE [ signal slot ] in mpkv.layout).

A slot holds ``value`` (an IntEnum of the array's type), ``epoch``, the writer's identity, a timestamp and
one auxiliary word. Records are written and read whole through a seqlock, so a reader never sees the value
of one write with the epoch of another. A slot knows its one writer: the first ``SignalWriter`` of a slot
records its pid and start time in the claim word; another live process trying to write the same slot gets an
``AttachError`` until the holder ``release``s it or dies. A slot whose writer died mid-write is reported by
name to its readers and repaired by its next writer (NOTE [ torn signal slot ] in mpkv.layout).

Waits are on monotone predicates ("value >= READY at epoch >= 7"), never on "value == 0", and like every
wait in mpkv they are bounded, check the writer's liveness, and name it on failure (invariant I2).
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mpkv import _native, layout
from mpkv.errors import (
    AttachError,
    PeerDied,
    ProtocolError,
    TornSlot,
)
from mpkv.layout import SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S, Peer, Word, wait_until

E = TypeVar("E", bound=enum.IntEnum)
_BASE = layout.SEGMENT_HEADER_BYTES
_COUNT = 8  # payload word 0: number of slots; slots start at the next line
_SLOTS = _BASE + layout.LINE_BYTES
# A write takes well under a microsecond: a slot odd for TORN_POLL_S has a writer that died, stalled or stopped
# there; we then look at the writer (dead: report at once) and give up on a live one after TORN_LIMIT_S.
TORN_POLL_S = 0.005
TORN_LIMIT_S = 1.0


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

    def label(self, slot: int) -> str:
        """What a person calls the slot ('status of worker r1'), for messages."""
        return self._labels(slot)

    def word(self, slot: int) -> Word:
        """The slot's futex word (its sequence word): every write wakes whoever sleeps on it (``WakeSet``)."""
        return Word(self.seg.buf, self._off(slot))

    def read(self, slot: int) -> Signal[E]:
        seq, value, epoch, pid, start, ts, aux = self._read_words(slot)
        signed = value - (1 << 64) if value >= 1 << 63 else value
        try:
            typed = self.values(signed)
        except ValueError:
            raise ProtocolError(
                f"{self._labels(slot)} of {self.name} holds {signed}, not a {self.values.__name__} "
                f"(written by pid {pid})"
            ) from None
        return Signal(typed, epoch, ProcId(pid, start), ts, aux, seq)

    def raw(self, slot: int) -> tuple[int, ...]:
        """The words of one write: (seq, value, epoch, pid, start ticks, timestamp ns, aux), unchecked and untyped,
        for a hot loop that builds a typed record only when they changed; TornSlot as ``read``."""
        return self._read_words(slot)

    def read_or_dead(self, slot: int) -> Signal[E]:
        """``read``, except that a slot torn by a writer that died mid-write reads as a record of that dead writer
        (the zero member at the epoch found there): for readers that report, rather than act on, the slot."""
        try:
            return self.read(slot)
        except TornSlot:
            epoch = _native.load_u64(self.seg.buf, self._off(slot) + layout.SIGNAL_EPOCH)
            return Signal(self.values(0), epoch, self.claimant(slot), 0, 0, 1)

    def _read_words(self, slot: int) -> tuple[int, ...]:
        """The slot's words of one write. A slot left mid-write (NOTE [ torn signal slot ] in mpkv.layout) is
        reported, naming its writer: at once when the writer is dead, after TORN_LIMIT_S when it lives on."""
        off, since = self._off(slot), time.monotonic()
        while True:
            try:
                return _native.seq_read(self.seg.buf, off, layout.SIGNAL_WORDS, TORN_POLL_S)
            except TimeoutError:
                pass
            who = self.claimant(slot)
            seq = _native.load_u64(self.seg.buf, off)
            where = f"{self._labels(slot)} of {self.name}"
            if not who.alive():
                raise TornSlot(
                    f"{where} was left mid-write (sequence {seq}) by its writer {who.describe()}: it died between "
                    f"its two sequence stores. The slot is repaired when a new writer takes it over "
                    f"(SignalWriter); until then it has no valid record"
                ) from None
            if time.monotonic() - since >= TORN_LIMIT_S:
                raise PeerDied(
                    f"{where} stuck mid-write for {TORN_LIMIT_S:g} s (sequence {seq}): its writer "
                    f"{who.describe()} died or was stopped while writing it"
                ) from None

    def claimant(self, slot: int) -> ProcId:
        """Who holds the slot's claim (its one writer), or, when nobody does, the writer its record names."""
        off = self._off(slot)
        who = claimant_of(_native.load_u64(self.seg.buf, off + layout.SIGNAL_CLAIM))
        if who is not None:
            return who
        buf = self.seg.buf
        return ProcId(
            _native.load_u64(buf, off + layout.SIGNAL_WRITER_PID),
            _native.load_u64(buf, off + layout.SIGNAL_WRITER_START),
        )

    def writer(self, slot: int, repair: Callable[[int, int], tuple[E, int, int]] | None = None) -> SignalWriter[E]:
        return SignalWriter(self, slot, repair)

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
    """The one writer of one slot (NOTE [ signal slot ] in mpkv.layout)."""

    def __init__(
        self, array: SignalArray[E], slot: int, repair: Callable[[int, int], tuple[E, int, int]] | None = None
    ) -> None:
        """``repair(epoch, aux)`` -> (value, epoch, aux): the record a slot torn by a dead writer gets (by default
        the zero member at the epoch and aux found there). A slot whose zero member means something to act on
        picks a safer one (the command word: PAUSE at a new epoch, never NONE, which reads as "run")."""
        self.array = array
        self.slot = slot
        self._off = array._off(slot)
        self._me = ProcId.me()
        self._claim_word = claim_word(self._me)
        self._released = False
        self._claim()
        _HOLDERS[(array.name, slot)] = _HOLDERS.get((array.name, slot), 0) + 1
        try:
            self._repair(repair)
        except BaseException:
            self.release()
            raise

    def _claim(self) -> None:
        # Compare-and-swap our pid and start time into the claim word: of two processes claiming at once, one
        # wins. A claim held by a live process is refused; one left by a dead process is taken over. The word
        # names its holder whole (one store), so there is no moment where a claimer is judged by another's start
        # time; the slot's record is not read, so a torn record does not stand in the way of its repair.
        buf, claim = self.array.seg.buf, self._off + layout.SIGNAL_CLAIM
        while True:
            held = _native.load_u64(buf, claim)
            if held == self._claim_word:
                return
            holder = claimant_of(held)
            if holder is not None and holder.pid != self._me.pid and holder.alive():
                raise AttachError(
                    f"{self.array.label(self.slot)} of {self.array.name} is written by {holder.describe()}; "
                    f"pid {self._me.pid} may not write it too (it may once that process gave the slot up or died)"
                )
            if _native.cas_u64(buf, claim, held, self._claim_word)[0]:
                return

    def _repair(self, repair: Callable[[int, int], tuple[E, int, int]] | None) -> None:
        """A slot left odd by a writer that died mid-write gets a whole record of ours, and readers are woken
        (NOTE [ torn signal slot ])."""
        buf = self.array.seg.buf
        if not _native.load_u64(buf, self._off) & 1:
            return
        epoch = _native.load_u64(buf, self._off + layout.SIGNAL_EPOCH)
        aux = _native.load_u64(buf, self._off + layout.SIGNAL_AUX)
        if repair is None:
            self._publish(0, epoch, aux)
        else:
            value, epoch, aux = repair(epoch, aux)
            self._publish(int(value), epoch, aux)

    def write(self, value: E, epoch: int, aux: int = 0, *, wake: bool = True) -> None:
        """Publish one record; ``wake=False`` skips the futex wake (a syscall) for slots nobody sleeps on."""
        if not isinstance(value, self.array.values):
            raise ProtocolError(f"{value!r} is not a {self.array.values.__name__}")
        self._publish(int(value), epoch, aux, wake)

    def _publish(self, value: int, epoch: int, aux: int, wake: bool = True) -> None:
        words = (value & (2**64 - 1), epoch, self._me.pid, self._me.start_ticks, time.monotonic_ns(), aux)
        _native.seq_write(self.array.seg.buf, self._off, words)
        if wake:
            _native.futex_wake(self.array.seg.buf, self._off)

    def release(self) -> None:
        """Give the slot up, so that another process may become its writer, once no other writer of this process
        holds it (two Controllers in one process share the claim). Idempotent; a no-op when we do not hold it
        (never did, gave it up already, or it was taken over after a fork)."""
        if self._released or os.getpid() != self._me.pid:  # a forked child never held the parent's claim
            return
        self._released = True
        key = (self.array.name, self.slot)
        _HOLDERS[key] -= 1
        if _HOLDERS[key] == 0:
            del _HOLDERS[key]
            _native.cas_u64(self.array.seg.buf, self._off + layout.SIGNAL_CLAIM, self._claim_word, 0)


# How many live SignalWriters of this process hold each (array, slot): the claim word is per process.
_HOLDERS: dict[tuple[str, int], int] = {}


_U32 = 0xFFFFFFFF


def claim_word(proc: ProcId) -> int:
    """The claim word of ``proc``: pid in the low half, start time (clock ticks) modulo 2**32 in the high half."""
    return proc.pid | (proc.start_ticks & _U32) << 32


def claimant_of(word: int) -> ProcId | None:
    """The process a claim word names (None when 0). A word with no start time in its high half (a bare pid, as
    docs/control-block.md lets a driver in another language write) is judged by pid alone: whoever has that pid
    now is taken for it, so such a claim is never taken over from a live process."""
    pid, start = word & _U32, word >> 32
    if not pid:
        return None
    now = ProcId.of(pid)
    if start == 0 or (now.start_ticks & _U32) == start:
        return now  # alive unless there is no such process (or a zombie)
    return ProcId(pid, start)  # that pid is gone or names another process now: dead (never alive() again)
