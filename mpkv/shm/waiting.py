"""Bounded, explained waits, and the one way to sleep on several shared words at once.

``wait_until`` is the one bounded wait: it sleeps in slices of at most ``LIVENESS_SLICE_S`` (in C, on a futex,
GIL released); between slices it checks that the peers it depends on are alive, so a dead peer is noticed within
a slice even long before the deadline. On expiry it raises ``WaitTimeout`` naming what it waited for and each
peer's pid, state and last activity; on a dead peer it raises ``PeerDied`` the same way. Every wait of one process
for another goes through it: signal slots, rings (and so a client's completions), barriers, the submission gate,
a messager's layer wait, the launcher's ready wait (mpkv.launcher ``_wait_ready``), a NIXL link's replies and
transfers (mpkv.pd.nixl ``poll_until``: NIXL has no progress thread, so a slice polls it, paced), and a
``mpkv.launched`` launcher's ready line and exit. These loops do not, each bounded in its own way:

  - an actor's main loop (mpkv.actors.runtime ``Actor.run``): it runs for the instance's life, so it has no
    deadline; each pass sleeps at most a heartbeat (``WakeSet.sleep``, woken by the command word, the peers it
    waits for and its task ring), and waiting for a peer across passes ends after PEER_TIMEOUT_S in FAILED naming
    that peer (invariant I2): the deadline spans passes, which one ``wait_until`` call cannot. A decode messager's
    NIXL receiver is polled from this loop (``max_sleep_s``), for the same reason;
  - the launcher's supervision (mpkv.launcher ``_supervise``): it runs for the instance's life too, asleep on its
    actors' process sentinels (an exit wakes it at once); only a SHUTDOWN has a deadline (SHUTDOWN_GRACE_S).
    Its teardown (``_stop_all``) joins its own children, each join bounded by GRACE_S before SIGKILL;
  - reading a seqlocked slot or record (``SignalArray._read_words``, mpkv.shm.records ``read_sync_record``): a
    retry while a write is under way, which takes well under a microsecond; a writer found dead is named at once,
    a live one stuck there after TORN_LIMIT_S;
  - mpkv-top's refresh (mpkv.top): it waits for a key or its interval, for a person, not for a peer.

``WakeSet`` is how a loop sleeps on many futex words at once (futex_waitv): the words come from their owners'
public methods (``SignalArray.word``, ``RingReader.wake_word``), ``snapshot`` reads their values *before* the
caller reads the state they guard, and ``sleep`` returns at once if any changed since, so no change is missed.
"""

from __future__ import annotations

import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from mpkv import _native
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
    absent: str = "never attached"  # what to say of a peer with no local process (a remote agent: where it is)

    def describe(self) -> str:
        who = self.proc.describe() if self.proc else self.absent
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


# What ``WakeSet.sleep`` returns besides the index of the word that woke it.
TIMED_OUT = -1
CHANGED = -2  # a word no longer held its snapshot value when the sleep began: nothing to sleep for
_U32 = 0xFFFFFFFF
MAX_WORDS = 32  # futex_waitv takes at most 32 words


@dataclass(frozen=True)
class Word:
    """A futex word in shared memory: the low 32 bits of the u64 at ``off`` of ``buf``, whose writer wakes its
    sleepers after every store (a signal slot's sequence word, a command word)."""

    buf: Any
    off: int

    def load(self) -> int:
        return int(_native.load_u64(self.buf, self.off)) & _U32


class Eventcount(Protocol):
    """A word whose writer wakes only sleepers that raised a flag first (a ring's writer position: NOTE [ ring
    layout ] in mpkv.layout). ``arm`` raises the flag, fences and re-checks: False when what the sleeper waits for
    is already there (the flag is lowered again: nothing to sleep for); ``disarm`` lowers it after the sleep."""

    @property
    def word(self) -> Word: ...

    def arm(self) -> bool: ...

    def disarm(self) -> None: ...


class WakeSet:
    """Words whose change needs a loop's attention, slept on together. In this order, every pass:
    ``add`` the words, ``snapshot`` (before reading the state they guard), decide, then ``sleep``: a change
    after the snapshot, even one made before the sleep began, ends the sleep at once."""

    def __init__(self) -> None:
        self._words: list[Word] = []
        self._counts: dict[int, Eventcount] = {}  # index -> the eventcount whose word it is
        self._values: list[int] | None = None

    def __len__(self) -> int:
        return len(self._words)

    def add(self, word: Word | Eventcount) -> int:
        """Add a word (or an eventcount's word); returns its index, which ``sleep`` reports when it wakes us."""
        if len(self._words) >= MAX_WORDS:
            raise ValueError(f"a WakeSet sleeps on at most {MAX_WORDS} words (futex_waitv); this one is full")
        i = len(self._words)
        if isinstance(word, Word):
            self._words.append(word)
        else:
            self._words.append(word.word)
            self._counts[i] = word
        self._values = None  # a snapshot covers every word or none
        return i

    def snapshot(self) -> tuple[int, ...]:
        """Read every word now (take it before reading what the words guard); returns the values, by index."""
        self._values = [w.load() for w in self._words]
        return tuple(self._values)

    def sleep(self, timeout_s: float, among: Iterable[int] | None = None) -> int:
        """Sleep until a word (of ``among``, by index; all by default) differs from the snapshot, or
        ``timeout_s``. Returns the index of the word that woke us (or any index after a signal: callers re-check
        anyway), ``CHANGED`` when one differed already, or ``TIMED_OUT``. The eventcounts slept on are armed
        first and disarmed after, however the sleep ends."""
        if self._values is None:
            raise RuntimeError("WakeSet.sleep needs a snapshot of every word first (call snapshot() after add())")
        chosen = list(range(len(self._words))) if among is None else list(among)
        if not chosen:
            raise ValueError("WakeSet.sleep was given no word to sleep on")
        armed: list[Eventcount] = []
        try:
            for i in chosen:
                if i in self._counts:
                    if not self._counts[i].arm():
                        return CHANGED
                    armed.append(self._counts[i])
            words = [(self._words[i].buf, self._words[i].off, self._values[i]) for i in chosen]
            rc = int(_native.wait_any(words, timeout_s))
            return chosen[rc] if rc >= 0 else rc
        finally:
            for count in armed:
                count.disarm()
