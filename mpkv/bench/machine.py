"""What else ran on the machine while a benchmark measured, and whether it was quiet enough for a verdict.

One accounting for every benchmark (ipc, allreduce, rl, swap, pd, weights). A benchmark measures in windows
(``Noise.window``: around the timed part only, not around launches and teardowns); over each window:

  others  the machine's busy CPU time (/proc/stat: user, nice, system, irq, softirq) minus the benchmark's own:
          this process and its reaped children (getrusage) and the live processes it names (a launched
          instance's launcher and actors, all-reduce ranks; ``mpkv.shm.proc.cpu_seconds``) read at both ends. A
          named process must live through the window: one that exits inside it (and is no child reaped here)
          takes its time out of /proc, which then counts as others'. That errs towards "busy", never "quiet".
  steal   CPU time the hypervisor gave to other guests (/proc/stat's steal), apart from others.

Both are reported as % of the usable cores over the windows' wall time. A target gets a verdict (PASS or MISS)
only when others + steal <= QUIET_PCT (5 %) of the cores: a 2-core machine where another process took a tenth
of a core shifts a handshake's latency by more than the margins the targets are stated with, so a verdict
there would judge the neighbour, not mpkv. On a busier machine the value is printed with
"no verdict: the machine was busy (...)".
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from mpkv.shm.proc import cpu_seconds

QUIET_PCT = 5.0  # others + steal, % of the usable cores: at most this, and a target gets a verdict


@dataclass(frozen=True)
class Sample:
    """One reading: the machine's busy and stolen CPU seconds, the benchmark's own, the clock and the load."""

    busy_s: float
    steal_s: float
    ours_s: float
    wall_s: float
    loadavg: float


def sample(pids: Iterable[int] = ()) -> Sample:
    """Read the machine and our own CPU time now; ``pids``: live processes of ours beyond this one's children."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    hz = os.sysconf("SC_CLK_TCK")
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ours = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + sum(cpu_seconds(p) for p in pids)
    return Sample(
        (user + nice + system + irq + softirq) / hz, steal / hz, ours, time.perf_counter(), os.getloadavg()[0]
    )


def nproc() -> int:
    return len(os.sched_getaffinity(0))


@dataclass
class Noise:
    """Others' and stolen CPU seconds summed over the windows of a run, and the windows' wall time."""

    cores: int
    other_cpu_s: float = 0.0
    steal_s: float = 0.0
    wall_s: float = 0.0
    loadavg_start: float | None = None
    loadavg_end: float | None = None

    def add(self, a: Sample, b: Sample) -> None:
        # Not clamped here: /proc/stat counts in ticks, getrusage finer, so a quiet window may come out a little
        # below zero; the sum over the windows is clamped once (record), not biased by each window's rounding.
        self.other_cpu_s += (b.busy_s - a.busy_s) - (b.ours_s - a.ours_s)
        self.steal_s += b.steal_s - a.steal_s
        self.wall_s += b.wall_s - a.wall_s
        if self.loadavg_start is None:
            self.loadavg_start = a.loadavg
        self.loadavg_end = b.loadavg

    @contextmanager
    def window(self, pids: Iterable[int] = ()) -> Iterator[None]:
        """Count the body's time; ``pids`` must live through it (read at both ends)."""
        pids = list(pids)
        a = sample(pids)
        yield
        self.add(a, sample(pids))

    def record(self) -> dict[str, Any]:
        """The JSON form, with the percentages that ``line`` and ``verdict_line`` read."""
        span = max(self.wall_s, 1e-9) * self.cores
        other = max(self.other_cpu_s, 0.0)
        pct = {"other_pct": 100 * other / span, "steal_pct": 100 * self.steal_s / span}
        return asdict(self) | {"other_cpu_s": other} | pct | {"quiet_pct": QUIET_PCT}

    def line(self) -> str:
        return noise_line(self.record())


def noise_line(m: Mapping[str, Any]) -> str:
    """The machine line of a run from its ``Noise.record()``."""
    load = ""
    if m.get("loadavg_start") is not None:
        load = f"; load average {m['loadavg_start']:.2f} -> {m['loadavg_end']:.2f}"
    return (
        f"machine while measuring ({m['wall_s']:.1f} s): other processes used {m['other_pct']:.1f} % of the "
        f"{m['cores']} cores, the hypervisor stole {m['steal_pct']:.1f} % ({m['other_cpu_s']:.1f} and "
        f"{m['steal_s']:.1f} CPU-s){load}; "
        + ("quiet: targets get a verdict" if busy(m) is None else f"BUSY (over {QUIET_PCT:g} %): no verdicts")
    )


def busy(m: Mapping[str, Any]) -> str | None:
    """Why the machine of record ``m`` was too busy for a verdict, or None if it was quiet enough."""
    load = m["other_pct"] + m["steal_pct"]
    if load <= QUIET_PCT:
        return None
    return (
        f"other processes {m['other_pct']:.1f} % + steal {m['steal_pct']:.1f} % of the {m['cores']} cores "
        f"> {QUIET_PCT:g} %"
    )


def verdict(ok: bool, m: Mapping[str, Any]) -> str:
    """PASS or MISS on a quiet machine; on a busy one, no verdict and why."""
    why = busy(m)
    if why is not None:
        return f"no verdict: the machine was busy ({why})"
    return "PASS" if ok else "MISS"


def verdict_cell(ok: bool, m: Mapping[str, Any]) -> str:
    """``verdict`` for a table cell: the reason is the machine line's."""
    return "no verdict (busy)" if busy(m) else verdict(ok, m)


def verdict_line(target: str, measured: str, ok: bool, m: Mapping[str, Any]) -> str:
    """``target: TARGET: MEASURED -> PASS|MISS`` (or the busy machine's no-verdict)."""
    return f"target: {target}: {measured} -> {verdict(ok, m)}"


def machine_line(when: str, m: Mapping[str, Any]) -> str:
    """How busy the rest of the machine was ``when`` (a ``Machine.stop()`` record)."""
    return f"{when}: {noise_line(m)}"


class Machine:
    """One window over a run whose processes ``pids`` live through it (all-reduce ranks, a weights instance):
    ``stop()`` gives its ``Noise.record()``."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)
        self.start = sample(self.pids)

    def stop(self) -> dict[str, Any]:
        # Sampled before the processes exit: a reaped grandchild's time would leave /proc and count as others'.
        n = Noise(nproc())
        n.add(self.start, sample(self.pids))
        return n.record()
