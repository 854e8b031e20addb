"""`mpkv bench ipc`, the report: the results of a run, the machine it ran on and what else ran meanwhile, the
side-by-side table (ratios against mp.Queue), the targets, and the JSON record.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from mpkv.bench.ipc_measure import Idle, Rtt
from mpkv.bench.links import (
    BASELINE,
    MANY_BATCH,
    MSG_BYTES,
    RECORD_BATCH,
    RING,
    Params,
)
from mpkv.bench.machine import Noise, Sample, busy, nproc, sample


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


def cpu_now() -> Sample:
    """The start of the run's one window (the machine's and our CPU time: mpkv.bench.machine)."""
    return sample()


class Background(Noise):
    """What else ran during the run (mpkv.bench.machine's accounting, one window)."""

    @classmethod
    def since(cls, before: Sample, wall_s: float) -> Background:
        n = cls(nproc())
        n.add(before, sample())
        n.wall_s = wall_s  # the run's own clock (started with ``before``)
        return n


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
    why = busy(run.background.record())
    for t in run.targets():
        verdict = "n/a " if t.ok is None else "----" if why else "PASS" if t.ok else "MISS"
        lines.append(f"  {verdict}  {t.what}: {t.measured}")
    if why:
        lines.append(f"  no verdict: the machine was busy ({why})")
    lines.append(f"wall time: {run.wall_s:.1f} s")
    lines.append(run.background.line())
    return lines
