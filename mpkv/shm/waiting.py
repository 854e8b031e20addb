"""Bounded, explained waits. Every blocking call in mpkv ends up in ``wait_until``.

A wait sleeps in slices of at most ``LIVENESS_SLICE_S`` (in C, on a futex, GIL released); between slices it
checks that the peers it depends on are alive, so a dead peer is noticed within a slice even long before the
deadline. On expiry it raises ``WaitTimeout`` naming what it waited for and each peer's pid, state and last
activity; on a dead peer it raises ``PeerDied`` the same way.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mpkv.errors import PeerDied, WaitTimeout
from mpkv.shm.proc import ProcId

# Spin this long before sleeping: long enough to catch a peer that answers at once (a round trip is a few
# microseconds), short enough that 7+ processes on 2 cores do not starve each other.
SPIN_S = float(os.environ.get("MPKV_SPIN_US", "50")) * 1e-6
LIVENESS_SLICE_S = 0.1
DEFAULT_TIMEOUT_S = 30.0


@dataclass
class Peer:
    """A process a wait depends on. ``detail`` adds what only the caller knows (e.g. 'behind by 4 KiB')."""

    role: str
    proc: ProcId | None
    detail: Callable[[], str] | None = None
    gone: Callable[[], str | None] | None = None  # a reason the peer left without dying (detached), or None

    def describe(self) -> str:
        who = self.proc.describe() if self.proc else "never attached"
        extra = self.detail() if self.detail else ""
        return f"{self.role} [{who}{'; ' + extra if extra else ''}]"

    def dead_reason(self) -> str | None:
        if self.gone is not None and (why := self.gone()):
            return why
        if self.proc is not None and not self.proc.alive():
            return self.proc.state()
        return None


def check_timeout(timeout_s: float) -> float:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r}")
    return float(timeout_s)


def wait_until(
    step: Callable[[float, float], bool],
    *,
    what: str,
    timeout_s: float,
    peers: Callable[[], Sequence[Peer]],
) -> None:
    """Call ``step(slice_s, spin_s)`` until it returns True. ``step`` blocks at most ``slice_s`` seconds, and
    spins ``spin_s`` first: ``SPIN_S`` on the first call, 0 after (a spin only pays while the peer is running).

    ``peers`` is called between slices (and again at the end) so it always reflects current state, e.g. which
    reader is now the slowest.
    """
    deadline = time.monotonic() + check_timeout(timeout_s)
    spin_s = SPIN_S
    while True:
        remaining = deadline - time.monotonic()
        if step(max(0.0, min(LIVENESS_SLICE_S, remaining)), spin_s):
            return
        spin_s = 0.0
        for p in peers():
            why = p.dead_reason()
            if why is not None:
                if step(0.0, 0.0):  # it may have delivered just before it went away
                    return
                raise PeerDied(f"{what}: {p.role} is {why}; it was {p.describe()}")
        if time.monotonic() >= deadline:
            if step(0.0, 0.0):
                return
            named = "; ".join(p.describe() for p in peers()) or "no peer recorded"
            raise WaitTimeout(f"timed out after {timeout_s:g} s {what}; waiting for {named}")
