"""`mpkv bench ipc`, the measurements: the child processes (echo, stream, ring writers, an idle reader), how
they are started and always stopped, and each timed loop. Every wait is bounded by ``TIMEOUT_S``; every child
is joined or terminated, and every shared-memory name removed, also on error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from mpkv import naming
from mpkv.bench.links import (
    ACK,
    CTX,
    MANY_BATCH,
    MSG_BYTES,
    RECORD_BATCH,
    RECORD_RING_BYTES,
    RING_BYTES,
    SIZES,
    STOP,
    TIMEOUT_S,
    BenchError,
    Link,
    Params,
    Port,
    Transport,
    _registry,
)
from mpkv.shm.ring import RingReader, RingWriter, create_ring


def _echo_child(link: type[Link], args: tuple[Any, ...]) -> None:
    port = link.child_port(args)
    try:
        recv, send = port.recv, port.send
        while msg := recv():
            send(msg)
    finally:
        port.close()


def _stream_child(link: type[Link], args: tuple[Any, ...], count: int) -> None:
    """Put ``count`` 64-B messages, one call each, numbered 0.. in their first 8 bytes; then STOP."""
    port = link.child_port(args)
    try:
        send, pad = port.send, bytes(MSG_BYTES - 8)
        for i in range(count):
            send(i.to_bytes(8, "little") + pad)
        send(STOP)
        if port.recv() != ACK:
            raise BenchError("the consumer did not acknowledge the stream")
    finally:
        port.close()


def _numbered(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A (batch, 64) uint8 array and a view of the u64 sequence number at the start of each row."""
    arr = np.zeros((batch, MSG_BYTES), np.uint8)
    return arr, arr.view("<u8")[:, 0]


def _records_child(name: str, batches: int) -> None:
    with RingWriter(name, label="bench-records") as w:
        arr, seq = _numbered(RECORD_BATCH)
        base = np.arange(RECORD_BATCH, dtype=np.uint64)
        for k in range(batches):
            np.add(base, np.uint64(k * RECORD_BATCH), out=seq)
            w.put_records(arr, TIMEOUT_S)


def _many_child(name: str, count: int) -> None:
    with RingWriter(name, label="bench-many") as w:
        arr, seq = _numbered(MANY_BATCH)
        base = np.arange(MANY_BATCH, dtype=np.uint64)
        rows = [memoryview(row) for row in arr]  # 256 buffers of 64 B, renumbered in place per batch
        for k in range(count // MANY_BATCH):
            np.add(base, np.uint64(k * MANY_BATCH), out=seq)
            w.put_many(rows, TIMEOUT_S)


def _idle_child(name: str, ready: Event, out: Any) -> None:
    """Block in ``get`` on an empty ring; record the CPU seconds and wall seconds that took."""
    with RingReader(name, label="bench-idle") as r:
        ready.set()
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        r.get(timeout_s=TIMEOUT_S + 60)
        ru1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    out[0] = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    out[1] = t1 - t0


@contextlib.contextmanager
def _sigint_ignored_by_child() -> Iterator[None]:
    """A child started in here ignores Ctrl-C from its first instruction (SIG_IGN survives exec): Ctrl-C is
    the parent's to handle, and the parent stops its children. A Ctrl-C meanwhile stays pending (blocked, and
    a blocked signal is never discarded) and interrupts the parent right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    resource_tracker.ensure_running()  # else its first start unblocks SIGINT in the middle of ours
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _child(target: Callable[..., None], *args: Any, link: Link | None = None) -> Iterator[BaseProcess]:
    """Start a spawned child; on the way out stop it whatever happened (terminate, then kill)."""
    proc = CTX.Process(target=target, args=args, daemon=True, name=naming.bench_process(target.__name__))
    with _sigint_ignored_by_child():
        proc.start()
    try:
        if link is not None:
            link.started()
        yield proc
    finally:
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)
        if not proc.is_alive():
            proc.close()


def _finish(proc: BaseProcess) -> None:
    """The child was told to stop: it must exit cleanly, soon."""
    proc.join(TIMEOUT_S)
    if proc.exitcode != 0:
        state = "is still running" if proc.exitcode is None else f"exited with code {proc.exitcode}"
        raise BenchError(f"child {proc.name} {state}")


# -- measurements -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No collector pauses inside a timed loop (the same for every transport)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@dataclass
class Rtt:
    p50_us: float
    p99_us: float
    sleeps_per_trip: float  # the parent's voluntary context switches per timed round trip (~0: spinning won)


def _ping_pong(port: Port, size: int, n: int, warmup: int) -> Rtt:
    send, recv, clock = port.send, port.recv, time.perf_counter_ns
    payload = os.urandom(size)
    for _ in range(warmup):
        send(payload)
        if recv() != payload:
            raise BenchError(f"echo of {size} B came back altered")
    samples = np.empty(n, np.int64)
    bad = 0
    csw0 = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    with _no_gc():
        for i in range(n):
            t0 = clock()
            send(payload)
            reply = recv()
            samples[i] = clock() - t0
            bad += reply != payload
    sleeps = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - csw0) / n
    if bad:
        raise BenchError(f"{bad} of {n} echoes of {size} B came back altered")
    p50, p99 = np.percentile(samples, [50, 99]) / 1e3
    return Rtt(float(p50), float(p99), sleeps)


def measure_rtt(t: Transport, p: Params) -> dict[int, Rtt]:
    with t.link() as link, _child(_echo_child, t.link, link.child_args(), link=link) as proc:
        port = link.parent_port()
        try:
            out = {size: _ping_pong(port, size, p.rtt_n, p.rtt_warmup) for size in SIZES}
            port.send(STOP)
        finally:
            port.close()
        _finish(proc)
    return out


def _consume_stream(port: Port, count: int) -> float:
    """Receive exactly ``count`` numbered messages then STOP; msgs/s between the first and the last."""
    recv, clock = port.recv, time.perf_counter_ns
    first = recv()
    t0 = clock()
    if first[:8] != bytes(8):
        raise BenchError(f"first message is numbered {int.from_bytes(first[:8], 'little')}, not 0")
    with _no_gc():
        for i in range(1, count):
            msg = recv()
            if int.from_bytes(msg[:8], "little") != i or len(msg) != MSG_BYTES:
                got = int.from_bytes(msg[:8], "little")
                raise BenchError(f"message {i} is numbered {got} and {len(msg)} B: lost, reordered or corrupted")
        t1 = clock()
    last = recv()
    if last != STOP:
        raise BenchError(f"a message after the {count} sent (numbered {int.from_bytes(last[:8], 'little')})")
    return (count - 1) / (t1 - t0) * 1e9


def measure_stream(t: Transport, p: Params) -> float:
    with t.link() as link, _child(_stream_child, t.link, link.child_args(), p.stream_n, link=link) as proc:
        port = link.parent_port()
        try:
            rate = _consume_stream(port, p.stream_n)
            port.send(ACK)
        finally:
            port.close()
        _finish(proc)
    return rate


class _Sequence:
    """Checks that each block of sequence numbers continues the last one: nothing lost, repeated, reordered."""

    def __init__(self, what: str, batch: int) -> None:
        self.what = what
        self.next = 0
        self._offsets = np.arange(batch, dtype=np.uint64)
        self._diff = np.empty(batch, np.uint64)

    def check(self, seq: np.ndarray) -> int:
        n = len(seq)
        diff = self._diff[:n]
        np.subtract(seq, self._offsets[:n], out=diff)  # all equal to self.next iff seq is next, next+1, ...
        if not (diff == self.next).all():
            raise BenchError(f"{self.what} {self.next}..{self.next + n - 1}: lost, repeated or corrupted")
        self.next += n
        return n


def _drained(reader: RingReader, proc: BaseProcess, what: str) -> None:
    """After the writer exited: nothing beyond what it was told to write."""
    _finish(proc)
    extra = reader.try_get()
    if extra is not None:
        raise BenchError(f"{what}: the ring holds a message beyond the count sent ({len(extra)} B)")


def measure_records(p: Params) -> float:
    """Records/s through put_records / get_records_into, at the consumer, first batch to last."""
    total = p.record_batches * RECORD_BATCH
    with _registry() as reg:
        seg = create_ring(reg, "records", RECORD_RING_BYTES)
        try:
            with (
                RingReader(seg.name, label="bench") as r,
                _child(_records_child, seg.name, p.record_batches) as proc,
            ):
                out, seq = _numbered(RECORD_BATCH)
                numbers = _Sequence("records", RECORD_BATCH)
                first = numbers.check(seq[: r.get_records_into(out, TIMEOUT_S)])
                t0 = t1 = time.perf_counter_ns()
                while numbers.next < total:
                    n = r.get_records_into(out[: total - numbers.next], TIMEOUT_S)
                    t1 = time.perf_counter_ns()
                    numbers.check(seq[:n])
                _drained(r, proc, "records")
        finally:
            reg.release(seg)
    return (total - first) / max(t1 - t0, 1) * 1e9


def measure_many(p: Params) -> float:
    """Messages/s through put_many / get_many (batches of MANY_BATCH 64-B messages), at the consumer."""
    total = p.many_n // MANY_BATCH * MANY_BATCH
    with _registry() as reg:
        seg = create_ring(reg, "many", RING_BYTES)
        try:
            with RingReader(seg.name, label="bench") as r, _child(_many_child, seg.name, total) as proc:
                numbers = _Sequence("put_many messages", MANY_BATCH)
                first, t0, t1 = 0, 0, 0
                while numbers.next < total:
                    batch = r.get_many(min(MANY_BATCH, total - numbers.next), TIMEOUT_S)
                    t1 = time.perf_counter_ns()
                    if not first:
                        first, t0 = len(batch), t1
                    raw = b"".join(batch)
                    if len(raw) != MSG_BYTES * len(batch):
                        raise BenchError(f"get_many: a message after {numbers.next} is not {MSG_BYTES} B")
                    numbers.check(np.frombuffer(raw, "<u8")[:: MSG_BYTES // 8])
                _drained(r, proc, "put_many")
        finally:
            reg.release(seg)
    return (total - first) / max(t1 - t0, 1) * 1e9


@dataclass
class Idle:
    cpu_s: float
    wall_s: float

    @property
    def percent(self) -> float:
        return 100.0 * self.cpu_s / self.wall_s


def measure_idle(p: Params) -> Idle:
    """A child blocks in RingReader.get on an empty ring for ``idle_s``; one message then releases it."""
    with _registry() as reg:
        seg = create_ring(reg, "idle", RING_BYTES)
        try:
            ready, out = CTX.Event(), CTX.RawArray("d", 2)
            with RingWriter(seg.name, label="bench") as w, _child(_idle_child, seg.name, ready, out) as proc:
                if not ready.wait(TIMEOUT_S):
                    raise BenchError(f"the idle reader did not attach within {TIMEOUT_S:g} s")
                time.sleep(p.idle_s)
                w.put(b"wake up", TIMEOUT_S)
                _finish(proc)
        finally:
            reg.release(seg)
    return Idle(out[0], out[1])
