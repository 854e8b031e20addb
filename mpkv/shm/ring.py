"""Lock-free rings in shared memory: one writer, N readers (N=1: an SPSC lane; N>1: a broadcast ring).

Byte map and write order: NOTE [ ring layout ] in mpkv.layout; the hot path is ``mpkv._native.Ring``.
A full ring blocks the writer until every reader has consumed enough (bounded by ``timeout_s``, or raises);
nothing is ever dropped or overwritten. An empty ring blocks the reader the same way. Blocking spins
briefly, then sleeps on a futex (eventcount, no lost wake-ups), and checks the peer's liveness between
slices: a dead writer is reported once the ring is drained; a dead or detached reader when the writer needs
the space it holds.

An endpoint is one process: ``RingWriter`` claims the writer slot, ``RingReader`` reader slot i, by a
compare-and-swap of its pid. A slot whose holder died may be taken over (the position is kept); at most one live
process ever holds it (NOTE [ endpoint claim ] in mpkv.layout).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np

from mpkv import _native, layout
from mpkv.errors import AttachError, MessageTooLarge, PeerDied, ProtocolError, WaitTimeout
from mpkv.layout import EndpointState, SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S, Peer, Word, wait_until

_BASE = layout.SEGMENT_HEADER_BYTES  # the ring header starts right after the segment header
# The C hot path has its own copy of these offsets: the two must agree (an ABI, checked at import).
assert (_native.LINE_BYTES, _native.FRAME_HEADER_BYTES, _native.META_SLEEPING, _native.META_WAITING_ON) == (
    layout.LINE_BYTES,
    layout.FRAME_HEADER_BYTES,
    layout.META_SLEEPING,
    layout.META_WAITING_ON,
), "mpkv/shm/_native.c and mpkv/layout.py disagree on the ring layout: rebuild the C helper"
EndpointT = TypeVar("EndpointT", bound="_Endpoint")
# A test hook: called with "won" right after an endpoint claim's compare-and-swap succeeded (a test stops the
# claimer there to show that a second claimer is refused meanwhile). Always None outside tests.
claim_hook: Callable[[str], None] | None = None


def _left(deadline: float, timeout_s: float, what: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise WaitTimeout(f"timed out after {timeout_s:g} s {what}")
    return left


def ring_payload_bytes(capacity: int, nreaders: int) -> int:
    return layout.ring_header_bytes(nreaders) + capacity


def create_ring(registry: Registry, obj: str, capacity: int, nreaders: int = 1) -> Segment:
    """Create a ring segment (the caller owns it and later ``registry.release``s it)."""
    if capacity < 4096 or capacity & (capacity - 1) or capacity > 1 << 31:
        raise ValueError(f"ring capacity must be a power of two between 4 KiB and 2 GiB, got {capacity}")
    if not 1 <= nreaders <= 64:
        raise ValueError(f"a ring has 1 to 64 readers, got {nreaders}")
    seg = registry.create_segment(obj, SegmentKind.RING, ring_payload_bytes(capacity, nreaders))
    layout.RING_PARAMS.pack_into(seg.buf, _BASE, capacity, nreaders, layout.ring_max_payload(capacity))
    seg.mark_ready()
    return seg


class _Endpoint:
    """What the writer and the readers share: attach, claim a slot, publish waits, describe peers."""

    def __init__(self, name: str, endpoint: int, label: str) -> None:
        self.name = name
        self.blocked = 0  # how many calls had to wait (spin or sleep): tests check the blocking path ran
        self._closed = False
        self.seg = Segment.attach(name, SegmentKind.RING)
        try:
            self.capacity, self.nreaders, self.max_payload = layout.RING_PARAMS.unpack_from(self.seg.buf, _BASE)
            if endpoint >= self.nreaders:
                raise AttachError(f"ring {name} has {self.nreaders} reader slots; there is no reader {endpoint}")
            self._meta = self._meta_off(endpoint)
            self._claim(label, endpoint)
            self._port = _native.Ring(
                self.seg.buf,
                _BASE,
                _BASE + layout.ring_header_bytes(self.nreaders),
                self.capacity,
                self.nreaders,
                self.max_payload,
                endpoint,
                MessageTooLarge,
                ProtocolError,
            )
        except BaseException:
            self.seg.close()
            raise

    def _meta_off(self, endpoint: int) -> int:
        if endpoint < 0:
            return layout.ring_writer_meta(_BASE)
        return layout.ring_reader_meta(_BASE, endpoint)

    def _who(self, endpoint: int) -> str:
        return "the writer" if endpoint < 0 else f"reader {endpoint}"

    def _claim(self, label: str, endpoint: int) -> None:
        """NOTE [ endpoint claim ] in mpkv.layout: the claim word is ``pid | CLAIMING << 32`` from the winning
        compare-and-swap until the claimer has written its start time; judged by pid alone while it says so."""
        buf, off, me = self.seg.buf, self._meta, ProcId.me()
        word = _native.load_u64(buf, off + layout.META_PID)  # pid u32 | sleeping u32
        holder = self._claimant(endpoint, word)
        if holder is not None and (holder.pid != me.pid or self._attached(endpoint)) and holder.alive():
            raise AttachError(f"{self._who(endpoint)} of ring {self.name} is already held by {holder.describe()}")
        won, _ = _native.cas_u64(buf, off + layout.META_PID, word, me.pid | layout.META_CLAIMING << 32)
        if not won:
            raise AttachError(f"{self._who(endpoint)} of ring {self.name} was claimed by another process just now")
        if claim_hook is not None:
            claim_hook("won")
        _native.store_u64(buf, off + layout.META_START, me.start_ticks)
        buf[off + layout.META_LABEL : off + layout.META_LABEL + layout.LABEL_BYTES] = label.encode()[
            : layout.LABEL_BYTES
        ].ljust(layout.LABEL_BYTES, b"\0")
        _native.store_u64(buf, off + layout.META_HEARTBEAT, time.monotonic_ns())
        _native.store_u32(buf, off + layout.META_STATE, EndpointState.ATTACHED)
        # Last, with release order: from here on the claim is judged by pid and the start time stored above.
        _native.store_u32(buf, off + layout.META_SLEEPING, 0)

    def _attached(self, endpoint: int) -> bool:
        return _native.load_u32(self.seg.buf, self._meta_off(endpoint) + layout.META_STATE) == EndpointState.ATTACHED

    def _claimant(self, endpoint: int, word: int) -> ProcId | None:
        """Who the endpoint's claim word (pid u32 | sleeping u32) names, to be judged for liveness; None if free.
        By pid and start time only once the claim is complete (ATTACHED, no CLAIMING mark): before that the start
        word may still be a dead predecessor's, and would make a live claimer look dead."""
        pid, mark = word & 0xFFFFFFFF, word >> 32
        if not pid:
            return None
        if mark != layout.META_CLAIMING and self._attached(endpoint):
            return ProcId(int(pid), _native.load_u64(self.seg.buf, self._meta_off(endpoint) + layout.META_START))
        return ProcId.of(int(pid))

    def _holder(self, endpoint: int) -> ProcId:
        off = self._meta_off(endpoint)
        pid = _native.load_u64(self.seg.buf, off + layout.META_PID) & 0xFFFFFFFF
        return ProcId(int(pid), _native.load_u64(self.seg.buf, off + layout.META_START))

    def _peer(self, endpoint: int, detail: str = "") -> Peer:
        off = self._meta_off(endpoint)
        buf = self.seg.buf
        raw = bytes(buf[off + layout.META_LABEL : off + layout.META_LABEL + layout.LABEL_BYTES])
        label = raw.rstrip(b"\0").decode(errors="replace")
        holder = self._holder(endpoint)

        def details() -> str:
            hb = _native.load_u64(buf, off + layout.META_HEARTBEAT)
            age = f"last active {(time.monotonic_ns() - hb) / 1e9:.2f} s ago" if hb else "never active"
            return f"{age}{'; ' + detail if detail else ''}"

        def gone() -> str | None:
            st = _native.load_u32(buf, off + layout.META_STATE)
            return "detached" if st == EndpointState.DETACHED else None

        role = f"{self._who(endpoint)}{' ' + repr(label) if label else ''} of ring {self.name}"
        return Peer(role, holder if holder.pid else None, details, gone)

    def _block(self, need: int, what: str, peers: Callable[[], list[Peer]], timeout_s: float) -> None:
        buf, off = self.seg.buf, self._meta
        self.blocked += 1
        _native.store_u64(buf, off + layout.META_WAIT_SINCE, time.monotonic_ns())

        def step(slice_s: float, spin_s: float) -> bool:
            _native.store_u64(buf, off + layout.META_HEARTBEAT, time.monotonic_ns())
            return bool(self._port.wait(need, spin_s, slice_s))

        try:
            wait_until(step, what=what, timeout_s=timeout_s, peers=peers)
        finally:
            _native.store_u64(buf, off + layout.META_WAIT_SINCE, 0)

    def close(self) -> None:
        """Detach (peers waiting on us are told so) and unmap. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _native.store_u32(self.seg.buf, self._meta + layout.META_STATE, EndpointState.DETACHED)
        _native.store_u64(self.seg.buf, self._meta + layout.META_PID, 0)  # release the claim (and our sleep flag)
        self._port.release()
        self.seg.close()

    def __enter__(self: EndpointT) -> EndpointT:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RingWriter(_Endpoint):
    """The one writer of a ring. Not thread-safe: one thread per endpoint."""

    def __init__(self, name: str, *, label: str = "") -> None:
        super().__init__(name, -1, label)
        self._ungate()  # a writer killed inside the gate left it shut: we hold the slot now, and are not inside

    def _ungate(self) -> None:
        buf, gate = self.seg.buf, layout.ring_writer_gate(_BASE)
        _native.store_u64(buf, gate, 0)
        _native.futex_wake(buf, gate)

    def close(self) -> None:
        if not self._closed:
            self._ungate()
        super().close()

    def put(self, data: bytes | memoryview, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Write one message; block while the ring is full, up to ``timeout_s``."""
        if self._port.try_put(data):
            return
        self._block(memoryview(data).nbytes, "writing to a full ring", self._laggards, timeout_s)
        if not self._port.try_put(data):  # pragma: no cover - wait returned True, so it fits
            raise AssertionError("ring reported space that was not there")

    def put_many(self, items: Sequence[bytes | memoryview], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Write all items in order, publishing as many per store as fit; block while full."""
        done = self._port.try_put_many(items, 0)
        deadline = time.monotonic() + timeout_s
        while done < len(items):
            what = f"writing item {done} of {len(items)} to a full ring"
            self._block(memoryview(items[done]).nbytes, what, self._laggards, _left(deadline, timeout_s, what))
            done += self._port.try_put_many(items, done)

    def put_records(self, records: np.ndarray, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """Write each row of a C-contiguous array as one fixed-size message."""
        arr = np.ascontiguousarray(records)
        rec = arr.itemsize * (int(np.prod(arr.shape[1:])) if arr.ndim > 1 else 1)
        n = arr.shape[0] if arr.ndim else 1
        raw = arr.reshape(-1).view(np.uint8)
        done = self._port.try_put_records(raw, rec, 0)
        deadline = time.monotonic() + timeout_s
        while done < n:
            what = f"writing record {done} of {n} to a full ring"
            self._block(rec, what, self._laggards, _left(deadline, timeout_s, what))
            done += self._port.try_put_records(raw, rec, done)

    @contextlib.contextmanager
    def gated(self) -> Iterator[None]:
        """The writer's side of NOTE [ submission gate ]: check the condition, then write, inside this block."""
        buf, gate = self.seg.buf, layout.ring_writer_gate(_BASE)
        _native.store_u64(buf, gate, 1)
        _native.fence()
        try:
            yield
        finally:
            self._ungate()

    def _laggards(self) -> list[Peer]:
        """The readers holding space the writer needs: the slowest first."""
        buf = self.seg.buf
        positions = [_native.load_u64(buf, layout.ring_reader_pos(_BASE, i)) for i in range(self.nreaders)]
        lowest = min(positions)
        mine = self._port.pos
        return [
            self._peer(i, f"holds {mine - p} unread bytes of {self.capacity}")
            for i, p in enumerate(positions)
            if p == lowest
        ]


# NOTE [ submission gate ]
# A writer that checks a condition before it writes ("the instance still serves") races with whoever changes that
# condition ("pause"): the check passes, the condition changes, readers act on it (drain what is in the ring, stop),
# and only then the message lands, behind some readers' backs but not others'. The gate closes that race with
# Dekker's handshake on two words, each with one writer:
#     writer (``RingWriter.gated``): gate := 1; full fence; check the condition; write; gate := 0; wake the gate
#     closer (``quiesce``):          publish the new condition; full fence; wait until gate == 0; read the position
# With full fences on both sides at least one sees the other's store: either the writer sees the new condition and
# writes nothing, or the closer waits for its write to land. So the position ``quiesce`` returns is final: every
# message written before the condition changed lies below it, and none will follow until the condition changes
# back. Readers that drain up to that position therefore all serve exactly the same messages (mpkv.controller
# publishes it per task ring before a PAUSE or SHUTDOWN; mpkv.actors.runtime drains up to it).


def quiesce(seg: Segment, *, what: str, timeout_s: float) -> int:
    """The closer's side of NOTE [ submission gate ]: call after publishing the new condition. Waits (bounded;
    the ring's writer is named if it dies or does not finish) until no write is between its check and its store,
    then returns the writer's position."""
    buf, gate = seg.buf, layout.ring_writer_gate(_BASE)
    _native.fence()

    def step(slice_s: float, spin_s: float) -> bool:
        return _native.load_u64(buf, gate) == 0 or _native.wait_word_change(buf, gate, 1, -1, spin_s, slice_s) == 0

    def peers() -> list[Peer]:
        meta = layout.ring_writer_meta(_BASE)
        pid = _native.load_u64(buf, meta + layout.META_PID) & 0xFFFFFFFF
        holder = ProcId(int(pid), _native.load_u64(buf, meta + layout.META_START))

        def gone() -> str | None:  # no writer holds the slot: nobody is inside the gate (a new one resets it)
            return None if pid else "gone (no writer holds the ring)"

        return [Peer(f"the writer of ring {seg.name}", holder, lambda: "between its check and its write", gone)]

    try:
        wait_until(step, what=what, timeout_s=timeout_s, peers=peers)
    except PeerDied:
        pass  # a dead writer writes no more: its position is final as it is (a new writer passes the gate again)
    return int(_native.load_u64(buf, layout.ring_writer_pos(_BASE)))


class RingReader(_Endpoint):
    """Reader ``index`` of a ring. Not thread-safe: one thread per endpoint."""

    def __init__(self, name: str, index: int = 0, *, label: str = "") -> None:
        if index < 0:
            raise ValueError(f"reader index must be >= 0, got {index}")
        super().__init__(name, index, label)
        self.index = index
        self._wake = _WriterPosition(self)

    def wake_word(self) -> _WriterPosition:
        """This reader's eventcount on the writer's position, for a ``WakeSet`` that sleeps on the ring together
        with other words: a put wakes it only while it is armed (the sleeping flag raised)."""
        return self._wake

    @property
    def sleeping(self) -> bool:
        """Whether this reader's sleeping flag is raised (the writer then wakes it on every put)."""
        return bool(_native.load_u32(self.seg.buf, self._meta + layout.META_SLEEPING))

    def try_get(self) -> bytes | None:
        return self._port.try_get()

    @property
    def position(self) -> int:
        """This reader's byte position (it has read everything below it)."""
        return self._port.pos

    def spin_for(self, spin_s: float) -> bool:
        """Spin (then yield) up to ``spin_s`` for a message, never sleeping; whether one is there."""
        return bool(self._port.wait(0, spin_s, spin_s))

    def get(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> bytes:
        """The next message; block while the ring is empty, up to ``timeout_s``."""
        msg = self._port.try_get()
        if msg is not None:
            return msg
        self._wait_readable(timeout_s)
        msg = self._port.try_get()
        if msg is None:  # pragma: no cover - wait returned True, so a message is there
            raise AssertionError("ring reported a message that was not there")
        return msg

    def get_many(self, max_n: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> list[bytes]:
        """Between 1 and ``max_n`` messages; block until at least one is there."""
        got = self._port.try_get_many(max_n)
        if got or max_n <= 0:
            return got
        self._wait_readable(timeout_s)
        return self._port.try_get_many(max_n)

    def get_records_into(self, out: np.ndarray, timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
        """Copy between 1 and len(out) fixed-size records into ``out``; returns how many."""
        if not out.flags.c_contiguous or len(out) == 0:
            raise ValueError("get_records_into needs a non-empty C-contiguous array to fill")
        rec = out.itemsize * (int(np.prod(out.shape[1:])) if out.ndim > 1 else 1)
        raw = out.reshape(-1).view(np.uint8)
        n = self._port.try_get_records(raw, rec)
        if n:
            return int(n)
        self._wait_readable(timeout_s)
        return int(self._port.try_get_records(raw, rec))

    def _wait_readable(self, timeout_s: float) -> None:
        self._block(0, f"reading from an empty ring (reader {self.index})", lambda: [self._peer(-1)], timeout_s)


class _WriterPosition:
    """A reader's eventcount on the writer position (NOTE [ ring layout ] in mpkv.layout): the writer wakes only
    readers whose sleeping flag is set, so a sleeper raises its flag, fences, and looks at the position once more
    before it sleeps; a put that came before the flag was visible is seen there, one after it wakes the sleep."""

    def __init__(self, reader: RingReader) -> None:
        self._reader = reader
        self.word = Word(reader.seg.buf, layout.ring_writer_pos(_BASE))
        self._flag = reader._meta + layout.META_SLEEPING

    def arm(self) -> bool:
        """Raise the flag; False (flag lowered again) when there is something to read already."""
        buf = self._reader.seg.buf
        _native.store_u32(buf, self._flag, 1)
        _native.fence()
        if _native.load_u64(buf, self.word.off) != self._reader.position:
            _native.store_u32(buf, self._flag, 0)
            return False
        return True

    def disarm(self) -> None:
        _native.store_u32(self._reader.seg.buf, self._flag, 0)
