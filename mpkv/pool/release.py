"""Did a clear give the device memory back? A judgement on NVML's per-process figures (``mpkv.gpumem``) taken
before and after a clear of the device tier, for every process of every rank (the owner and the attachers).

The owner's figure must drop by about the pool it freed; no process may hold noticeably more after the clear than
before it. A figure is never compared against zero: every process with a CUDA context holds a few hundred MiB that
no clear frees. A figure of 0 means NVML lists the process nowhere (a container without the host's pid
namespace): like a figure NVML withholds (None), it is not judged. Attachers are not judged against their figure
before the pool existed: between two clears a worker may load weights and torch may cache memory, which a clear
does not free (``tools/gpu-check`` measures that figure on a quiet instance).
"""

from __future__ import annotations

from dataclasses import dataclass

TOLERANCE_BYTES = 64 << 20  # allocator rounding, a CUDA graph pool, the driver's own bookkeeping


@dataclass(frozen=True)
class Figures:
    """One process's NVML figures around a device clear; None or 0: NVML has none for it."""

    who: str  # "worker r0"
    pid: int
    before: int | None
    after: int | None
    owner: bool  # it owned (allocated and freed) the pool


def leftovers(figures: list[Figures], pool_bytes: int, tolerance: int = TOLERANCE_BYTES) -> list[str]:
    """What a device clear left held, one sentence per process at fault; [] when every figure says it is gone.
    The owner may keep at most a quarter of a small pool (else a pool under the tolerance could never fail)."""
    from mpkv.gpumem import fmt_bytes

    kept = min(tolerance, pool_bytes // 4)
    out = []
    for f in figures:
        if not f.before or not f.after:
            continue
        if f.owner and f.before - f.after < pool_bytes - kept:
            out.append(
                f"{f.who} (pid {f.pid}) freed its {fmt_bytes(pool_bytes)} pool, but NVML shows it released only "
                f"{fmt_bytes(f.before - f.after)} ({fmt_bytes(f.before)} -> {fmt_bytes(f.after)}): the memory is "
                "still held"
            )
        elif f.after > f.before + tolerance:
            out.append(
                f"{f.who} (pid {f.pid}) holds {fmt_bytes(f.after - f.before)} more GPU memory after the clear than "
                f"before it ({fmt_bytes(f.before)} -> {fmt_bytes(f.after)})"
            )
    return out
