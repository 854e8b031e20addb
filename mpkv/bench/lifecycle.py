"""`mpkv bench rl` and `mpkv bench swap`: the life cycle's costs, each next to its baseline in the same run.

rl:   the clear+restore cycle (pause, clear, restore, resume) with one-block pools, where what is left is the
      handshake (messages, wake-ups, scheduling), at TP=1/2/4/8 (3 actors per rank), next to the protocol's
      floor: the one-way messages on a cycle's critical path (HOPS_PER_CYCLE) times the one-way latency of a
      signal between two processes, measured here; with the actors' and the controller's CPU per cycle.
      Then restore and clear at TP=1 against pool size (POOL_MIB per tier: a device pool and a host pool of that
      size each), next to the allocation floor: the time ONE process (this one) takes to allocate the same
      pools with mpkv's own functions, exactly as the actors do (allocate_device_pool: the pool owner;
      allocate_host_pool: the transfer manager's restore_host; both zero-fill every page). The roles allocate
      in parallel, so the floor is the slower of the two: the max of the per-pool medians. The release floor
      (free of each pool) stands next to clear the same way. Both are measured after each cycle, side by side
      with it, while the instance waits.
swap: swap-out and swap-in bytes/s through a launched instance (client -> ring -> transfer manager -> copy ->
      completion) against a plain copy (memcpy) of the same number of bytes in this process.

Both print what else ran while they measured and give a target a verdict only on a quiet machine
(mpkv.bench.machine); ``--plot FILE`` draws the curves (mpkv.bench.plot).
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
from mpkv.bench.machine import Noise, noise_line, nproc, verdict_line
from mpkv.config import CacheConfig
from mpkv.launched import LaunchedInstance, launch
from mpkv.shm.proc import cpu_seconds
from mpkv.shm.registry import Registry
from mpkv.shm.signals import Signal, SignalArray, create_signals

if TYPE_CHECKING:
    from mpkv.controller import Controller, StepResult

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


def cycle_ms(
    inst: LaunchedInstance, cycles: int, noise: Noise, between: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Per-step latencies of ``cycles`` cycles (after 3 warm-up cycles), plus the CPU time per cycle that the
    actors (summed) and the controller spent: on 2 cores, their sum over 2 bounds the cycle from below.
    ``between``: a baseline run after each cycle, untimed here (so both see the same machine). The cycles are a
    window of ``noise``, closed before the shutdown (exiting actors would take their time along)."""
    from mpkv.controller import Controller

    out: dict[str, list[float]] = {"cycle": [], "pause": [], "clear": [], "restore": [], "resume": []}
    with Controller(inst.name) as ctl:
        pids = [ctl.inst.status.read(i).writer.pid for i in range(3 * ctl.cfg.tp)]
        with noise.window([inst.pid, *pids]):
            _cycles(ctl, cycles, pids, out, between)
        ctl.shutdown()
    return out


def _cycles(
    ctl: Controller, cycles: int, pids: list[int], out: dict[str, list[float]], between: Callable[[], None] | None
) -> None:
    actors0, ctl0, aside = 0.0, 0.0, 0.0
    for i in range(cycles + 3):
        if i == 3:
            actors0, ctl0, aside = sum(cpu_seconds(p) for p in pids), time.process_time(), 0.0
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
        if between is not None:
            c0 = time.process_time()
            between()
            aside += time.process_time() - c0  # the baseline's CPU is not the controller's
    out["actor_cpu"] = [(sum(cpu_seconds(p) for p in pids) - actors0) / cycles * 1e3]
    out["controller_cpu"] = [(time.process_time() - ctl0 - aside) / cycles * 1e3]


TPS, QUICK_TPS = (1, 2, 4, 8), (1, 4)  # quick: still the target's TP
POOL_MIB, QUICK_POOL_MIB = (4, 16, 64, 256), (4, 64)  # per tier (device pool, host pool) at TP=1
TARGET_TP, TARGET_CYCLE_MS, GOAL_CYCLE_MS, TARGET_X_FLOOR = 4, 3.0, 2.0, 10.0
TARGET_MIB, TARGET_X_ALLOC = 64, 1.2


def rl_config(tp: int, blocks: int) -> CacheConfig:
    """8 layers of 8 KV heads x 64, float16: 256 KiB blocks at TP=1."""
    return CacheConfig(
        tp=tp, layers=8, kv_heads=8, head_dim=64, block_size=16, device_blocks=blocks, host_blocks=blocks
    )


def _instance_pids(inst: LaunchedInstance) -> list[int]:
    return [inst.pid, *inst.pids.values()]


class AllocFloor:
    """The allocation floor of a restore (and the release floor of a clear) with pools of ``cfg``, in this
    process: each ``round`` allocates the device pool and the host pool with mpkv's own functions
    (allocate_device_pool, allocate_host_pool: what the owner and the transfer manager call, zero-fill
    included) and frees them, timing each. The roles allocate in parallel, so a floor is the slower pool's
    median (``result``). Its registry is this process's own, destroyed on ``close``."""

    def __init__(self, cfg: CacheConfig) -> None:
        self.cfg, self.epoch = cfg, 0
        self.reg = Registry.create(f"bench-alloc-{os.getpid()}")
        self.t: dict[str, list[float]] = {"device_alloc": [], "host_alloc": [], "device_free": [], "host_free": []}

    def round(self) -> None:
        from mpkv.pool import OwnedPool, allocate_device_pool, allocate_host_pool

        self.epoch += 1
        held: list[OwnedPool] = []
        try:
            for tier, allocate in (("device", allocate_device_pool), ("host", allocate_host_pool)):
                t0 = time.perf_counter()
                held.append(allocate(self.reg, self.cfg, 0, self.epoch, 1))
                self.t[f"{tier}_alloc"].append(time.perf_counter() - t0)
            for tier in ("host", "device"):
                t0 = time.perf_counter()
                held.pop().free()
                self.t[f"{tier}_free"].append(time.perf_counter() - t0)
        finally:
            for pool in held:
                pool.free()

    def result(self) -> dict[str, float]:
        out = {k: statistics.median(v[1:] or v) * 1e3 for k, v in self.t.items()}  # the first round warms up
        return out | {
            "alloc": max(out["device_alloc"], out["host_alloc"]),
            "free": max(out["device_free"], out["host_free"]),
        }

    def close(self) -> None:
        self.reg.destroy()


def _p50s(res: dict[str, list[float]]) -> dict[str, float]:
    return {k: _pct(v, 50) for k, v in res.items()} | {"cycle_p99": _pct(res["cycle"], 99)}


def bench_rl(quick: bool) -> dict[str, Any]:
    """The handshake (1-block pools) against TP, then restore and clear at TP=1 against pool size next to the
    allocation floor; what else ran is counted over the timed parts only (mpkv.bench.machine)."""
    cycles = 5 if quick else 30
    noise = Noise(nproc())
    with noise.window():
        floor_us = one_way_signal_us(200 if quick else 2000)
    tp_rows = []
    for tp in QUICK_TPS if quick else TPS:
        cfg = rl_config(tp, 1)
        name = f"bench-rl-{os.getpid()}-tp{tp}"
        with launched(name, cfg) as inst:
            res = cycle_ms(inst, cycles, noise)
        tp_rows.append({"tp": tp, "pool_bytes": cfg.pool_bytes(1) * tp * 2} | _p50s(res))
    pool_rows = []
    for mib in QUICK_POOL_MIB if quick else POOL_MIB:
        cfg = rl_config(1, mib * 2**20 // rl_config(1, 1).block_bytes)
        name = f"bench-rl-{os.getpid()}-{mib}mib"
        floor = AllocFloor(cfg)
        try:
            with launched(name, cfg) as inst:
                # a 256 MiB cycle and its floor take seconds: 8 of them keep the full run near 3 minutes
                res = cycle_ms(inst, cycles if quick else min(15, max(8, 2048 // mib)), noise, floor.round)
        finally:
            floor.close()
        pool_rows.append({"pool_mib": mib, "floor": floor.result()} | _p50s(res))
    return {
        "floor_one_way_us": floor_us,
        "cycles": cycles,
        "tp_rows": tp_rows,
        "pool_rows": pool_rows,
        "machine": noise.record(),
    }


def rl_targets(r: dict[str, Any]) -> list[str]:
    """The rl targets' lines (verdicts only on a quiet machine: mpkv.bench.machine)."""
    floor_ms = HOPS_PER_CYCLE * r["floor_one_way_us"] / 1e3
    m = r["machine"]
    out = []
    what = (
        f"handshake cycle (1-block pool) at TP={TARGET_TP} <= {TARGET_CYCLE_MS:g} ms (goal {GOAL_CYCLE_MS:g} ms) "
        f"and <= {TARGET_X_FLOOR:g}x the floor ({floor_ms:.2f} ms)"
    )
    row = next((x for x in r["tp_rows"] if x["tp"] == TARGET_TP), None)
    if row is None:
        out.append(f"target: {what}: not measured (this run: TP {', '.join(str(x['tp']) for x in r['tp_rows'])})")
    else:
        c = row["cycle"]
        ok = c <= TARGET_CYCLE_MS and c <= TARGET_X_FLOOR * floor_ms
        out.append(verdict_line(what, f"{c:.2f} ms = {c / floor_ms:.1f}x the floor", ok, m))
    what = f"restore at TP=1 with {TARGET_MIB} MiB pools <= {TARGET_X_ALLOC:g}x the allocation floor"
    prow = next((x for x in r["pool_rows"] if x["pool_mib"] == TARGET_MIB), None)
    if prow is None:
        out.append(f"target: {what}: not measured")
    else:
        x = prow["restore"] / prow["floor"]["alloc"]
        measured = f"{prow['restore']:.2f} ms = {x:.2f}x the floor ({prow['floor']['alloc']:.2f} ms)"
        out.append(verdict_line(what, measured, x <= TARGET_X_ALLOC, m))
    return out


def report_rl(r: dict[str, Any]) -> list[str]:
    floor_ms = HOPS_PER_CYCLE * r["floor_one_way_us"] / 1e3
    out = [
        f"one-way signal latency between two processes: {r['floor_one_way_us']:.1f} us; "
        f"floor of a cycle = {HOPS_PER_CYCLE} messages = {floor_ms:.3f} ms",
        "",
        "| TP | actors | handshake cycle (1-block pool) p50 / p99 | cycle / floor | pause | clear | restore | resume "
        "| CPU per cycle: actors + controller |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in r["tp_rows"]:
        steps = " | ".join(f"{t[k]:.2f}" for k in ("pause", "clear", "restore", "resume"))
        out.append(
            f"| {t['tp']} | {3 * t['tp']} | {t['cycle']:.2f} / {t['cycle_p99']:.2f} ms | "
            f"{t['cycle'] / floor_ms:.1f}x | {steps} | {t['actor_cpu']:.1f} + {t['controller_cpu']:.1f} ms |"
        )
    out += [
        "(steps: p50 ms)",
        "",
        "| pool per tier, TP=1 | cycle p50 | clear p50 | restore p50 | allocation floor (device, host) "
        "| restore / floor | release floor (device, host) | clear / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in r["pool_rows"]:
        f = p["floor"]
        out.append(
            f"| {p['pool_mib']} MiB | {p['cycle']:.2f} ms | {p['clear']:.2f} ms | {p['restore']:.2f} ms | "
            f"{f['alloc']:.2f} ms ({f['device_alloc']:.2f}, {f['host_alloc']:.2f}) | {p['restore'] / f['alloc']:.2f}x "
            f"| {f['free']:.2f} ms ({f['device_free']:.2f}, {f['host_free']:.2f}) | {p['clear'] / f['free']:.2f}x |"
        )
    out.append(
        "(floors: after each cycle, this process allocates (zero-fill included) and frees each pool with mpkv's own "
        "functions; the roles do it in parallel, so a floor is the slower pool's median)"
    )
    return [*out, "", noise_line(r["machine"]), *rl_targets(r)]


# -- swap ---------------------------------------------------------------------------------------------------------


SWAP_TARGET_KIB, SWAP_TARGET_X = 64, 0.9


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
    noise = Noise(nproc())
    for block_kib in (16, 64, 256, 1024, 2048):
        cfg = CacheConfig(layers=4, kv_heads=4, head_dim=64, block_size=block_kib // 4, dtype="float16", tp=1)
        assert cfg.block_bytes == block_kib * 1024
        task_bytes = (4 if quick else 16) * 2**20
        per_task = max(1, task_bytes // cfg.block_bytes)
        blocks = max(2 * per_task, 8)
        cfg = CacheConfig(**(cfg.__dict__ | {"device_blocks": blocks, "host_blocks": blocks}))
        name = f"bench-swap-{os.getpid()}-{block_kib}"
        with launched(name, cfg) as inst, noise.window(_instance_pids(inst)):
            rates = swap_rates(name, cfg, per_task, repeats)
        rows.append({"block_kib": block_kib, "task_mib": per_task * cfg.block_bytes / 2**20} | rates)
    return {"rows": rows, "machine": noise.record()}


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
    return [*out, "", noise_line(r["machine"]), swap_target(r)]


def swap_target(r: dict[str, Any]) -> str:
    """The swap target's line: the worst of both directions over the blocks it is stated for."""
    big = [row for row in r["rows"] if row["block_kib"] >= SWAP_TARGET_KIB]
    worst = min(min(row["out_ratio"], row["in_ratio"]) for row in big)
    return verdict_line(
        f"swap-out and swap-in >= {SWAP_TARGET_X:g}x memcpy for blocks >= {SWAP_TARGET_KIB} KiB",
        f"worst {worst:.2f}x",
        worst >= SWAP_TARGET_X,
        r["machine"],
    )


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
    draw_plot(args, r)
    return 0


def draw_plot(args: argparse.Namespace, r: dict[str, Any]) -> None:
    """``--plot FILE``: the curves of this run (mpkv.bench.plot; the CLI checked for matplotlib before the run)."""
    if getattr(args, "plot", None):
        from mpkv.bench import plot

        plot.draw(args.what, r, args.plot)
        print(f"plot: {args.plot}")
