"""WakeSet (mpkv.shm.waiting): a snapshot taken before a change never misses it, and a ring's sleeping flag
(its eventcount) is raised only while the sleep lasts.

The writers are spawned processes. A sleep's timeout here (30 s) only catches a hang: whether the sleep ended
because of the change is read from what ``sleep`` returns and from the words themselves, never from a clock.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
from helpers import Child
from procs import Phase, report

from mpkv import _native, layout
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry
from mpkv.shm.ring import RingReader, RingWriter, create_ring
from mpkv.shm.signals import SignalArray, create_signals
from mpkv.shm.waiting import CHANGED, MAX_WORDS, TIMED_OUT, Peer, WakeSet, wait_until

HANG_S = 30.0  # only a hang reaches this


@pytest.fixture
def registry(instance: str) -> Iterator[Registry]:
    reg = Registry.create(instance)
    yield reg
    reg.destroy()


# -- children ------------------------------------------------------------------------------------------------------
def write_slot(signals: str, slot: int, conn: Connection) -> None:
    def body() -> int:
        arr = SignalArray(signals, Phase)
        try:
            w = arr.writer(slot)
            w.write(Phase.READY, 1)
            w.release()
            return arr.read(slot).seq
        finally:
            arr.close()

    report(conn, body)


def put(ring: str, message: bytes, conn: Connection) -> None:
    def body() -> None:
        with RingWriter(ring) as w:
            w.put(message, timeout_s=HANG_S)

    report(conn, body)


def put_once_reader_sleeps(ring: str, reader: int, message: bytes, conn: Connection) -> None:
    """Wait (bounded) until reader ``reader`` has raised its sleeping flag, then put ``message``: the put must
    wake it, which the writer does only for a reader whose flag it sees."""

    def body() -> None:
        with RingWriter(ring) as w:
            flag = layout.ring_reader_meta(layout.SEGMENT_HEADER_BYTES, reader) + layout.META_SLEEPING
            parent = ProcId.of(os.getppid())

            def step(slice_s: float, spin_s: float) -> bool:
                if _native.load_u32(w.seg.buf, flag):
                    return True
                # The flag is a plain store (nobody wakes a futex on it): poll it, paced by a short futex sleep
                # on a private word nobody changes. The deadline, not this pace, bounds the wait.
                _native.wait_any([(bytearray(8), 0, 0)], min(slice_s, 0.001))
                return False

            wait_until(
                step,
                what=f"for reader {reader} to raise its sleeping flag",
                timeout_s=HANG_S,
                peers=lambda: [Peer("the sleeping reader (the test)", parent)],
            )
            w.put(message, timeout_s=HANG_S)

    report(conn, body)


# -- tests ---------------------------------------------------------------------------------------------------------
def test_a_write_between_snapshot_and_sleep_ends_the_sleep(registry: Registry) -> None:
    """The snapshot, not the value at sleep time, is what the sleep compares with: slot 1 written by another
    process after the snapshot (the child has exited before we sleep) makes the sleep return CHANGED at once."""
    seg = create_signals(registry, "signals", 2)
    arr = SignalArray(seg.name, Phase)
    try:
        wake = WakeSet()
        wake.add(arr.word(0))
        assert wake.add(arr.word(1)) == 1
        before = wake.snapshot()
        seq = Child(write_slot, seg.name, 1).result(timeout_s=60)
        assert seq == 2 and arr.word(1).load() != before[1], "the child's write did not change slot 1's word"
        rc = wake.sleep(HANG_S)
        assert rc == CHANGED, f"a write made after the snapshot did not end the sleep at once (returned {rc})"
        assert wake.sleep(HANG_S, among=[1]) == CHANGED, "the snapshot must stay what sleep compares with"
    finally:
        arr.close()
        registry.release(seg)


def test_a_message_already_in_the_ring_ends_the_sleep_and_lowers_the_flag(registry: Registry) -> None:
    """A put that came before the snapshot but is not read yet: the word equals the snapshot, so only the
    eventcount's re-check after raising the flag sees it. The sleep returns CHANGED, flag lowered."""
    seg = create_ring(registry, "ring", 1 << 12)
    with RingReader(seg.name) as r:
        Child(put, seg.name, b"early").result(timeout_s=60)
        wake = WakeSet()
        wake.add(r.wake_word())
        wake.snapshot()
        rc = wake.sleep(HANG_S)
        assert rc == CHANGED, f"a message waiting in the ring did not end the sleep at once (returned {rc})"
        assert not r.sleeping, "the reader's sleeping flag was left raised after a sleep it did not need"
        assert r.try_get() == b"early"
    registry.release(seg)


def test_a_put_while_asleep_wakes_the_reader_and_the_flag_is_lowered(registry: Registry) -> None:
    """The writer wakes a reader only when it sees its sleeping flag: the child puts once the flag is up, and
    the sleep returns for the ring's word (or CHANGED when the put beat the futex call), then lowers the flag."""
    seg = create_ring(registry, "ring", 1 << 12)
    sigs = create_signals(registry, "signals", 1)
    arr = SignalArray(sigs.name, Phase)
    with RingReader(seg.name) as r:
        child = Child(put_once_reader_sleeps, seg.name, r.index, b"wake")
        wake = WakeSet()
        wake.add(arr.word(0))  # not slept on: the index sleep reports is the WakeSet's, not the sleep's own list's
        ring = wake.add(r.wake_word())
        wake.snapshot()
        rc = wake.sleep(HANG_S, among=[ring])
        child.result(timeout_s=60)
        assert rc in (ring, CHANGED), f"the put did not wake the sleeping reader (sleep returned {rc})"
        assert not r.sleeping, "the reader's sleeping flag was left raised after the sleep"
        assert r.try_get() == b"wake"
        wake.snapshot()  # nothing more will come: this sleep can only time out, and lowers the flag all the same
        assert wake.sleep(0.01, among=[ring]) in (TIMED_OUT, ring)
        assert not r.sleeping, "the reader's sleeping flag was left raised after a sleep that timed out"
    arr.close()
    registry.release(sigs)
    registry.release(seg)


def test_bad_use_is_refused_and_changes_nothing(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 1)
    arr = SignalArray(seg.name, Phase)
    try:
        wake = WakeSet()
        wake.add(arr.word(0))
        with pytest.raises(RuntimeError, match=r"needs a snapshot of every word first"):
            wake.sleep(HANG_S)
        wake.snapshot()
        wake.add(arr.word(0))  # adding a word after a snapshot drops it: it did not cover the new word
        with pytest.raises(RuntimeError, match=r"needs a snapshot"):
            wake.sleep(HANG_S)
        with pytest.raises(ValueError, match=r"no word to sleep on"):
            wake.snapshot()
            wake.sleep(HANG_S, among=[])
        for _ in range(MAX_WORDS - len(wake)):
            wake.add(arr.word(0))
        with pytest.raises(ValueError, match=rf"at most {MAX_WORDS} words"):
            wake.add(arr.word(0))
        assert len(wake) == MAX_WORDS
        with pytest.raises(IndexError, match=r"has 1 slots; there is no slot 1"):
            arr.word(1)
    finally:
        arr.close()
        registry.release(seg)
