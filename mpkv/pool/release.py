"""Did a clear give the device memory back? A judgement on NVML's per-process figures (``mpkv.gpumem``) taken
before and after a clear of the device tier, for every process of every rank (the owner and the attachers).

The owner's figure must drop by about the pool it freed; no process may hold noticeably more than it did after the
previous clear (its pool-less figure: a CUDA context and torch's cache, which are not the pool). A figure is
never compared against zero: every process with a CUDA context holds a few hundred MiB that no clear frees.
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE_BYTES = 64 << 20  # what a process may hold beyond its pool-less figure (allocator rounding, a graph pool)


@dataclass(frozen=True)
class Figures:
    """One process's NVML figures around a device clear; None: NVML has none (no NVML, or the pid not seen)."""

    who: str  # "worker r0"
    pid: int
    before: int | None
    after: int | None
    floor: int | None  # its figure after the previous device clear, if one was measured
    owner: bool  # it owned (allocated and freed) the pool


def leftovers(figures: list[Figures], pool_bytes: int, tolerance: int = TOLERANCE_BYTES) -> list[str]:
    """What a device clear left held, one sentence per process at fault; [] when every figure says it is gone."""
    from mpkv.gpumem import fmt_bytes

    out = []
    for f in figures:
        if f.before is None or f.after is None:
            continue
        if f.owner and f.before - f.after < pool_bytes - tolerance:
            out.append(
                f"{f.who} (pid {f.pid}) freed its {fmt_bytes(pool_bytes)} pool, but NVML shows it released only "
                f"{fmt_bytes(f.before - f.after)} ({fmt_bytes(f.before)} -> {fmt_bytes(f.after)}): the memory is "
                "still held"
            )
        elif f.floor is not None and f.after > f.floor + tolerance:
            out.append(
                f"{f.who} (pid {f.pid}) holds {fmt_bytes(f.after - f.floor)} more GPU memory than after the previous "
                f"clear ({fmt_bytes(f.floor)} -> {fmt_bytes(f.after)})"
            )
    return out
