"""Hardening of the shared-memory core: wait_any when futex_waitv is refused, torn seqlock slots and their
repair, endpoint claims that two processes cannot both win, handle records read whole."""

from __future__ import annotations

import errno

import pytest
import shm_children
from helpers import Child

from mpkv.shm.registry import Registry
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
    from procs import Phase

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
