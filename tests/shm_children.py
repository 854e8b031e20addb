"""Child-process bodies for tests/test_shm_hardening.py (module level, so the spawn start method can import them).

Each child reports through a Pipe connection with ``procs.report``: ("ok", result) or ("error", type, message).
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import signal
import struct
import time
from multiprocessing.connection import Connection

from procs import Phase, report

from mpkv.shm.ring import RingReader, RingWriter

FUTEX_WAITV = 449  # the same number on x86-64 and aarch64
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
_SECCOMP_RET_ALLOW, _SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse_futex_waitv(errno_value: int) -> str | None:
    """Install a seccomp filter on this thread that makes futex_waitv fail with ``errno_value`` (what some
    container profiles do). Returns why it could not, or None once the refusal is seen in effect."""
    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        return f"no seccomp filter written for {platform.machine()}"
    program = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 1, 0, arch),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
        (_BPF_JEQ_K, 0, 1, FUTEX_WAITV),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno_value),
        (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
    ]
    raw = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
    fprog = _SockFprog(len(program), ctypes.cast(raw, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    zero = ctypes.c_ulong(0)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) != 0:
        return f"prctl(PR_SET_NO_NEW_PRIVS) failed: {os.strerror(ctypes.get_errno())}"
    if libc.prctl(_PR_SET_SECCOMP, ctypes.c_ulong(_SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) != 0:
        return f"prctl(PR_SET_SECCOMP) failed: {os.strerror(ctypes.get_errno())}"
    if libc.syscall(ctypes.c_long(FUTEX_WAITV), 0, 0, 0, 0, 0) != -1 or ctypes.get_errno() != errno_value:
        return "the seccomp filter is installed but futex_waitv is not refused"
    return None


def wait_any_refused(errno_value: int, wait_s: float, conn: Connection) -> None:
    """Under a filter refusing futex_waitv, wait on a word nobody changes for ``wait_s``, the way the actors do:
    call wait_any again, with what is left, whenever it returns. Reports CPU and wall time of that loop."""

    def body() -> dict[str, object]:
        from mpkv import _native

        why = refuse_futex_waitv(errno_value)
        if why is not None:
            return {"skip": why}
        word = bytearray(64)  # its u32 at offset 0 stays 0: nothing ever wakes us
        calls = 0
        cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        while (left := t0 + wait_s - time.monotonic()) > 0:
            _native.wait_any([(word, 0, 0)], left)
            calls += 1
        cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - t0
        cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        return {"cpu_s": cpu, "wall_s": wall, "calls": calls, "refused": _native.wait_any_refused()}

    report(conn, body)


def wait_any_fallback_wakes(errno_value: int, signals: str, conn: Connection) -> None:
    """Under the refusal, sleep on two words of a signal array: slot 0 (nobody writes it) first, slot 1 second.
    The parent writes slot 1; returns wait_any's result (1, or -2 if the write came before the call)."""

    def body() -> dict[str, object]:
        from mpkv import _native
        from mpkv.shm.signals import SignalArray

        why = refuse_futex_waitv(errno_value)
        if why is not None:
            return {"skip": why}
        arr = SignalArray(signals, Phase)
        try:
            buf = arr.seg.buf
            words = [(buf, arr.word(i).off, _native.load_u64(buf, arr.word(i).off) & 0xFFFFFFFF) for i in (0, 1)]
            conn.send("ready")
            rc = _native.wait_any(words, 60.0)
            return {"rc": rc, "refused": _native.wait_any_refused()}
        finally:
            arr.close()

    report(conn, body)


def die_mid_write(signals: str, slot: int, conn: Connection) -> None:
    """Claim ``slot``, write READY@3, then die between the two sequence stores of the next write (CLEARING@4):
    the sequence odd, the value of the new write stored, the epoch still the old one. Sends "dying" first."""
    from mpkv import _native
    from mpkv.shm.signals import SignalArray

    arr = SignalArray(signals, Phase)
    arr.writer(slot).write(Phase.READY, 3, aux=7)
    off, buf = arr.word(slot).off, arr.seg.buf
    conn.send("dying")
    conn.close()
    _native.store_u64(buf, off, _native.load_u64(buf, off) + 1)  # the first sequence store: odd
    _native.store_u64(buf, off + 8, int(Phase.CLEARING))  # the new value; the epoch word still says 3
    os.kill(os.getpid(), signal.SIGKILL)


def _endpoint(ring: str, endpoint: int) -> RingWriter | RingReader:
    return RingWriter(ring, label="claimer") if endpoint < 0 else RingReader(ring, endpoint, label="claimer")


def hold_endpoint_then_die(ring: str, endpoint: int, conn: Connection) -> None:
    """Claim the endpoint (-1: the writer, else reader i) and die by SIGKILL holding it (it stays ATTACHED)."""
    _endpoint(ring, endpoint)
    conn.send("held")
    conn.close()
    os.kill(os.getpid(), signal.SIGKILL)


def claim_endpoint_stopping_after_cas(ring: str, endpoint: int, conn: Connection) -> None:
    """Claim the endpoint, stopping itself (SIGSTOP) right after the winning compare-and-swap; once continued,
    finish the claim, report, and let go of the endpoint."""

    def body() -> int:
        from mpkv.shm import ring as ring_module

        ring_module.claim_hook = lambda stage: os.kill(os.getpid(), signal.SIGSTOP) if stage == "won" else None
        port = _endpoint(ring, endpoint)
        port.close()
        return os.getpid()

    report(conn, body)


def handle_for(i: int) -> bytes:
    """Handle i: epoch == weight version == i, nbytes and the name's length derived from i too, so a reader can
    tell a whole record from one that pairs fields (or bytes) of two writes."""
    import msgspec

    from mpkv.pool import PoolHandle

    return msgspec.msgpack.encode(PoolHandle("cpu", 0, i, i, i * 4096, name="n" * (i % 97)))


def rewrite_handles(blob: str, n: int, conn: Connection) -> None:
    """Rewrite record 0 of ``blob`` n times (handle 1..n), as a pool owner does at each restore."""

    def body() -> int:
        from mpkv.instance import HANDLE_RECORD_BYTES
        from mpkv.layout import SegmentKind
        from mpkv.shm.records import write_sync_record
        from mpkv.shm.segment import Segment

        seg = Segment.attach(blob, SegmentKind.BLOB)
        try:
            for i in range(1, n + 1):
                write_sync_record(seg, 0, HANDLE_RECORD_BYTES, handle_for(i))
        finally:
            seg.close()
        return n

    report(conn, body)


def die_writing_handle(blob: str, conn: Connection) -> None:
    """Write handle 1 whole, then die (SIGKILL) in the middle of writing handle 2: the record's sequence odd."""
    from mpkv import _native
    from mpkv.instance import HANDLE_RECORD_BYTES
    from mpkv.layout import SEGMENT_HEADER_BYTES, SegmentKind
    from mpkv.shm.records import write_sync_record
    from mpkv.shm.segment import Segment

    seg = Segment.attach(blob, SegmentKind.BLOB)
    write_sync_record(seg, 0, HANDLE_RECORD_BYTES, handle_for(1))
    conn.send("dying")
    conn.close()
    off = SEGMENT_HEADER_BYTES
    _native.store_u64(seg.buf, off, _native.load_u64(seg.buf, off) + 1)  # as write_sync_record does first
    seg.buf[off + 24 : off + 34] = b"\xff" * 10  # some bytes of the next handle
    os.kill(os.getpid(), signal.SIGKILL)


def die_inside_the_gate(ring: str, conn: Connection) -> None:
    """Become the ring's writer, enter its submission gate (as a client between its check and its put), and die
    there by SIGKILL: the gate word stays shut."""
    writer = RingWriter(ring, label="gated")
    with writer.gated():
        conn.send("inside")
        conn.close()
        os.kill(os.getpid(), signal.SIGKILL)
