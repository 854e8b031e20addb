"""The launcher's wait for its actors to be ready (Launcher._wait_ready), driven with stand-in processes so that
each edge is hit on purpose: more actors than one futex_waitv sleeps on, and an actor that exited before its
exit code reached the launcher (a zombie in /proc: its forkserver has not reaped it yet)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mpkv.config import CacheConfig
from mpkv.errors import LaunchError
from mpkv.instance import Instance
from mpkv.launcher import Launcher
from mpkv.protocol import ROLES, Role
from mpkv.shm.proc import ProcId


class StandIn:
    """What _wait_ready looks at of an actor's process: its pid and, once known, its exit code."""

    def __init__(self, pid: int, child: subprocess.Popen[bytes] | None = None) -> None:
        self.pid, self.child, self.exitcode = pid, child, None

    def join(self, timeout: float | None = None) -> None:
        if self.child is not None:
            self.exitcode = self.child.wait(timeout)


def _waiting(instance: str, tp: int, procs: dict[tuple[Role, int], StandIn]) -> tuple[Launcher, Instance]:
    cfg = CacheConfig(tp=tp, kv_heads=tp, device_blocks=4, host_blocks=4, layers=1)
    launcher = Launcher(instance, cfg, say=lambda _: None)
    launcher.procs = procs  # type: ignore[assignment]
    return launcher, Instance.create(instance, cfg)


def test_more_actors_than_one_sleep_takes_are_waited_for_and_named(instance: str) -> None:
    tp = 11  # 33 actors: more status words than futex_waitv's 32
    procs = {(role, r): StandIn(os.getpid()) for r in range(tp) for role in ROLES}  # alive, never READY
    launcher, inst = _waiting(instance, tp, procs)
    try:
        with pytest.raises(LaunchError, match=r"not ready after 0.3 s: still waiting for worker r0 .*messager r10"):
            launcher._wait_ready(inst, timeout_s=0.3)
    finally:
        inst.destroy()


def test_an_actor_that_exited_before_its_exit_code_arrived_is_named_with_it(instance: str) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead_pid = dead.pid
    deadline = time.monotonic() + 30  # only catches a hang
    while ProcId.of(dead_pid).alive():  # until it has exited; deliberately not reaped yet: a zombie
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)  # polling a child's exit, which has no other signal here; not a synchronisation
    procs = {(role, 0): StandIn(os.getpid()) for role in ROLES}
    procs[(Role.WORKER, 0)] = StandIn(dead_pid, dead)
    launcher, inst = _waiting(instance, 1, procs)
    try:
        with pytest.raises(LaunchError, match=rf"^worker r0 \(pid {dead_pid}\) died during start: exit code 3"):
            launcher._wait_ready(inst, timeout_s=30)
    finally:
        dead.wait(30)
        inst.destroy()
