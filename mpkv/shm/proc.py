"""Who a process is (pid + start time, so a reused pid is not taken for the old one) and whether it lives.

The identity is read from /proc/PID/stat itself, not through psutil: one read gives the state and the start time
together (two reads could straddle the pid's reuse), and the start time is what the shared-memory headers store
and compare exactly, the kernel's clock ticks since boot (layout.py). psutil offers it only as create_time(),
seconds since the epoch as a float, through a boot time that can shift. What psutil reads as well as we would,
the CPU accounting, goes through psutil.
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass

import psutil

_STATE_WORDS = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible wait",
    "T": "stopped",
    "t": "stopped by a tracer",
    "Z": "a zombie (exited, not yet reaped)",
    "X": "dead",
    "I": "idle",
}


def _fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after "pid (comm) " (comm may hold spaces or parens), or None."""
    if pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks), or None when there is no such process."""
    fields = _fields(pid)
    return (fields[0], int(fields[19])) if fields else None  # field 3 is the state, 22 the start time


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (0 when it is gone, or not ours to read)."""
    if pid <= 0:  # no process (psutil would take 0 for the kernel's idle task)
        return 0.0
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0
    return float(times.user + times.system)


@dataclass(frozen=True)
class ProcId:
    pid: int
    start_ticks: int

    @classmethod
    def me(cls) -> ProcId:
        """This process (read from /proc once per process: a forked or forkserver child reads its own)."""
        global _ME
        if _ME.pid != os.getpid():
            _ME = cls.of(os.getpid())
        return _ME

    @classmethod
    def of(cls, pid: int) -> ProcId:
        st = _stat(pid)
        return cls(pid, st[1] if st else 0)

    def alive(self) -> bool:
        st = _stat(self.pid)
        return st is not None and st[1] == self.start_ticks and st[0] not in "ZX"

    def state(self) -> str:
        """A few words a person can act on: 'alive, sleeping', 'dead', 'a zombie ...'."""
        if self.pid <= 0:
            return "never attached"
        st = _stat(self.pid)
        if st is None:
            return "dead"
        if st[1] != self.start_ticks:
            return "dead (its pid now belongs to another process)"
        word = _STATE_WORDS.get(st[0], f"state {st[0]}")
        return word if st[0] in "ZX" else f"alive, {word}"

    def describe(self) -> str:
        return f"pid {self.pid} ({self.state()})"


_ME = ProcId.of(os.getpid())


class Watch:
    """Whether processes live, for a caller that asks about the same few again and again (the controller, at
    every step, about every actor). The first look reads /proc (tying the pid to its start time) and opens a
    pidfd; from then on the answer is one poll of that pidfd, which becomes readable when that very process
    exits (a zombie included), whoever gets its pid later. Where pidfds are refused, every look reads /proc."""

    def __init__(self) -> None:
        self._fds: dict[ProcId, int] = {}
        self._refused = False

    def alive(self, proc: ProcId) -> bool:
        fd = self._fds.get(proc)
        if fd is None:
            if self._refused or not proc.alive():
                return proc.alive() if self._refused else False
            try:
                fd = os.pidfd_open(proc.pid)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    return False
                # A sandbox without pidfd_open, or no fd left (EMFILE): the /proc reads it is, from now on.
                self._refused = True
                return proc.alive()
            if not proc.alive():  # the pid was reused between the two looks: the pidfd names another process
                os.close(fd)
                return False
            self._fds[proc] = fd
        poll = select.poll()  # not select(): a controller in a trainer may hold fds beyond 1024
        poll.register(fd, select.POLLIN)
        return not poll.poll(0)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
