"""`mpkv bench rl` and `mpkv bench swap`: the life cycle's costs, each next to its baseline in the same run.

rl:   clear+restore cycle latency (pause, clear, restore, resume) at TP=1/2/4, with a one-block pool (what is
      left is the handshake: messages, wake-ups, scheduling) and with a real pool (the difference is
      allocation, zero-fill and free), next to the protocol's floor: the number of one-way messages on the
      cycle's critical path times the one-way latency of a signal between two processes, measured here.
swap: swap-out and swap-in bytes/s through a launched instance (client -> ring -> transfer manager -> copy ->
      completion) against a plain copy (memcpy) of the same number of bytes in this process.
"""

from __future__ import annotations

import argparse
import enum
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import numpy as np

from mpkv.bench import emit
from mpkv.config import CacheConfig
from mpkv.launched import LaunchedInstance, launch
from mpkv.shm.proc import cpu_seconds
from mpkv.shm.registry import Registry
from mpkv.shm.signals import Signal, SignalArray, create_signals

if TYPE_CHECKING:
    from mpkv.controller import StepResult

# Critical path of one cycle, in one-way messages: PAUSE (command, ack), CLEAR (command, attacher DETACHED,
# owner CLEARED), RESTORE (command, owner PUBLISHED, attacher RESTORED), RESUME (command, ack).
HOPS_PER_CYCLE = 10


class Ping(enum.IntEnum):
    NONE = 0  # the value of a slot never written
    A = 1


def launched(name: str, cfg: CacheConfig) -> AbstractContextManager[LaunchedInstance]:
    """Instance ``name`` of geometry ``cfg``, launched (mpkv.launch) and always torn down."""
    geometry = {k: getattr(cfg, k) for k in ("layers", "kv_heads", "head_dim", "block_size", "dtype", "hidden")}
    geometry |= {"device_blocks": cfg.device_blocks, "host_blocks": cfg.host_blocks}
    if cfg.nixl_port:
        geometry["nixl_port"] = cfg.nixl_port
    return launch(name, tp=cfg.tp, role=cfg.pd_role.name.lower(), **geometry)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


# -- the floor: one-way latency of a signal between two processes -----------------------------------------------


def _epoch_at_least(epoch: int) -> Callable[[Signal[Ping]], bool]:
    return lambda s: s.epoch >= epoch


def _pong(name: str, n: int) -> None:
    arr = SignalArray(name, Ping)
    w = arr.writer(1)
    for i in range(1, n + 1):
        arr.wait(0, _epoch_at_least(i), what="ping", timeout_s=30)
        w.write(Ping.A, i)
    arr.close()


def one_way_signal_us(n: int) -> float:
    reg = Registry.create(f"bench-sig-{os.getpid()}")
    try:
        seg = create_signals(reg, "pingpong", 2)
        child = get_context("spawn").Process(target=_pong, args=(seg.name, n))
        child.start()
        arr = SignalArray(seg.name, Ping)
        w = arr.writer(0)
        rtts = []
        for i in range(1, n + 1):
            t0 = time.perf_counter()
            w.write(Ping.A, i)
            arr.wait(1, _epoch_at_least(i), what="pong", timeout_s=30)
            rtts.append(time.perf_counter() - t0)
        child.join(30)
        arr.close()
        reg.release(seg)
        return statistics.median(rtts[n // 10 :]) / 2 * 1e6
    finally:
        reg.destroy()


# -- rl -----------------------------------------------------------------------------------------------------------


def cycle_ms(name: str, cycles: int) -> dict[str, list[float]]:
    """Per-step latencies of ``cycles`` cycles (after 3 warm-up cycles), plus the CPU time per cycle that the
    actors (summed) and the controller spent: on 2 cores, their sum over 2 bounds the cycle from below."""
    from mpkv.controller import Controller

    out: dict[str, list[float]] = {"cycle": [], "pause": [], "clear": [], "restore": [], "resume": []}
    with Controller(name) as ctl:
        pids = [ctl.inst.status.read(i).writer.pid for i in range(3 * ctl.cfg.tp)]
        for i in range(cycles + 3):
            if i == 3:
                actors0, ctl0 = sum(cpu_seconds(p) for p in pids), time.process_time()
            steps: list[tuple[str, Callable[[], StepResult]]] = [
                ("pause", ctl.pause),
                ("clear", ctl.clear),
                ("restore", ctl.restore),
                ("resume", ctl.resume),
            ]
            t0 = time.perf_counter()
            lat = {k: f().latency_s * 1e3 for k, f in steps}
            total = (time.perf_counter() - t0) * 1e3
            if i >= 3:  # warm-up cycles are not counted
                for k, v in lat.items():
                    out[k].append(v)
                out["cycle"].append(total)
        out["actor_cpu"] = [(sum(cpu_seconds(p) for p in pids) - actors0) / cycles * 1e3]
        out["controller_cpu"] = [(time.process_time() - ctl0) / cycles * 1e3]
        ctl.shutdown()
    return out


def bench_rl(quick: bool) -> dict[str, Any]:
    cycles = 5 if quick else 30
    tps = (1, 2) if quick else (1, 2, 4)
    floor_us = one_way_signal_us(200 if quick else 2000)
    rows = []
    for tp in tps:
        row: dict[str, Any] = {"tp": tp}
        for pool, blocks in (("tiny", 1), ("real", 512)):
            cfg = CacheConfig(
                tp=tp, layers=8, kv_heads=8, head_dim=64, block_size=16, device_blocks=blocks, host_blocks=blocks
            )
            name = f"bench-rl-{os.getpid()}-{tp}-{pool}"
            with launched(name, cfg):
                res = cycle_ms(name, cycles)
            row[pool] = {k: _pct(v, 50) for k, v in res.items()} | {"cycle_p99": _pct(res["cycle"], 99)}
            row[f"{pool}_pool_bytes"] = cfg.pool_bytes(blocks) * tp * 2
        rows.append(row)
    return {"floor_one_way_us": floor_us, "cycles": cycles, "rows": rows}


def report_rl(r: dict[str, Any]) -> list[str]:
    floor_ms = HOPS_PER_CYCLE * r["floor_one_way_us"] / 1e3
    out = [
        f"one-way signal latency between two processes: {r['floor_one_way_us']:.1f} us; "
        f"floor of a cycle = {HOPS_PER_CYCLE} messages = {floor_ms:.3f} ms",
        "",
        "| TP | cycle, 1-block pool (= handshake) p50 / p99 | cycle, real pool p50 | alloc+zero+free | pool bytes "
        "| handshake / floor | CPU per handshake cycle: actors + controller |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        t, g = row["tiny"], row["real"]
        out.append(
            f"| {row['tp']} | {t['cycle']:.2f} / {t['cycle_p99']:.2f} ms | {g['cycle']:.2f} ms | "
            f"{g['cycle'] - t['cycle']:.2f} ms | {row['real_pool_bytes'] / 2**20:.0f} MiB | "
            f"{t['cycle'] / floor_ms:.1f}x | {t['actor_cpu']:.1f} + {t['controller_cpu']:.1f} ms |"
        )
    out.append("")
    out.append("| TP | pause | clear | restore | resume (p50 ms, 1-block pool; real pool in brackets) |")
    out.append("|---|---|---|---|---|")
    for row in r["rows"]:
        t, g = row["tiny"], row["real"]
        cells = " | ".join(f"{t[k]:.2f} ({g[k]:.2f})" for k in ("pause", "clear", "restore", "resume"))
        out.append(f"| {row['tp']} | {cells} |")
    last = r["rows"][-1]
    verdict = "PASS" if last["tiny"]["cycle"] <= 5.0 else "MISS"
    out.append(
        f"\ntarget: handshake overhead <= 5 ms per cycle at TP={last['tp']}: "
        f"{last['tiny']['cycle']:.2f} ms -> {verdict}"
    )
    return out


# -- swap ---------------------------------------------------------------------------------------------------------


def swap_rates(name: str, cfg: CacheConfig, per_task: int, repeats: int) -> dict[str, float]:
    """Swap-out, swap-in and a memcpy of the same bytes, interleaved (so all three see the same machine), for
    ``repeats`` rounds. Returns median bytes/s of each and the median of the per-round ratios."""
    from mpkv.client import Client

    rng = np.random.default_rng(0)
    moved = per_task * cfg.block_bytes
    pool_bytes = cfg.pool_bytes(cfg.device_blocks)
    src, dst = np.ones(pool_bytes, dtype=np.uint8), np.ones(pool_bytes, dtype=np.uint8)
    t_out, t_in, t_copy = [], [], []
    with Client(name) as client:
        for _ in range(repeats + 2):
            blocks = rng.permutation(cfg.device_blocks)[:per_task].astype(np.int32)
            t0 = time.perf_counter()
            slots = client.wait(client.swap_out(blocks))[0].slots
            t1 = time.perf_counter()
            assert slots is not None
            client.wait(client.swap_in(slots, rng.permutation(cfg.device_blocks)[:per_task].astype(np.int32)))
            t2 = time.perf_counter()
            # memcpy of the same bytes between buffers as large as the pools, at a random offset, so its data
            # is no more cache-resident than the swap's (random blocks of pools that size)
            s, d = rng.integers(0, pool_bytes - moved + 1, size=2)
            t3 = time.perf_counter()
            np.copyto(dst[d : d + moved], src[s : s + moved])
            t4 = time.perf_counter()
            t_out.append(t1 - t0)
            t_in.append(t2 - t1)
            t_copy.append(t4 - t3)
    o, i_, c = (np.array(x[2:]) for x in (t_out, t_in, t_copy))
    return {
        "out": moved / float(np.median(o)),
        "in": moved / float(np.median(i_)),
        "memcpy": moved / float(np.median(c)),
        "out_ratio": float(np.median(c / o)),
        "in_ratio": float(np.median(c / i_)),
    }


def bench_swap(quick: bool) -> dict[str, Any]:
    rows = []
    repeats = 5 if quick else 20
    for block_kib in (16, 64, 256, 1024, 2048):
        cfg = CacheConfig(layers=4, kv_heads=4, head_dim=64, block_size=block_kib // 4, dtype="float16", tp=1)
        assert cfg.block_bytes == block_kib * 1024
        task_bytes = (4 if quick else 16) * 2**20
        per_task = max(1, task_bytes // cfg.block_bytes)
        blocks = max(2 * per_task, 8)
        cfg = CacheConfig(**(cfg.__dict__ | {"device_blocks": blocks, "host_blocks": blocks}))
        name = f"bench-swap-{os.getpid()}-{block_kib}"
        with launched(name, cfg):
            rates = swap_rates(name, cfg, per_task, repeats)
        rows.append({"block_kib": block_kib, "task_mib": per_task * cfg.block_bytes / 2**20} | rates)
    return {"rows": rows}


def report_swap(r: dict[str, Any]) -> list[str]:
    gb = 1e9
    out = [
        "| block | bytes per task | swap-out | swap-in | memcpy, same bytes | out / memcpy | in / memcpy |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        out.append(
            f"| {row['block_kib']} KiB | {row['task_mib']:.0f} MiB | {row['out'] / gb:.2f} GB/s | "
            f"{row['in'] / gb:.2f} GB/s | {row['memcpy'] / gb:.2f} GB/s | {row['out_ratio']:.2f}x | "
            f"{row['in_ratio']:.2f}x |"
        )
    out.append(
        "(rates: medians; ratios: medians of per-round ratios, each round timing a swap-out, a swap-in and "
        "a memcpy back to back)"
    )
    big = [row for row in r["rows"] if row["block_kib"] >= 64]
    worst = min(min(row["out_ratio"], row["in_ratio"]) for row in big)
    out.append(
        f"\ntarget: swap >= 0.7x memcpy for blocks >= 64 KiB: worst {worst:.2f}x -> "
        f"{'PASS' if worst >= 0.7 else 'MISS'}"
    )
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    cmd = "mpkv bench " + args.what + (" --quick" if args.quick else "")
    print(
        f"# {cmd}\n# {platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}\n"
    )
    if args.what == "rl":
        r = bench_rl(args.quick)
        lines = report_rl(r)
    else:
        r = bench_swap(args.quick)
        lines = report_swap(r)
    emit(lines, r, args.json)
    return 0
