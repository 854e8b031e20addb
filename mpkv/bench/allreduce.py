"""The shared-memory all-reduce (``mpkv.shm.allreduce``) side by side with torch.distributed's gloo, in one run.

``python -m mpkv.bench.allreduce [--tp 2] [--quick] [--json FILE]``

TP processes (start method ``spawn``, ``torch.set_num_threads(1)``) each hold both: an ``AllReduce`` on a
segment of a fresh registry, and a gloo process group (``init_process_group`` over a ``file://`` store in a
private temporary directory, with a deadline). Sizes are a decode step's (batch 1 and 8 of hidden 256 and
2048) and a prefill chunk's (256 tokens of hidden 256 and 2048), float32. Per size, each rank first reduces
the same seeded partials once with each and checks the bits against the rank-ordered sum (the run fails on a
difference), then times ``iters`` all-reduces per repeat, shm and gloo alternating which goes first. Every
all-reduce is timed on its own, its input refilled outside the timed span (an in-place sum would otherwise
double the values every call); the row reports rank 0's median (and 90th percentile) over all timed calls,
and the spread of the per-repeat medians. How busy the rest of the machine was is reported with the numbers:
other processes' CPU and the hypervisor's steal, as % of the cores (mpkv.bench.machine).

Every wait is bounded (the all-reduce's own deadline, gloo's timeout, the parent's wait for its children);
the children are joined or killed, the process group destroyed, and every shared-memory name unlinked, on
every path.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import torch

from mpkv import naming
from mpkv.bench import all_equal, emit
from mpkv.bench.links import CTX
from mpkv.bench.machine import Machine, noise_line
from mpkv.shm.allreduce import AllReduce, create_allreduce
from mpkv.shm.registry import Registry

# (label, tokens, hidden): what a layer of a TP=2 Llama reduces per step.
CASES = (
    ("decode b1 h256", 1, 256),
    ("decode b1 h2048", 1, 2048),
    ("decode b8 h256", 8, 256),
    ("decode b8 h2048", 8, 2048),
    ("prefill 256 x h256", 256, 256),
    ("prefill 256 x h2048", 256, 2048),
)
MAX_BYTES = 256 * 2048 * 4  # the largest case in one generation
TIMEOUT_S = 60.0  # every collective's deadline; the parent waits a little longer for the children
RUN_TIMEOUT_S = 600.0  # the whole run takes well under a minute on two cores
SEED = 0


@dataclass(frozen=True)
class Plan:
    tp: int
    repeats: int
    iters: tuple[int, ...]  # timed calls per repeat, per case


def iters_for(nbytes: int, quick: bool) -> int:
    """Enough calls that a repeat takes a few tens of ms at gloo's pace, without the big cases dominating."""
    n = 400 if nbytes <= 64 * 1024 else 100 if nbytes <= 512 * 1024 else 40
    return max(10, n // 5) if quick else n


def partial(rank: int, case: int, numel: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED * 1_000_003 + case * 1009 + rank)
    return torch.randn(numel, generator=g)


# -- the ranks ----------------------------------------------------------------------------------------------


def _check_bits(ar: AllReduce, dist: Any, tp: int, rank: int, case: int, numel: int) -> bool:
    """Both reduce the same partials once; both must give the rank-ordered sum (a + b is one rounding at TP=2,
    so gloo's order does not matter there; beyond TP=2 only mpkv's result is held to it)."""
    want = partial(0, case, numel)
    for r in range(1, tp):
        want += partial(r, case, numel)
    mine, theirs = partial(rank, case, numel), partial(rank, case, numel)
    ar(mine)
    dist.all_reduce(theirs)
    return torch.equal(mine, want) and (tp > 2 or torch.equal(theirs, want))


def _timed(op: Any, t: torch.Tensor, src: torch.Tensor, iters: int) -> list[float]:
    """Per-call seconds of ``iters`` calls; the refill of the input is outside the timed span."""
    out = []
    op(t.copy_(src))  # untimed: the ranks line up here
    for _ in range(iters):
        t.copy_(src)
        t0 = time.perf_counter()
        op(t)
        out.append(time.perf_counter() - t0)
    return out


def _measure(ar: AllReduce, dist: Any, plan: Plan, rank: int) -> list[dict[str, Any]]:
    rows = []
    for case, (_, tokens, hidden) in enumerate(CASES):
        numel = tokens * hidden
        equal = _check_bits(ar, dist, plan.tp, rank, case, numel)
        src, t = partial(rank, case, numel), torch.empty(numel)
        ops = {"shm": ar, "gloo": dist.all_reduce}
        samples: dict[str, list[list[float]]] = {"shm": [], "gloo": []}
        for rep in range(plan.repeats):
            for who in ("shm", "gloo") if rep % 2 == 0 else ("gloo", "shm"):
                samples[who].append(_timed(ops[who], t, src, plan.iters[case]))
        rows.append({"equal": equal, "samples": samples})
    return rows


def rank_main(name: str, store: str, plan: Plan, rank: int, conn: Connection) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank: TP=2 fills this machine's two
    try:
        ar = AllReduce(name, rank, timeout_s=TIMEOUT_S)
        try:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{store}",
                rank=rank,
                world_size=plan.tp,
                timeout=datetime.timedelta(seconds=TIMEOUT_S),
            )
            try:
                conn.send(("ok", _measure(ar, dist, plan, rank)))
            finally:
                dist.destroy_process_group()
        finally:
            ar.close()
    except BaseException as e:
        conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


# -- the parent ---------------------------------------------------------------------------------------------


def _collect(kids: list[tuple[BaseProcess, Connection]], deadline_s: float) -> list[Any]:
    """Every rank's result, or a RuntimeError quoting the first rank that failed or went quiet."""
    out = []
    end = time.monotonic() + deadline_s
    for rank, (proc, conn) in enumerate(kids):
        if not conn.poll(max(0.0, end - time.monotonic())):
            raise RuntimeError(f"rank {rank} (pid {proc.pid}, alive: {proc.is_alive()}) sent nothing in time")
        try:
            msg = conn.recv()
        except EOFError:
            proc.join(5)
            raise RuntimeError(f"rank {rank} (pid {proc.pid}) exited without a result (code {proc.exitcode})") from None
        if msg[0] != "ok":
            raise RuntimeError(msg[1])
        out.append(msg[1])
    return out


def _stop(kids: list[tuple[BaseProcess, Connection]]) -> None:
    for proc, conn in kids:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        conn.close()


def _run_ranks(name: str, store: str, plan: Plan) -> tuple[list[Any], dict[str, float]]:
    kids: list[tuple[BaseProcess, Connection]] = []
    try:
        for rank in range(plan.tp):
            mine, theirs = CTX.Pipe(duplex=False)
            proc = CTX.Process(target=rank_main, args=(name, store, plan, rank, theirs), daemon=True)
            proc.start()
            theirs.close()
            kids.append((proc, mine))
        machine = Machine([p.pid for p, _ in kids if p.pid is not None])
        # A backstop only: a rank that dies or stalls is named by the others' collectives within TIMEOUT_S.
        results = _collect(kids, RUN_TIMEOUT_S)
        return results, machine.stop()
    finally:
        _stop(kids)


def bench(plan: Plan) -> dict[str, Any]:
    reg = Registry.create(f"bench-allreduce-{os.getpid()}")
    tmp = naming.private_scratch_dir("allreduce")  # gloo's file store is nobody else's
    try:
        seg = create_allreduce(reg, "allreduce", plan.tp, MAX_BYTES)
        try:
            results, machine = _run_ranks(seg.name, os.path.join(tmp, "gloo-store"), plan)
        finally:
            reg.release(seg)
    finally:
        reg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "torch": torch.__version__,
        "tp": plan.tp,
        "repeats": plan.repeats,
        "cpus": os.cpu_count(),
        "machine": machine,
        "rows": [_row(i, [r[i] for r in results], plan) for i in range(len(CASES))],
    }


def _row(case: int, per_rank: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    label, tokens, hidden = CASES[case]
    row: dict[str, Any] = {
        "case": label,
        "elements": tokens * hidden,
        "bytes": tokens * hidden * 4,
        "iters": plan.iters[case],
        "equal": all(r["equal"] for r in per_rank),
    }
    for who in ("shm", "gloo"):
        reps = per_rank[0]["samples"][who]  # rank 0's view: a call ends when it has every rank's partial
        flat = sorted(s for rep in reps for s in rep)
        medians = [statistics.median(rep) * 1e6 for rep in reps]
        row[who] = {
            "median_us": statistics.median(flat) * 1e6,
            "p90_us": flat[int(0.9 * (len(flat) - 1))] * 1e6,
            "repeat_medians_us": medians,
        }
    return row


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n < 1 << 20 else f"{n / (1 << 20):g} MiB"


def report(r: dict[str, Any]) -> list[str]:
    m = r["machine"]
    lines = [
        f"all-reduce (sum, float32, in place) at TP={r['tp']}: mpkv shared memory vs torch.distributed gloo "
        f"(file:// store); torch {r['torch']}",
        f"{r['tp']} spawned ranks, torch.set_num_threads(1) each; {r['cpus']} CPUs; per call, rank 0: median "
        f"(p90) over {r['repeats']} interleaved repeats, and the range of the per-repeat medians",
        "",
        "| case | elements | bytes | shm us: median (p90) | shm repeat medians | gloo us: median (p90) "
        "| gloo repeat medians | gloo / shm | bits = rank-ordered sum |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        a, b = row["shm"], row["gloo"]
        lines.append(
            f"| {row['case']} | {row['elements']} | {_size(row['bytes'])} | {a['median_us']:.1f} ({a['p90_us']:.1f})"
            f" | {min(a['repeat_medians_us']):.1f}-{max(a['repeat_medians_us']):.1f} | {b['median_us']:.1f} "
            f"({b['p90_us']:.1f}) | {min(b['repeat_medians_us']):.1f}-{max(b['repeat_medians_us']):.1f} | "
            f"{b['median_us'] / a['median_us']:.1f}x | {'yes' if row['equal'] else 'NO'} |"
        )
    lines += ["", noise_line(m)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpkv.bench.allreduce", description=__doc__.split("\n")[0])
    p.add_argument("--tp", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats per case (default 5)")
    p.add_argument("--quick", action="store_true", help="a fifth of the calls and 3 repeats (a smoke run, noisy)")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.tp < 2:
        p.error("--tp must be at least 2: one rank has nothing to reduce")
    repeats = 3 if args.quick else args.repeats
    plan = Plan(args.tp, repeats, tuple(iters_for(t * h * 4, args.quick) for _, t, h in CASES))
    r = bench(plan)
    emit(report(r), r, args.json)
    return all_equal(r)


if __name__ == "__main__":
    sys.exit(main())
