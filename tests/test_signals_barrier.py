"""Signal arrays (seqlock records, single writer, bounded waits) and the checked barrier."""

from __future__ import annotations

import random

import procs
import pytest
from helpers import Child
from procs import Phase

from mpkv.errors import AttachError, PeerDied, WaitTimeout
from mpkv.shm.barrier import Barrier, BarrierKey, create_barrier
from mpkv.shm.registry import Registry
from mpkv.shm.signals import SignalArray, create_signals


@pytest.fixture
def registry(instance: str):
    reg = Registry.create(instance)
    yield reg
    reg.destroy()


def test_signal_records_are_read_whole_while_written(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 2)
    steps = 3000
    writer = Child(procs.signal_writer, seg.name, 1, steps)
    arr = SignalArray(seg.name, Phase)
    reads = 0
    try:
        last = arr.wait(1, lambda s: s.epoch >= 1, what="the first write", timeout_s=30)
        while not (last.epoch == steps and last.value == Phase.READY):
            sig = arr.read(1)
            # value, epoch and aux come from one write: aux = epoch * 1000 + value
            assert sig.aux == sig.epoch * 1000 + int(sig.value), sig
            assert (sig.epoch, sig.value) >= (last.epoch, last.value), "a signal went backwards"
            last, reads = sig, reads + 1
        assert last.writer.pid == writer.pid
    finally:
        arr.close()
    assert writer.result() == steps
    assert reads > 0
    registry.release(seg)


def test_signal_wait_is_monotone_and_names_the_writer(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 4)
    arr = SignalArray(seg.name, Phase, labels=lambda i: f"status of worker r{i}")
    w = arr.writer(2)
    w.write(Phase.CLEARED, epoch=7)
    got = arr.wait(2, lambda s: s.at_least(Phase.CLEARING, 7), what="worker r2 CLEARING at epoch 7", timeout_s=1)
    assert got.value == Phase.CLEARED and got.epoch == 7
    with pytest.raises(
        WaitTimeout,
        match=r"worker r2 READY at epoch 8.*writer of status of worker r2.*"
        r"holds CLEARED at epoch 7",
    ):
        arr.wait(2, lambda s: s.at_least(Phase.READY, 8), what="worker r2 READY at epoch 8", timeout_s=0.3)
    with pytest.raises(IndexError, match="has 4 slots; there is no slot 4"):
        arr.read(4)
    arr.close()
    registry.release(seg)


def test_signal_slot_has_one_writer(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 2)
    writer = Child(procs.signal_writer, seg.name, 0, 1)
    writer.result()
    arr = SignalArray(seg.name, Phase)
    # The child is gone: its slot may be taken over; while it lived it could not be.
    arr.writer(0).write(Phase.IDLE, epoch=9)
    assert arr.read(0).epoch == 9
    arr.close()
    registry.release(seg)


def test_signal_slot_refuses_a_second_live_writer(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 2)
    arr = SignalArray(seg.name, Phase)
    arr.writer(0).write(Phase.READY, 1)
    kind, text = Child(procs.signal_writer, seg.name, 0, 1).error()
    assert kind == "AttachError" and "slot 0 of" in text and "may not write it too" in text
    assert arr.read(0).value == Phase.READY  # the refused writer changed nothing
    arr.close()
    registry.release(seg)


def test_barrier_many_generations(registry: Registry) -> None:
    seg = create_barrier(registry, "barrier", 3)
    keys = [(i, f"req-{i}") for i in range(1, 301)]
    kids = [Child(procs.barrier_member, seg.name, r, keys, 30.0) for r in range(3)]
    results = [k.result() for k in kids]
    assert results == [list(range(1, 301))] * 3
    registry.release(seg)


def test_barrier_key_mismatch_names_ranks_and_keys(registry: Registry) -> None:
    seg = create_barrier(registry, "barrier", 3)
    good = [(1, "batch-a"), (2, "batch-b")]
    bad = [(1, "batch-a"), (2, "batch-x")]
    kids = [Child(procs.barrier_member, seg.name, r, k, 60.0) for r, k in enumerate([good, good, bad])]
    errors = [k.error() for k in kids]
    for kind, text in errors:  # a ProtocolError, not a WaitTimeout: the mismatch is reported, not the deadline
        assert kind == "ProtocolError"
        assert "generation 2" in text and "seq=2, tag='batch-x'" in text and "seq=2, tag='batch-b'" in text
    assert "rank 2" in errors[0][1] and "rank 2 arrived with key (seq=2, tag='batch-x') but rank 0" in errors[2][1]
    registry.release(seg)


def test_barrier_late_rank_is_named_at_the_deadline(registry: Registry) -> None:
    seg = create_barrier(registry, "barrier", 3)
    b0 = Barrier(seg.name, 0)
    with pytest.raises(
        WaitTimeout,
        match=r"timed out after 0.3 s at barrier .* generation 1.*rank 1 of barrier .*"
        r"never attached.*rank 2 of barrier",
    ):
        b0.wait(BarrierKey(1, "x"), timeout_s=0.3)
    b0.close()
    with pytest.raises(AttachError, match="there is no rank 3"):
        Barrier(seg.name, 3)
    with pytest.raises(ValueError, match="longer than 24 bytes"):
        BarrierKey(1, "t" * 30)
    registry.release(seg)


def test_barrier_dead_rank_is_named(registry: Registry, rng: random.Random) -> None:
    seg = create_barrier(registry, "barrier", 3)
    doomed = Child(procs.barrier_forever, seg.name, 2)
    survivor = Child(procs.barrier_forever, seg.name, 1)
    assert doomed.recv(30) == "started" and survivor.recv(30) == "started"
    b0 = Barrier(seg.name, 0)
    steps = rng.randrange(1, 200)
    for seq in range(1, steps + 1):
        b0.wait(BarrierKey(seq, "step"), timeout_s=30)
    doomed.kill()
    # PeerDied, not WaitTimeout after 60 s: the death is noticed, not the deadline reached.
    with pytest.raises(PeerDied, match=rf"rank 2 of barrier .* is dead.*pid {doomed.pid}"):
        # The doomed rank may have arrived at one more generation before it died, never at two.
        for seq in (steps + 1, steps + 2):
            b0.wait(BarrierKey(seq, "step"), timeout_s=60)
    kind, text = survivor.error()
    assert kind == "PeerDied" and f"pid {doomed.pid}" in text
    b0.close()
    registry.release(seg)


def test_a_record_left_mid_write_is_reported_not_spun_on(registry: Registry) -> None:
    """A writer killed between its two sequence stores leaves the record odd: readers give up after a second
    and name the writer, instead of spinning forever with the GIL held."""
    from mpkv import _native

    seg = create_signals(registry, "signals", 1)
    arr = SignalArray(seg.name, Phase)
    arr.writer(0).write(Phase.READY, 3)
    off = arr.word(0).off
    _native.store_u64(arr.seg.buf, off, _native.load_u64(arr.seg.buf, off) + 1)  # as if killed mid-write
    with pytest.raises(PeerDied, match=r"slot 0 of .* stuck mid-write for 1 s .* died or was stopped"):
        arr.read(0)  # returns (raises) at all: a reader that spun forever would hang the test until its timeout
    arr.close()
    registry.release(seg)


def test_a_wait_knows_which_ranks_have_not_arrived(registry: Registry) -> None:
    """``pending`` (what a waiter's ``between`` reads to publish whom it waits for) holds the ranks not arrived
    yet, not every other rank: rank 1 arrives, rank 2 never does; then it is empty again."""
    seg = create_barrier(registry, "barrier", 3)
    arriving = Child(procs.barrier_forever, seg.name, 1)
    assert arriving.recv(30) == "started"
    b0 = Barrier(seg.name, 0)
    seen: list[list[int]] = []
    with pytest.raises(WaitTimeout, match="rank 2 of barrier"):
        b0.wait(BarrierKey(1, "step"), timeout_s=2.0, between=lambda: seen.append(list(b0.pending)))
    assert seen and seen[-1] == [2], seen  # rank 1 arrived at once: only rank 2 is waited for at the end
    assert b0.pending == []
    arriving.kill()
    b0.close()
    registry.release(seg)
