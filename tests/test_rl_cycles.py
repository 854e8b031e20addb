"""Many RL cycles at TP=2 while a client keeps prefilling, swapping and verifying: 0 hangs, 0 corrupted bytes."""

from __future__ import annotations

import os
import random

import procs
import pytest
from helpers import Child
from instances import Launched

from mpkv.controller import Controller

CYCLES = int(os.environ.get("MPKV_RL_CYCLES", "200"))


def _cycles(instance: str, n: int, seed: int, owner: str) -> dict[str, int]:
    with Launched(instance, tp=2, owner=owner), Controller(instance) as ctl:
        traffic = Child(procs.swap_traffic, instance, seed)
        wv = ctl.weight_version
        for _ in range(n):
            # Let the client get a task through since the last resume, so that every cycle races with traffic.
            assert traffic.conn.poll(60), "no task got through within 60 s of a resume"
            while traffic.conn.poll():
                msg = traffic.conn.recv()
                assert msg == "tick", f"traffic client stopped: {msg}"
            ctl.pause()
            res = ctl.clear()
            assert sum(res.released_bytes.values()) > 0
            wv += 1
            ctl.restore(wv)
            ctl.resume()
        traffic.conn.send("stop")
        while (msg := traffic.recv(120)) == "tick":
            pass
        assert msg[0] == "ok", f"traffic client failed: {msg}"
        counts = msg[1]
        traffic.join(60)
        ctl.shutdown()
    print(f"[rl] {n} cycles: {counts}")
    return counts


def test_200_cycles_under_swap_traffic(instance: str, rng: random.Random) -> None:
    counts = _cycles(instance, CYCLES, rng.randrange(2**31), "worker")
    assert counts["tasks_ok"] >= CYCLES and counts["verified_ranks"] > 0, counts


@pytest.mark.slow
@pytest.mark.parametrize("owner", ["worker", "transfer"])
def test_soak_cycles(instance: str, rng: random.Random, owner: str) -> None:
    counts = _cycles(instance, 5 * CYCLES, rng.randrange(2**31), owner)
    assert counts["tasks_ok"] >= 5 * CYCLES, counts
