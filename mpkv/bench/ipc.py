"""`mpkv bench ipc`: the mpkv SPSC ring side by side with the usual Python IPC, in one run, as a ratio table.

Measured, each with its own child process (start method ``spawn``):

- round trip p50/p99, 64 B and 4 KiB: the parent sends, an echo child sends it back, one sample per trip;
- one-way throughput: a child puts 64-B messages one by one, the parent gets them one by one and checks the
  sequence number in each; msgs/s from the first message to the last, at the consumer;
- the ring's batched paths: ``put_records``/``get_records_into`` of (4096, 64) uint8 arrays, and
  ``put_many``/``get_many`` of 256 x 64 B;
- the CPU time of a reader blocked on an empty ring.

Baselines: ``multiprocessing.Queue`` (two queues), ``multiprocessing.Pipe`` (duplex), ``faster_fifo.Queue``
(two queues) and ZeroMQ PAIR sockets over ``ipc://``; the last two are bench extras, a row says "not
installed" when they are missing. Every wait is bounded by ``TIMEOUT_S``; every child is joined or
terminated and every shared-memory name and socket file removed, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from multiprocessing import resource_tracker
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from typing import Any

import numpy as np

from mpkv.bench.links import (
    ACK,
    BASELINE,
    CTX,
    FULL,
    MANY_BATCH,
    MSG_BYTES,
    QUICK,
    RECORD_BATCH,
    RECORD_RING_BYTES,
    RING,
    RING_BYTES,
    SIZES,
    STOP,
    TIMEOUT_S,
    TRANSPORTS,
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
    proc = CTX.Process(target=target, args=args, daemon=True, name=f"mpkv-bench:{target.__name__}")
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


# -- the run ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    transport: str
    status: str = "ok"  # "ok", "not installed (...)", or "failed: ..."
    rtt: dict[int, Rtt] = field(default_factory=dict)
    msgs_per_s: float | None = None


@dataclass
class Extras:
    records_per_s: float | None = None
    many_per_s: float | None = None
    idle: Idle | None = None
    errors: list[str] = field(default_factory=list)


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _attempt(what: str, fn: Callable[[], Any], errors: list[str]) -> Any:
    """Run one measurement; a failure (not Ctrl-C) is recorded and the run goes on with the others."""
    _progress(what)
    try:
        return fn()
    except Exception as e:
        timed_out = type(e).__name__ in ("Empty", "Again")  # queue.Empty (both queues), zmq.Again
        why = f"nothing received within {TIMEOUT_S:g} s" if timed_out else str(e)
        errors.append(f"{what}: {type(e).__name__}: {why}")
        return None


def run_transport(t: Transport, p: Params) -> Row:
    row = Row(t.name)
    if (why := t.missing()) is not None:
        row.status = why
        return row
    errors: list[str] = []
    row.rtt = _attempt(f"{t.name}: round trips", partial(measure_rtt, t, p), errors) or {}
    row.msgs_per_s = _attempt(f"{t.name}: one-way stream", partial(measure_stream, t, p), errors)
    if errors:
        row.status = "failed: " + "; ".join(e.removeprefix(f"{t.name}: ") for e in errors)
    return row


def run_extras(p: Params) -> Extras:
    ex = Extras()
    ex.records_per_s = _attempt("ring: put_records", partial(measure_records, p), ex.errors)
    ex.many_per_s = _attempt("ring: put_many / get_many", partial(measure_many, p), ex.errors)
    ex.idle = _attempt(f"ring: idle blocked reader, {p.idle_s:g} s", partial(measure_idle, p), ex.errors)
    return ex


# -- report -------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "spin_us": os.environ.get("MPKV_SPIN_US", "50 (default)"),
    }


def _rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1e6:.2f} M/s" if v >= 1e6 else f"{v / 1e3:.0f} k/s"


def _ratio(num: float | None, den: float | None) -> str:
    return "-" if not num or not den else f"{num / den:.1f}x"


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def _rtt_cell(row: Row, size: int) -> str:
    r = row.rtt.get(size)
    return "-" if r is None else f"{r.p50_us:.1f} / {r.p99_us:.1f}"


def _p50(row: Row | None, size: int) -> float | None:
    r = row.rtt.get(size) if row else None
    return r.p50_us if r else None


HEAD = (
    "transport",
    "RTT 64 B p50/p99 us",
    "RTT 4 KiB p50/p99 us",
    "one-way 64 B",
    "RTT 64 B vs Queue",
    "RTT 4 KiB vs Queue",
    "one-way vs Queue",
)


def _cells(row: Row, base: Row | None) -> list[str]:
    if row.status.startswith("not installed"):
        return [row.transport, row.status]
    return [
        row.transport,
        _rtt_cell(row, 64),
        _rtt_cell(row, 4096),
        _rate(row.msgs_per_s),
        _ratio(_p50(base, 64), _p50(row, 64)),
        _ratio(_p50(base, 4096), _p50(row, 4096)),
        _ratio(row.msgs_per_s, base.msgs_per_s if base else None),
    ]


def table(rows: list[Row]) -> list[str]:
    """The side-by-side table; a ratio says how many times better than mp.Queue (higher is better)."""
    base = next((r for r in rows if r.transport == BASELINE), None)
    grid = [list(HEAD), *(_cells(r, base) for r in rows)]
    widths = [max(len(c[i]) for c in grid if len(c) == len(HEAD) or i == 0) for i in range(len(HEAD))]
    lines = []
    for c in grid:
        cols = [x.rjust(w) for x, w in zip(c[1:], widths[1:], strict=False)] if len(c) == len(HEAD) else c[1:]
        lines.append("  ".join([c[0].ljust(widths[0]), *cols]))
    lines.insert(1, "-" * len(lines[0]))
    lines.append("ratios: RTT = mp.Queue p50 / this p50; one-way = this rate / mp.Queue rate")
    lines += [f"  {r.transport}: {r.status}" for r in rows if r.status.startswith("failed")]
    return [*lines, *_sleep_note(next((r for r in rows if r.transport == RING), None))]


def _sleep_note(ring: Row | None) -> list[str]:
    """How often the ring's round trips went to sleep: ~0 when its spin catches the echo, ~1 when it does not."""
    if ring is None or not ring.rtt:
        return []
    per = ", ".join(f"{r.sleeps_per_trip:.2f} ({_size(size)})" for size, r in ring.rtt.items())
    lines = [f"ring round trips that slept in the parent, per trip: {per}"]
    if max(r.sleeps_per_trip for r in ring.rtt.values()) > 0.5:
        lines.append(
            "  most waits outlasted the spin (MPKV_SPIN_US) and slept: typically parent and echo child on one "
            "core (the other one busy, or the scheduler keeping them together), where a spin only delays the peer"
        )
    return lines


def _cpu_now() -> tuple[float, float, float]:
    """(CPU seconds of the whole machine, of which stolen by the hypervisor, of this process and its reaped
    children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    hz = os.sysconf("SC_CLK_TCK")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    return (user + nice + system + irq + softirq) / hz, steal / hz, own


@dataclass
class Background:
    """What else ran during the run: the CPU time of other processes, and what the hypervisor stole."""

    other_cpu_s: float
    steal_s: float
    wall_s: float

    @classmethod
    def since(cls, before: tuple[float, float, float], wall_s: float) -> Background:
        busy, steal, own = (b - a for a, b in zip(before, _cpu_now(), strict=True))
        return cls(max(busy - own, 0.0), steal, wall_s)

    def describe(self, nproc: int) -> str:
        other, stolen = (100 * x / (self.wall_s * nproc) for x in (self.other_cpu_s, self.steal_s))
        text = (
            f"meanwhile other processes used {other:.0f} % of the {nproc} cores and the hypervisor stole "
            f"{stolen:.0f} % ({self.other_cpu_s:.1f} and {self.steal_s:.1f} CPU-s)"
        )
        return text + (": expect noisier numbers than on a quiet machine" if max(other, stolen) > 5 else "")


@dataclass
class Target:
    what: str
    measured: str
    ok: bool | None  # None: not measured


def _target(what: str, value: float | None, shown: str, ok: Callable[[float], bool]) -> Target:
    return Target(what, shown if value is not None else "-", None if value is None else ok(value))


@dataclass
class Run:
    command: str
    machine: dict[str, Any]
    quick: bool
    params: Params
    rows: list[Row]
    extras: Extras
    wall_s: float
    background: Background

    def targets(self) -> list[Target]:
        by = {r.transport: r for r in self.rows}
        ring, queue = _p50(by[RING], 64), _p50(by[BASELINE], 64)
        rtt_x = queue / ring if ring and queue else None
        stream, records = by[RING].msgs_per_s, self.extras.records_per_s
        idle = self.extras.idle.percent if self.extras.idle else None
        return [
            _target(
                "ring RTT p50 (64 B) at least 20x lower than mp.Queue's",
                rtt_x,
                f"{rtt_x or 0:.1f}x ({ring or 0:.1f} vs {queue or 0:.1f} us)",
                lambda x: x >= 20,
            ),
            _target(
                "at least 1 M unbatched 64-B messages/s (ring, one-way)",
                stream,
                _rate(stream),
                lambda x: x >= 1e6,
            ),
            _target("at least 30 M 64-B records/s batched", records, _rate(records), lambda x: x >= 30e6),
            _target("idle blocked reader under 2 % of a core", idle, f"{idle or 0:.2f} %", lambda x: x < 2.0),
        ]

    def failed(self) -> bool:
        return bool(self.extras.errors) or any(r.status.startswith("failed") for r in self.rows)

    def as_json(self) -> dict[str, Any]:
        ex = self.extras
        return {
            **asdict(self),
            "idle_percent_of_core": ex.idle.percent if ex.idle else None,
            "targets": [asdict(t) for t in self.targets()],
        }


def header(command: str, mach: dict[str, Any], p: Params, quick: bool) -> list[str]:
    kind = "QUICK (a smoke run, not for the record)" if quick else "full"
    return [
        f"command: {command}",
        f"machine: {mach['nproc']} cores usable ({mach['cpu_count']} online), {mach['cpu_model']}",
        f"         Python {mach['python']}, numpy {mach['numpy']}, {mach['platform']}",
        f"run: {kind}; start method spawn; MPKV_SPIN_US={mach['spin_us']}",
        f"     round trips: {p.rtt_n} timed per size after {p.rtt_warmup} warm-up; one-way: {p.stream_n} "
        "messages per transport, one put and one get each, every sequence number checked",
    ]


def report(run: Run) -> list[str]:
    ex, p, nproc = run.extras, run.params, run.machine["nproc"]
    idle = ex.idle
    scope = "" if nproc == 2 else f"; this run had {nproc} usable"
    lines = [
        *table(run.rows),
        "",
        f"ring put_records / get_records_into, ({RECORD_BATCH}, {MSG_BYTES}) uint8 arrays, "
        f"{p.record_batches * RECORD_BATCH} records: {_rate(ex.records_per_s)} records",
        f"ring put_many / get_many, {MANY_BATCH} x {MSG_BYTES} B per call, {p.many_n} messages: "
        f"{_rate(ex.many_per_s)} messages",
        "ring idle blocked reader: "
        + (f"{idle.percent:.2f} % of a core ({idle.cpu_s * 1e3:.1f} ms CPU in {idle.wall_s:.2f} s)" if idle else "-"),
        *(f"  failed: {e}" for e in ex.errors),
        "",
        f"targets (stated for a 2-core machine{scope}{'; quick run: indicative only' if run.quick else ''}):",
    ]
    for t in run.targets():
        verdict = "n/a " if t.ok is None else "PASS" if t.ok else "MISS"
        lines.append(f"  {verdict}  {t.what}: {t.measured}")
    lines.append(f"wall time: {run.wall_s:.1f} s")
    lines.append(run.background.describe(nproc))
    return lines


def main(args: argparse.Namespace) -> int:
    quick = bool(getattr(args, "quick", False))
    p = QUICK if quick else FULL
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    mach = machine()
    print("\n".join([*header(command, mach, p, quick), ""]), flush=True)
    t0, cpu0 = time.perf_counter(), _cpu_now()
    rows = [run_transport(t, p) for t in TRANSPORTS]
    extras = run_extras(p)
    wall_s = time.perf_counter() - t0
    run = Run(command, mach, quick, p, rows, extras, wall_s, Background.since(cpu0, wall_s))
    print("\n".join(report(run)), flush=True)
    if getattr(args, "json", None):
        with open(args.json, "w") as f:
            json.dump(run.as_json(), f, indent=2)
            f.write("\n")
    return 1 if run.failed() else 0
