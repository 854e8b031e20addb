"""Rings across processes: nothing lost, duplicated, reordered or corrupted; blocking both ways; bad input."""

from __future__ import annotations

import random

import numpy as np
import procs
import pytest
from helpers import Child

from mpkv.errors import AttachError, MessageTooLarge, PeerDied, WaitTimeout
from mpkv.shm.registry import Registry
from mpkv.shm.ring import RingReader, RingWriter, create_ring

N_MESSAGES = 200_000


@pytest.fixture
def registry(instance: str):
    reg = Registry.create(instance)
    yield reg
    reg.destroy()


def test_spsc_200k_random_sizes_and_stalls(registry: Registry, rng: random.Random) -> None:
    seed = rng.randrange(2**31)
    seg = create_ring(registry, "ring.spsc", 1 << 15)
    writer = Child(procs.stream_writer, seg.name, seed, N_MESSAGES, 1500)
    reader = Child(procs.stream_reader, seg.name, 0, seed, N_MESSAGES, 1500)
    reader_blocked = reader.result(timeout_s=300)
    writer_blocked = writer.result(timeout_s=60)
    # Both sides stalled at random; the other side must have gone through its blocking path many times.
    assert writer_blocked >= 20, f"writer blocked only {writer_blocked} times: the full-ring path was not exercised"
    assert reader_blocked >= 20, f"reader blocked only {reader_blocked} times: the empty-ring path was not exercised"
    registry.release(seg)


def test_broadcast_200k_three_readers(registry: Registry, rng: random.Random) -> None:
    seed = rng.randrange(2**31)
    seg = create_ring(registry, "ring.bcast", 1 << 15, nreaders=3)
    readers = [Child(procs.stream_reader, seg.name, i, seed, N_MESSAGES, 1500) for i in range(3)]
    writer = Child(procs.stream_writer, seg.name, seed, N_MESSAGES, 1500)
    blocked = [r.result(timeout_s=300) for r in readers]
    writer_blocked = writer.result(timeout_s=60)
    assert writer_blocked >= 20
    assert all(b >= 20 for b in blocked), blocked
    registry.release(seg)


def test_records_batched_across_processes(registry: Registry) -> None:
    seg = create_ring(registry, "ring.records", 1 << 14)
    n_batches, batch = 200, 500
    writer = Child(procs.records_writer, seg.name, n_batches, batch)
    with RingReader(seg.name) as r:
        out = np.empty((1024, 8), dtype=np.int64)
        seen = 0
        while seen < n_batches * batch:
            n = r.get_records_into(out, timeout_s=30)
            assert 1 <= n <= len(out)
            np.testing.assert_array_equal(out[:n, 0], np.arange(seen, seen + n))
            assert (out[:n, 1:] == out[:n, :1] * 3).all()
            seen += n
        assert r.try_get() is None
    writer.result()
    registry.release(seg)


def test_oversized_message_is_refused_and_changes_nothing(registry: Registry) -> None:
    seg = create_ring(registry, "ring.big", 1 << 12)
    with RingWriter(seg.name) as w, RingReader(seg.name) as r:
        w.put(b"before")
        with pytest.raises(MessageTooLarge, match=r"message of 4096 bytes exceeds this ring's limit of \d+ bytes"):
            w.put(b"x" * 4096)
        with pytest.raises(MessageTooLarge):
            w.put_many([b"ok", b"y" * 5000, b"never"])
        w.put(b"after")
        assert r.get_many(10) == [b"before", b"ok", b"after"]
    registry.release(seg)


def test_mismatched_record_size_is_a_protocol_error(registry: Registry) -> None:
    from mpkv.errors import ProtocolError

    seg = create_ring(registry, "ring.rec", 1 << 12)
    with RingWriter(seg.name) as w, RingReader(seg.name) as r:
        w.put(b"12345")
        with pytest.raises(ProtocolError, match="next message is 5 bytes, not a 64-byte record"):
            r.get_records_into(np.empty((4, 8), dtype=np.int64), timeout_s=1)
        assert r.get() == b"12345"  # the refused message is still there
    registry.release(seg)


def test_full_ring_times_out_naming_the_reader(registry: Registry) -> None:
    seg = create_ring(registry, "ring.full", 1 << 12)
    with RingWriter(seg.name) as w, RingReader(seg.name, label="slowpoke") as r:
        while True:
            try:
                w.put(b"z" * 500, timeout_s=0.2)
            except WaitTimeout as e:
                text = str(e)
                break
        assert "reader 0 'slowpoke'" in text and "unread bytes" in text and "alive" in text
        assert r.get() == b"z" * 500  # nothing was lost or overwritten
    registry.release(seg)


def test_empty_ring_times_out_naming_the_writer(registry: Registry) -> None:
    seg = create_ring(registry, "ring.empty", 1 << 12)
    with (
        RingWriter(seg.name, label="producer"),
        RingReader(seg.name) as r,
        pytest.raises(WaitTimeout, match=r"timed out after 0.2 s reading from an empty ring.*the writer 'producer'"),
    ):
        r.get(timeout_s=0.2)
    registry.release(seg)


def test_detached_reader_is_reported_to_a_blocked_writer(registry: Registry) -> None:
    seg = create_ring(registry, "ring.detach", 1 << 12)
    r = RingReader(seg.name)
    r.close()
    with RingWriter(seg.name) as w, pytest.raises(PeerDied, match="reader 0 of ring .* is detached"):
        for _ in range(100):
            w.put(b"q" * 500, timeout_s=5)
    registry.release(seg)


def test_endpoint_slots_are_exclusive(registry: Registry) -> None:
    seg = create_ring(registry, "ring.excl", 1 << 12, nreaders=2)
    with RingWriter(seg.name), RingReader(seg.name, 1):
        with pytest.raises(AttachError, match="the writer of ring .* is already held by pid"):
            RingWriter(seg.name)
        with pytest.raises(AttachError, match="reader 1 of ring .* is already held"):
            RingReader(seg.name, 1)
        with pytest.raises(AttachError, match="has 2 reader slots; there is no reader 2"):
            RingReader(seg.name, 2)
    # After a clean detach the slot may be taken again, and the position is kept.
    with RingWriter(seg.name) as w:
        w.put(b"again")
    registry.release(seg)


def test_bad_ring_geometry(registry: Registry) -> None:
    with pytest.raises(ValueError, match="power of two"):
        create_ring(registry, "ring.odd", 5000)
    with pytest.raises(ValueError, match="1 to 64 readers"):
        create_ring(registry, "ring.none", 4096, nreaders=0)


def test_two_instances_side_by_side(instance: str, rng: random.Random) -> None:
    seed = rng.randrange(2**31)
    regs = [Registry.create(instance + "a"), Registry.create(instance + "b")]
    try:
        segs = [create_ring(reg, "ring.same-name", 1 << 15) for reg in regs]
        assert segs[0].name != segs[1].name
        n = 20_000
        kids = []
        for k, seg in enumerate(segs):
            kids.append(Child(procs.stream_writer, seg.name, seed + k, n, 500))
            kids.append(Child(procs.stream_reader, seg.name, 0, seed + k, n, 500))
        for kid in kids:
            kid.result(timeout_s=120)  # each reader verified its own instance's exact byte stream
        for reg, seg in zip(regs, segs, strict=True):
            reg.release(seg)
    finally:
        for reg in regs:
            reg.destroy()
