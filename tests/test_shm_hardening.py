"""Hardening of the shared-memory core: wait_any when futex_waitv is refused, torn seqlock slots and their
repair, endpoint claims that two processes cannot both win, handle records read whole."""

from __future__ import annotations

import errno
import os
import signal
import time

import msgspec
import procs
import pytest
import shm_children
from helpers import Child
from procs import Phase

from mpkv import layout
from mpkv.errors import AttachError, MpkvError, PeerDied
from mpkv.instance import HANDLE_RECORD_BYTES
from mpkv.layout import SegmentKind
from mpkv.pool import PoolHandle
from mpkv.shm.proc import ProcId
from mpkv.shm.records import read_sync_record, write_sync_record
from mpkv.shm.registry import Registry
from mpkv.shm.ring import RingWriter, create_ring, quiesce
from mpkv.shm.segment import Segment
from mpkv.shm.signals import SignalArray, create_signals


@pytest.fixture
def registry(instance: str):
    reg = Registry.create(instance)
    yield reg
    reg.destroy()


def _result_or_skip(child: Child) -> dict[str, object]:
    out: dict[str, object] = child.result(timeout_s=60)
    if "skip" in out:
        pytest.skip(f"cannot refuse futex_waitv with seccomp here: {out['skip']}")
    return out


# -- 7: futex_waitv refused (NOTE [ futex_waitv refused ] in mpkv/shm/_native.c) -----------------------------


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.ENOSYS, errno.EINVAL], ids=["EPERM", "ENOSYS", "EINVAL"])
def test_wait_any_sleeps_when_futex_waitv_is_refused(refusal: int) -> None:
    """A seccomp filter refuses futex_waitv; a 1 s wait on a word nobody changes must sleep, not spin: a small
    fraction of a second of CPU for that second (a spinning loop burns all of it). The margin is wide on purpose:
    this is 'it slept', not a speed measurement."""
    out = _result_or_skip(Child(shm_children.wait_any_refused, refusal, 1.0))
    assert out["refused"] == refusal, out  # the process switched to the fallback, for the reason given
    assert out["wall_s"] >= 1.0, out
    # Asleep, one call lasts the whole second (a signal could cut it short); spinning, it returns at once, again
    # and again: hundreds of thousands of calls, and as much CPU as the machine gives the child.
    assert out["calls"] <= 5, f"wait_any returned at once instead of sleeping under a refused futex_waitv: {out}"
    assert out["cpu_s"] < 0.3, f"wait_any spun instead of sleeping under a refused futex_waitv: {out}"


def test_wait_any_fallback_sees_a_word_other_than_the_first(registry: Registry) -> None:
    """The fallback sleeps on the first word's futex but still returns when another word changes."""
    seg = create_signals(registry, "signals", 2)
    child = Child(shm_children.wait_any_fallback_wakes, errno.EPERM, seg.name)
    arr = SignalArray(seg.name, Phase)
    try:
        first = child.recv(60)
        if first != "ready":  # the child could not install its filter and reported that instead
            child.join(60)
            assert first[0] == "ok" and "skip" in first[1], first
            pytest.skip(f"cannot refuse futex_waitv with seccomp here: {first[1]['skip']}")
        arr.writer(1).write(Phase.READY, 1)
        out = child.result(timeout_s=60)
    finally:
        arr.close()
    assert out["refused"] == errno.EPERM, out
    assert out["rc"] in (1, -2), f"wait_any did not report the change of word 1 (1, or -2 before the call): {out}"
    registry.release(seg)


# -- 5: a torn signal slot (NOTE [ torn signal slot ] in mpkv/layout.py) and SignalWriter.release -------------


def test_torn_slot_names_its_dead_writer_and_a_new_writer_repairs_it(registry: Registry) -> None:
    seg = create_signals(registry, "signals", 2)
    arr = SignalArray(seg.name, Phase, labels=lambda i: f"status of worker r{i}")
    dying = Child(shm_children.die_mid_write, seg.name, 1)
    try:
        assert dying.recv(60) == "dying"
        dying.proc.join(60)
        assert dying.proc.exitcode == -signal.SIGKILL
        # Readers: a PeerDied naming the dead writer, from the dead-writer path (not the 1 s stuck-writer one).
        for _ in range(3):
            with pytest.raises(PeerDied) as err:
                arr.read(1)
            text = str(err.value)
            assert f"status of worker r1 of {seg.name} was left mid-write" in text, text
            assert f"pid {dying.pid} (dead)" in text and "died between its two sequence stores" in text, text
            assert "stuck" not in text, text
        # A new writer takes the slot over although its record is torn, and repairs it before anything else:
        # a whole record of its own, claiming nothing (the zero member) at the epoch word found there.
        w = arr.writer(1)
        sig = arr.read(1)
        assert sig.seq % 2 == 0 and sig.writer == ProcId.me(), sig
        assert (sig.value, sig.epoch, sig.aux) == (Phase.IDLE, 3, 7), sig
        w.write(Phase.READY, 4)
        sig = arr.read(1)
        assert (sig.value, sig.epoch) == (Phase.READY, 4) and sig.seq == 6, (
            sig
        )  # write (2), torn (3), repaired (4), this (6)
        assert arr.read(0).seq == 0  # the neighbour slot was never touched
    finally:
        dying.join(10)
        arr.close()
    registry.release(seg)


def test_signal_writer_release_lets_another_process_write(registry: Registry) -> None:
    from mpkv import _native

    seg = create_signals(registry, "signals", 1)
    arr = SignalArray(seg.name, Phase)
    claim = arr.word(0).off + layout.SIGNAL_CLAIM
    try:
        w = arr.writer(0)
        w.write(Phase.READY, 1)
        me = ProcId.me()
        assert _native.load_u64(arr.seg.buf, claim) == me.pid | (me.start_ticks & 0xFFFFFFFF) << 32
        kind, text = Child(procs.signal_writer, seg.name, 0, 1).error()
        assert kind == "AttachError" and f"pid {me.pid} (alive" in text, text
        w.release()
        assert _native.load_u64(arr.seg.buf, claim) == 0
        w.release()  # idempotent
        assert _native.load_u64(arr.seg.buf, claim) == 0
        other = Child(procs.signal_writer, seg.name, 0, 2)
        assert other.result() == 2
        assert arr.read(0).writer.pid == other.pid
        held = _native.load_u64(arr.seg.buf, claim)
        assert held & 0xFFFFFFFF == other.pid
        w.release()  # the slot is the (dead) child's claim now, not ours: nothing changes
        assert _native.load_u64(arr.seg.buf, claim) == held
        # A claim word holding a bare pid (what docs/control-block.md lets a driver write) is judged by pid
        # alone; one whose start half does not match the process of that pid names a dead process.
        init = ProcId.of(1)
        if init.alive():
            _native.store_u64(arr.seg.buf, claim, 1)
            with pytest.raises(AttachError, match=r"is written by pid 1 \(alive"):
                arr.writer(0)
            _native.store_u64(arr.seg.buf, claim, 1 | ((init.start_ticks + 1) & 0xFFFFFFFF) << 32)
            arr.writer(0).write(Phase.CLEARED, 3)
            assert arr.read(0).writer == ProcId.me()
    finally:
        arr.close()
    registry.release(seg)


# -- 6: at most one live holder of a ring endpoint (NOTE [ endpoint claim ] in mpkv/layout.py) -------------------


def _wait_stopped(pid: int) -> None:
    deadline = time.monotonic() + 60  # catches a hang only: the child stops itself as soon as it won the CAS
    while ProcId.of(pid).state() != "alive, stopped":
        assert time.monotonic() < deadline, f"pid {pid} never stopped after its claim: {ProcId.of(pid).state()}"
        time.sleep(0.01)


@pytest.mark.parametrize("endpoint", [-1, 0], ids=["writer", "reader0"])
def test_a_claimer_stopped_after_its_cas_keeps_the_endpoint(registry: Registry, endpoint: int) -> None:
    """The I1 race: the holder was SIGKILLed (ATTACHED and its start time stay behind); claimer A wins the
    compare-and-swap and stops before storing its start time; claimer B must see A alive and be refused."""
    seg = create_ring(registry, "ring", 1 << 12)
    holder = Child(shm_children.hold_endpoint_then_die, seg.name, endpoint)
    assert holder.recv(60) == "held"
    holder.proc.join(60)
    assert holder.proc.exitcode == -signal.SIGKILL
    a = Child(shm_children.claim_endpoint_stopping_after_cas, seg.name, endpoint)
    try:
        _wait_stopped(a.pid)
        with pytest.raises(AttachError, match=rf"already held by pid {a.pid} \(alive, stopped\)"):
            shm_children._endpoint(seg.name, endpoint)
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert a.result() == a.pid  # A finished its claim (nobody took the endpoint meanwhile) and let go of it
    shm_children._endpoint(seg.name, endpoint).close()  # free again: claimable
    holder.join(10)
    registry.release(seg)


# -- 3: handle records read whole (NOTE [ synchronised record ] in mpkv/shm/records.py) --------------------------


def _handles_blob(registry: Registry) -> Segment:
    seg = registry.create_segment("handles", SegmentKind.BLOB, HANDLE_RECORD_BYTES * 2)
    seg.mark_ready()
    return seg


def test_handle_records_are_read_whole_while_rewritten(registry: Registry) -> None:
    """A pool owner rewrites its handle (restores) while the decode allocator reads it: every read decodes to
    one write's handle (epoch, weight version, size and name all of handle i), never a mix."""
    seg = _handles_blob(registry)
    n = 20_000
    writer = Child(shm_children.rewrite_handles, seg.name, n)
    reads, seen = 0, set()
    try:
        while True:
            raw = read_sync_record(seg, 0, HANDLE_RECORD_BYTES)
            if raw:
                h = msgspec.msgpack.decode(raw, type=PoolHandle)
                assert (h.weight_version, h.nbytes, len(h.name)) == (h.epoch, h.epoch * 4096, h.epoch % 97), h
                reads += 1
                seen.add(h.epoch)
                if h.epoch == n:
                    break
            elif not writer.proc.is_alive():
                break
    finally:
        assert writer.result() == n
    assert reads > 0 and len(seen) > 1, f"{reads} reads saw {len(seen)} handles: the race was not exercised"
    registry.release(seg)


def test_a_handle_record_left_mid_write_names_its_dead_writer(registry: Registry) -> None:
    seg = _handles_blob(registry)
    dying = Child(shm_children.die_writing_handle, seg.name)
    try:
        assert dying.recv(60) == "dying"
        dying.proc.join(60)
        assert dying.proc.exitcode == -signal.SIGKILL
        with pytest.raises(PeerDied, match=rf"record 0 of {seg.name} was left mid-write .* pid {dying.pid} \(dead\)"):
            read_sync_record(seg, 0, HANDLE_RECORD_BYTES)
        assert read_sync_record(seg, 1, HANDLE_RECORD_BYTES) == b""  # the other record is untouched
        # The next writer (the restarted owner) completes the record with a whole handle of its own.
        write_sync_record(seg, 0, HANDLE_RECORD_BYTES, shm_children.handle_for(3))
        assert msgspec.msgpack.decode(read_sync_record(seg, 0, HANDLE_RECORD_BYTES), type=PoolHandle).epoch == 3
        with pytest.raises(MpkvError, match="does not fit"):
            write_sync_record(seg, 1, HANDLE_RECORD_BYTES, b"x" * HANDLE_RECORD_BYTES)
        assert read_sync_record(seg, 1, HANDLE_RECORD_BYTES) == b""  # refused: nothing written
    finally:
        dying.join(10)
    registry.release(seg)


def test_a_writer_killed_inside_the_gate_does_not_shut_it_for_good(registry: Registry) -> None:
    """NOTE [ submission gate ]: a client SIGKILLed between its check and its put leaves the gate shut. A closer
    must not wait on it: not while the dead writer holds the slot, nor once a new writer took the slot over (and
    idles), nor once that one closed."""
    seg = create_ring(registry, "ring", 1 << 12)
    dying = Child(shm_children.die_inside_the_gate, seg.name)
    assert dying.recv(60) == "inside"
    dying.proc.join(60)
    assert dying.proc.exitcode == -signal.SIGKILL
    assert quiesce(seg, what="the dead writer", timeout_s=30) == 0
    successor = RingWriter(seg.name, label="successor")  # takes the dead writer's slot over, and idles
    assert quiesce(seg, what="the idle successor", timeout_s=30) == 0
    successor.put(b"x")
    successor.close()
    assert quiesce(seg, what="nobody", timeout_s=30) > 0
    dying.join(10)
    registry.release(seg)
