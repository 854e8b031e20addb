"""ProcId: a process is its pid and its start time, so that a pid the kernel has given to another process is never
taken for the old one (every liveness check of a peer rests on it); its state in words; its CPU time. Real
processes: this one, and a child held as a zombie before it is reaped."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from mpkv.shm.proc import ProcId, Watch, cpu_seconds

DEADLINE_S = 60.0


def test_a_pid_with_another_start_time_is_a_recycled_pid_and_counts_as_dead() -> None:
    me = ProcId.me()
    assert me == ProcId.of(os.getpid()) and me.start_ticks > 0
    assert me.alive() and me.state() == "alive, running", me.state()
    earlier_owner = ProcId(me.pid, me.start_ticks - 1)  # the same pid, started at another tick: reused since
    assert not earlier_owner.alive()
    assert earlier_owner.describe() == f"pid {me.pid} (dead (its pid now belongs to another process))"


def test_a_child_is_alive_then_a_zombie_then_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        who = ProcId.of(child.pid)
        assert who.alive() and who.start_ticks >= ProcId.me().start_ticks  # it started after us
        assert who.state().startswith("alive, "), who.state()
        assert child.stdin is not None
        child.stdin.close()  # it exits at the end of its input
        fd = os.pidfd_open(child.pid)  # readable once it has exited; nothing reaps it meanwhile
        try:
            assert select.select([fd], [], [], DEADLINE_S)[0], f"pid {child.pid} did not exit at EOF"
        finally:
            os.close(fd)
        assert not who.alive() and who.state() == "a zombie (exited, not yet reaped)"
        child.wait(DEADLINE_S)
        assert not who.alive() and who.state() == "dead"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(DEADLINE_S)


def test_cpu_seconds_is_user_plus_system_time() -> None:
    used = cpu_seconds(os.getpid())  # the kernel's ticks, truncated: never above the precise count read after it
    assert 0 < used <= time.process_time(), used
    assert cpu_seconds(0) == cpu_seconds(-1) == 0.0


def test_a_watch_answers_from_a_pidfd_and_sees_exit_zombie_and_reuse() -> None:
    """The controller's Watch: after its first look, a process is watched by its pidfd; the answer turns at the
    exit (before anything reaps the zombie), and a pid with another start time is never taken for the process."""
    watch = Watch()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        who = ProcId.of(child.pid)
        assert watch.alive(who) and watch.alive(who)
        assert not watch.alive(ProcId(who.pid, who.start_ticks + 1))  # the same pid, another process
        assert child.stdin is not None
        child.stdin.close()
        fd = os.pidfd_open(child.pid)  # the test's own look, to know when it has exited (nothing reaps it)
        try:
            assert select.select([fd], [], [], DEADLINE_S)[0], f"pid {child.pid} did not exit at EOF"
        finally:
            os.close(fd)
        assert not watch.alive(who) and who.state() == "a zombie (exited, not yet reaped)"
    finally:
        child.wait(DEADLINE_S)
        watch.close()
    assert not watch.alive(who)  # reaped: no such process any more (a new look at /proc)
