"""The shared-memory all-reduce: rank-ordered sums with the same bits on every rank, over many generations of
random sizes, dtypes and strides; a dead, late or disagreeing rank named, never waited on forever."""

from __future__ import annotations

import os
import random
import time

import pytest
import torch
from allreduce_procs import allreduce_forever, allreduce_member, allreduce_sizes
from helpers import Child

from mpkv import naming
from mpkv.errors import AttachError, PeerDied, ProtocolError, WaitTimeout
from mpkv.shm.allreduce import AllReduce, create_allreduce
from mpkv.shm.barrier import create_barrier
from mpkv.shm.registry import Registry

MAX_ELEMS = 4096  # float32 elements per buffer: small, so that larger cases are reduced in pieces


@pytest.fixture
def registry(instance: str):
    reg = Registry.create(instance)
    yield reg
    reg.destroy()


@pytest.mark.parametrize("tp", [2, 3])
def test_every_rank_gets_the_rank_ordered_sum(registry: Registry, rng: random.Random, tp: int) -> None:
    seg = create_allreduce(registry, "allreduce", tp, MAX_ELEMS * 4)
    seed, n = rng.randrange(2**31), 300
    kids = [Child(allreduce_member, seg.name, r, tp, seed, n, MAX_ELEMS) for r in range(tp)]
    results = [k.result(timeout_s=180) for k in kids]
    for rank, res in enumerate(results):
        assert res["wrong"] == [], f"rank {rank}: generations {res['wrong'][:10]} differ from the rank-ordered sum"
    assert len({res["digest"] for res in results}) == 1, "the ranks got different bits"
    # More generations than calls: the cases larger than a buffer went in pieces, the same on every rank.
    assert len({res["generation"] for res in results}) == 1 and results[0]["generation"] > n
    registry.release(seg)
    assert not os.path.exists(naming.shm_path(seg.name))


def test_a_killed_rank_is_named_by_the_others(registry: Registry, rng: random.Random) -> None:
    seg = create_allreduce(registry, "allreduce", 3, MAX_ELEMS * 4)
    doomed = Child(allreduce_forever, seg.name, 2)
    survivor = Child(allreduce_forever, seg.name, 1)
    assert doomed.recv(60) == "started" and survivor.recv(60) == "started"
    ar = AllReduce(seg.name, 0, timeout_s=60)
    t = torch.ones(64)
    for _ in range(rng.randrange(1, 200)):
        ar(t.fill_(1.0))
        assert torch.equal(t, torch.full((64,), 3.0))
    doomed.kill()  # wherever it was: copying its partial, arriving, summing, asleep
    t0 = time.monotonic()
    with pytest.raises(
        PeerDied, match=rf"all-reduce rank 0, generation \d+ .*rank 2 of barrier .* is dead.*pid {doomed.pid}"
    ):
        # It may have arrived at one more generation before it died, never at two.
        for _ in range(2):
            ar(t.fill_(1.0))
    assert time.monotonic() - t0 < 30, "a dead rank must be noticed long before the deadline"
    kind, text = survivor.error()
    assert kind == "PeerDied" and f"pid {doomed.pid}" in text and "all-reduce rank 1" in text
    # Our arrival was counted: the ranks are at different generations now, and every later call says so.
    with pytest.raises(ProtocolError, match=r"rank 0 is unusable since generation \d+ .* failed: PeerDied"):
        ar(t)
    ar.close()
    registry.release(seg)
    assert not os.path.exists(naming.shm_path(seg.name))


def test_ranks_reducing_different_sizes_are_told_not_summed(registry: Registry) -> None:
    seg = create_allreduce(registry, "allreduce", 2, MAX_ELEMS * 4)
    kids = [Child(allreduce_sizes, seg.name, r, sizes) for r, sizes in enumerate([[8, 8], [8, 9]])]
    errors = [k.error() for k in kids]
    for kind, text in errors:
        assert kind == "ProtocolError", text
        assert "generation 2" in text and "seq=8, tag='float32'" in text and "seq=9, tag='float32'" in text
    registry.release(seg)


def test_a_late_rank_is_named_at_the_deadline(registry: Registry) -> None:
    seg = create_allreduce(registry, "allreduce", 2, MAX_ELEMS * 4)
    with AllReduce(seg.name, 0, timeout_s=0.3) as ar:
        with pytest.raises(
            WaitTimeout,
            match=r"all-reduce rank 0, generation 1 .*timed out after 0.3 s .* rank 1 of barrier .*never attached",
        ):
            ar(torch.ones(4))
        with pytest.raises(ProtocolError, match="unusable since generation 1 .* WaitTimeout"):
            ar(torch.ones(4))
    registry.release(seg)


def test_what_it_refuses(registry: Registry) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        create_allreduce(registry, "bad", 2, 100)
    with pytest.raises(ValueError, match="1 to 256 ranks"):
        create_allreduce(registry, "bad", 0, 64)
    plain = create_barrier(registry, "barrier", 2)
    with pytest.raises(AttachError, match="not an all-reduce"):
        AllReduce(plain.name, 0)
    seg = create_allreduce(registry, "allreduce", 2, 64)
    with pytest.raises(AttachError, match="there is no rank 2"):
        AllReduce(seg.name, 2)
    with AllReduce(seg.name, 0) as ar:
        with pytest.raises(ValueError, match="floating-point"):
            ar(torch.ones(4, dtype=torch.int32))
        assert ar.generation == 0  # refused before arriving: nothing shared changed
    registry.release(plain)
    registry.release(seg)


def test_one_rank_leaves_the_tensor_as_it_is(registry: Registry) -> None:
    seg = create_allreduce(registry, "allreduce", 1, 64)
    with AllReduce(seg.name, 0) as ar:
        t = torch.arange(100, dtype=torch.float32)  # larger than a buffer too
        ar(t)
        assert torch.equal(t, torch.arange(100, dtype=torch.float32)) and ar.generation == 0
    registry.release(seg)
