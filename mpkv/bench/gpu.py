"""`mpkv bench gpu`: the cuda path on a real GPU, as one table (tools/gpu-check runs it after the gpu tests).

Each row is one check, run in this order, each on its own instances, with what it measured, its target and a
verdict: PASS or FAIL for correctness (FAIL makes the exit code 1), PASS or MISS for speed (recorded, not fatal).
  tests      the gpu tests (`pytest -m gpu`, where the repository's tests/ is), in a child process
  roles      a cuda instance (TP=1, 1 GiB device pool): the worker writes KV, the transfer manager reads it back
             and swaps it out and in through its own mapping of the pool; every byte compared
  clear      two clears with a restore between: each process's GPU memory per NVML; Controller.clear judges each
             (mpkv.pool.release), and here every process's figure after the second must be within 64 MiB of its
             figure after the first (its pool-less figure)
  cycles     100 clear/restore cycles of the device pool: NVML's figures after the first and the last (a figure of
             0: NVML lists the process nowhere, as in a container; then the device's used memory decides)
  swap       swap-out and swap-in GB/s through the instance against a pinned copy (torch, one stream) of the same
             bytes in this process; and the copy routine both ways at once on two streams against one way
  pd         prefill -> decode on the GPU, 4096 tokens, layer-wise against prefill alone (mpkv.bench.pd.measure)
  model      a seeded Llama checkpoint served at TP=1 and TP=2 on the GPU: greedy tokens equal transformers' own
  graph      --stable-addresses: a CUDA graph captured over the pool, replayed after each of 100 clear/restore
             cycles, reads each new epoch's data at the same address
Without a GPU it prints "no GPU: nothing to check" and exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpkv.config import CacheConfig

MiB = 1 << 20
POOL = CacheConfig(
    layers=8, kv_heads=8, head_dim=128, block_size=16, dtype="float16", device_blocks=2048, host_blocks=512
)  # 512 KiB blocks: a 1 GiB device pool, a 256 MiB host pool
SWAP_BLOCKS = 256  # 128 MiB per swap task
GROWTH_NOISE_BYTES = 8 << 20  # what 100 cycles may "grow" by without growing: the driver's bookkeeping pages
REPEATS = 10


@dataclass
class Row:
    check: str
    result: str
    target: str
    verdict: str  # PASS, FAIL (correctness), MISS (speed), n/a
    seconds: float = 0.0


def _row(check: str, target: str, fn: Callable[[], tuple[str, str]]) -> Row:
    t0 = time.monotonic()
    try:
        result, verdict = fn()
    except (Exception, SystemExit) as e:  # a check that breaks (or exits) is a FAIL with its reason; the rest run
        result, verdict = f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], "FAIL"
    return Row(check, result, target, verdict, time.monotonic() - t0)


def _launched(name: str, cfg: CacheConfig, **extra: Any) -> Any:
    from mpkv.launched import launch

    geometry = {k: getattr(cfg, k) for k in ("layers", "kv_heads", "head_dim", "block_size", "dtype")}
    geometry |= {"device_blocks": cfg.device_blocks, "host_blocks": cfg.host_blocks} | extra
    return launch(name, tp=cfg.tp, backend="cuda", **geometry)


def _gbs(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


# -- roles, clear, cycles, swap: one instance --------------------------------------------------------------------


def check_roles(name: str) -> tuple[str, str]:
    from mpkv.client import Client
    from mpkv.verify import verify_kv

    rng = np.random.default_rng(0)
    with Client(name) as client:
        wv = client.cfg.weight_version
        blocks = rng.permutation(POOL.device_blocks)[:8].astype(np.int32)
        tokens = rng.integers(0, client.cfg.vocab, 8 * POOL.block_size - 3, dtype=np.int32)
        client.wait(client.prefill("gpu-check", tokens, blocks))
        verify_kv(client, tokens, blocks, wv, what="worker -> transfer manager")  # read through its IPC mapping
        slots = client.wait(client.swap_out(blocks))[0].slots
        assert slots is not None
        verify_kv(client, tokens, np.asarray(slots), wv, host=True, what="swap-out")
        back = rng.permutation(np.setdiff1d(np.arange(POOL.device_blocks), blocks))[:8].astype(np.int32)
        client.wait(client.swap_in(slots, back))
        verify_kv(client, tokens, back, wv, what="swap-in")
    return "worker wrote, transfer manager read back, swapped out and in: every byte equal", "PASS"


def _figures(res: Any) -> str:
    from mpkv.gpumem import fmt_bytes

    seen = [f"{who} {fmt_bytes(b)} -> {fmt_bytes(a)}" for who, (b, a) in res.gpu_bytes.items()]
    return "; ".join(seen) + (f" ({res.gpu_note})" if res.gpu_note else "")


def check_clear(name: str) -> tuple[str, str]:
    from mpkv.controller import Controller

    with Controller(name) as ctl:
        ctl.pause()
        first = ctl.clear()  # the pool-less figures
        ctl.restore()
        second = ctl.clear()  # MemoryHeld if a process holds the pool, or more than after the first
        ctl.restore()
        ctl.resume()
    from mpkv.gpumem import fmt_bytes
    from mpkv.pool.release import TOLERANCE_BYTES

    if not second.gpu_bytes or not all(a for _b, a in second.gpu_bytes.values()):
        return f"NVML has no per-process figures: {second.gpu_note or first.gpu_note}", "n/a"
    grown = {
        who: after - (first.gpu_bytes[who][1] or 0)
        for who, (_b, after) in second.gpu_bytes.items()
        if after is not None and after > (first.gpu_bytes[who][1] or 0) + TOLERANCE_BYTES
    }
    result = f"second clear, per process: {_figures(second)}"
    if grown:
        worst = ", ".join(f"{who} +{fmt_bytes(b)}" for who, b in grown.items())
        return f"{result}; held more than after the first clear: {worst}", "FAIL"
    return result, "PASS"


def _process_total(pids: list[int]) -> tuple[int | None, int]:
    """The actors' NVML figures summed (None if NVML has none), and the device's used memory."""
    import torch

    from mpkv.gpumem import GpuMemory

    got = GpuMemory.open().process_bytes(pids).values()
    free, total = torch.cuda.mem_get_info()
    return (sum(v or 0 for v in got) if all(got) else None), int(total - free)  # 0: listed nowhere


def check_cycles(name: str, pids: list[int], cycles: int = 100) -> tuple[str, str]:
    from mpkv.controller import Controller
    from mpkv.gpumem import fmt_bytes

    marks = []
    t0 = time.monotonic()
    with Controller(name) as ctl:
        for i in range(cycles):
            ctl.pause()
            ctl.clear(host=False)
            ctl.restore()
            ctl.resume()
            if i in (0, cycles - 1):
                marks.append(_process_total(pids))
    took = (time.monotonic() - t0) / cycles * 1e3
    (p1, d1), (p2, d2) = marks
    device = f"device used {fmt_bytes(d1)} -> {fmt_bytes(d2)}"
    if p1 is None or p2 is None:
        verdict = "PASS" if d2 - d1 <= GROWTH_NOISE_BYTES else "FAIL"
        return f"{cycles} cycles ({took:.1f} ms each); per-process NVML n/a; {device}", verdict
    growth = p2 - p1
    text = f"{cycles} cycles ({took:.1f} ms each); actors after cycle 1 -> {cycles}: {fmt_bytes(p1)} -> {fmt_bytes(p2)}"
    return f"{text} (growth {fmt_bytes(growth)}); {device}", "PASS" if growth <= GROWTH_NOISE_BYTES else "FAIL"


def _timed_copies(dst: Any, src: Any, repeats: int) -> list[float]:
    import torch

    out = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return out[1:]


def check_swap(name: str) -> list[Row]:
    """Rows: swap-out, swap-in (each against a pinned copy of the same bytes), both directions at once."""
    import torch

    from mpkv.bench.lifecycle import swap_rates

    nbytes = SWAP_BLOCKS * POOL.block_bytes
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h, h2d = _timed_copies(host, dev, REPEATS), _timed_copies(dev, host, REPEATS)
    swapped = swap_rates(name, POOL, SWAP_BLOCKS, REPEATS)  # bytes/s, medians (`mpkv bench swap`'s loop)
    rows = []
    for what, rate, copied in (
        ("swap-out (device -> host)", swapped["out"], d2h),
        ("swap-in (host -> device)", swapped["in"], h2d),
    ):
        ratio = rate / 1e9 / _gbs(nbytes, copied)
        result = (
            f"{rate / 1e9:.1f} GB/s vs pinned copy {_gbs(nbytes, copied):.1f} GB/s = {ratio:.2f}x "
            f"({SWAP_BLOCKS} random {POOL.block_bytes // 1024} KiB blocks per task)"
        )
        rows.append(Row(what, result, ">= 0.9x pinned copy", "PASS" if ratio >= 0.9 else "MISS"))
    rows.append(_row("both directions at once (copy routine)", ">= 1.6x one direction", both_ways_at_once))
    return rows


def both_ways_at_once() -> tuple[str, str]:
    """The copy routine swaps use (cuda/ where built, else torch's gather/scatter) on two streams at once, out of
    and into device pools, against one direction alone: the copy engines of the two directions overlap."""
    import torch

    from mpkv.pool.copy import copy_blocks

    cfg = POOL
    dev_a = torch.zeros(cfg.pool_shape(cfg.device_blocks), dtype=cfg.torch_dtype, device="cuda")
    dev_b = torch.zeros_like(dev_a)
    host_a = torch.zeros(cfg.pool_shape(cfg.host_blocks), dtype=cfg.torch_dtype, pin_memory=True)
    host_b = torch.zeros_like(host_a).pin_memory()
    ids = np.arange(SWAP_BLOCKS, dtype=np.int64)
    s_out, s_in = torch.cuda.Stream(), torch.cuda.Stream()

    def one(stream: Any, dst: Any, src: Any) -> None:
        with torch.cuda.stream(stream):
            copy_blocks(dst, ids, src, ids, complete=False)

    def timed(both: bool) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        one(s_out, host_a, dev_a)
        if both:
            one(s_in, dev_b, host_b)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    single = [timed(False) for _ in range(REPEATS + 1)][1:]
    both = [timed(True) for _ in range(REPEATS + 1)][1:]
    nbytes = SWAP_BLOCKS * cfg.block_bytes
    ratio = _gbs(2 * nbytes, both) / _gbs(nbytes, single)
    result = f"{_gbs(2 * nbytes, both):.1f} GB/s both ways vs {_gbs(nbytes, single):.1f} GB/s one way = {ratio:.2f}x"
    return result, "PASS" if ratio >= 1.6 else "MISS"


# -- pd, model, graph ----------------------------------------------------------------------------------------------


def check_pd(base: str) -> tuple[str, str]:
    from mpkv.bench.pd import geometry, measure
    from mpkv.client import Client
    from mpkv.protocol import PdRole

    n = 4096
    cfg = geometry(n)
    rng = np.random.default_rng(0)
    with (
        _launched(f"{base}-d", cfg, role="decode", host_blocks=1),
        _launched(f"{base}-p", cfg, role="prefill", host_blocks=1),
        Client(f"{base}-p") as p,
        Client(f"{base}-d") as d,
    ):
        assert p.cfg.pd_role == PdRole.PREFILL
        row = measure(p, d, n, 5, rng, "")
    ms = row["ms"]
    ratio = ms["layerwise"] / ms["alone"]
    result = (
        f"{n} tokens: prefill alone {ms['alone']:.1f} ms, layer-wise {ms['layerwise']:.1f} ms ({ratio:.2f}x), "
        f"after prefill {ms['after']:.1f} ms; KV verified on decode"
    )
    return result, "PASS" if ratio <= 1.15 else "MISS"


def check_model(base: str) -> tuple[str, str]:
    import torch

    from mpkv.bench import scratch_dir
    from mpkv.bench.model_decode import BLOCK, SEED, run_reference, save_model, transformers
    from mpkv.client import Client
    from mpkv.launched import launch

    with scratch_dir("gpu-check-model") as where:
        path = save_model(__import__("pathlib").Path(where) / "llama")
        ref = transformers().LlamaForCausalLM.from_pretrained(path).to("cuda", torch.float32).eval()
        prompts = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(SEED))
        with torch.no_grad():
            want = run_reference(ref, prompts.to("cuda"), 8).tokens
        got = {}
        for tp in (1, 2):
            name = f"{base}-tp{tp}"
            geometry: dict[str, Any] = {"model": str(path), "block_size": BLOCK, "device_blocks": 32, "host_blocks": 1}
            with launch(name, tp=tp, backend="cuda", **geometry), Client(name) as client:
                got[tp] = [list(map(int, row)) for row in client.generate(prompts.tolist(), 8)]
    same = {tp: tokens == want for tp, tokens in got.items()}
    result = ", ".join(f"TP={tp}: {'equal' if ok else f'DIFFERENT {got[tp]} vs {want}'}" for tp, ok in same.items())
    return f"greedy, 2 prompts x 8 tokens, float32, vs transformers on the GPU: {result}", (
        "PASS" if all(same.values()) else "FAIL"
    )


def check_graph(base: str, cycles: int = 100) -> tuple[str, str]:
    import torch

    from mpkv import cudaext
    from mpkv.pool import allocate_device_pool
    from mpkv.shm.registry import Registry

    if cudaext.missing():
        return cudaext.missing(), "FAIL"
    cfg = CacheConfig(**(POOL.__dict__ | {"backend": "cuda", "stable_addresses": True, "device_blocks": 64}))
    reg = Registry.create(f"{base}-graph")
    pool = None
    try:
        pool = allocate_device_pool(reg, cfg, 0, 1, 1)
        address = pool.tensor.data_ptr()
        out = torch.zeros(cfg.pool_shape(1)[3:], dtype=torch.float32, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, as torch asks
            out.copy_(pool.tensor[1, 0, 7].float() * 2)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out.copy_(pool.tensor[1, 0, 7].float() * 2)
        wrong = []
        for epoch in range(2, cycles + 2):
            pool.free()
            pool = None
            pool = allocate_device_pool(reg, cfg, 0, epoch, 1)
            if pool.tensor.data_ptr() != address:
                return f"epoch {epoch}: the pool moved from {address:#x} to {pool.tensor.data_ptr():#x}", "FAIL"
            pool.tensor[1, 0, 7].fill_(epoch)
            graph.replay()
            torch.cuda.synchronize()
            if not bool((out == 2 * epoch).all()):
                wrong.append(epoch)
    finally:
        if pool is not None:
            pool.free()
        reg.destroy()
    if wrong:
        return f"the replay read stale or wrong data after cycles {wrong[:5]}", "FAIL"
    return f"{cycles} cycles, pool at {address:#x} every time, every replay read its epoch's data", "PASS"


# -- the table ---------------------------------------------------------------------------------------------------


GPU_TEST_FILES = ("test_cuda.py", "test_cudaext_gpu.py", "test_gpumem.py")


def check_tests(timeout_s: float = 240) -> tuple[str, str]:
    import subprocess
    from pathlib import Path

    tests = Path(__file__).resolve().parents[2] / "tests"
    if not tests.is_dir():
        return f"no tests/ beside the package ({tests})", "n/a"
    files = [str(tests / f) for f in GPU_TEST_FILES]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-n", "0", *files]
    try:
        done = subprocess.run(cmd, cwd=tests.parent, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"pytest -m gpu did not finish within {timeout_s:g} s", "FAIL"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else f"pytest said nothing (exit {done.returncode})"
    if done.returncode == 0:
        return summary, "PASS"
    print(done.stdout[-8000:], done.stderr[-2000:], sep="\n", file=sys.stderr, flush=True)  # the details, aside
    failed = [line.removeprefix("FAILED ").split(" - ")[0] for line in lines if line.startswith(("FAILED", "ERROR"))]
    return f"{summary}: {', '.join(failed[:6])} (output on stderr)", "FAIL"


class Table(list[Row]):
    """The rows so far; each is printed as it comes (a run cut short still shows what it measured)."""

    HEAD = ("| check | result | target | verdict | s |", "|---|---|---|---|---|")

    def append(self, row: Row) -> None:
        super().append(row)
        print(self.line(row), flush=True)

    @staticmethod
    def line(r: Row) -> str:
        return f"| {r.check} | {r.result} | {r.target} | {r.verdict} | {r.seconds:.0f} |"


def run_all(base: str, rows: Table, only: set[str]) -> None:
    """The groups of checks in ``only`` (mpkv.cli.GPU_GROUPS): tests, pool (roles, clear, cycles, swap), pd, model,
    graph."""
    if "tests" in only:
        rows.append(_row("gpu tests (pytest -m gpu)", "all pass", check_tests))
    if "pool" in only:
        pool_checks(base, rows)
    if "pd" in only:
        rows.append(
            _row("PD layer-wise on GPU vs prefill alone", "<= 1.15x at 4096 tokens", lambda: check_pd(f"{base}-pd"))
        )
    if "model" in only:
        rows.append(_row("real model generation on GPU", "equal to transformers", lambda: check_model(f"{base}-m")))
    if "graph" in only:
        rows.append(_row("--stable-addresses: CUDA graph after 100 cycles", "same output", lambda: check_graph(base)))


def pool_checks(base: str, rows: Table) -> None:
    name = f"{base}-pool"
    try:
        with _launched(name, POOL) as inst:
            actors = list(inst.pids.values())
            rows.append(
                _row("CUDA IPC pool across worker / transfer / messager", "every byte equal", lambda: check_roles(name))
            )
            rows.append(
                _row("clear frees per NVML, every process", "within 64 MiB of pre-pool", lambda: check_clear(name))
            )
            rows.append(_row("100 clear/restore cycles", "0 B growth", lambda: check_cycles(name, actors)))
            try:
                for row in check_swap(name):
                    rows.append(row)
            except Exception as e:
                rows.append(Row("swap", f"error: {type(e).__name__}: {e}"[:300], ">= 0.9x pinned copy", "FAIL"))
    except Exception as e:  # the instance did not start: say so once, go on with the rest
        rows.append(Row("cuda instance (TP=1, 1 GiB pool)", f"error: {type(e).__name__}: {e}"[:300], "starts", "FAIL"))


def header() -> str:
    import torch

    from mpkv.gpumem import GpuMemory

    devices = GpuMemory.open().devices()
    gpu = ", ".join(f"{d.name} ({d.total_bytes / 2**30:.0f} GiB)" for d in devices) or torch.cuda.get_device_name()
    return (
        f"# mpkv bench gpu, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {gpu}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}); {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )


def main(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 0
    import json

    from mpkv.cli import GPU_GROUPS

    only = set((args.only or ",".join(GPU_GROUPS)).split(","))
    if only - set(GPU_GROUPS):
        print(
            f"mpkv bench gpu --only: unknown {', '.join(sorted(only - set(GPU_GROUPS)))}; the groups are "
            f"{', '.join(GPU_GROUPS)}",
            file=sys.stderr,
        )
        return 2
    print(header(), *Table.HEAD, sep="\n", flush=True)
    rows = Table()
    try:
        run_all(f"gpucheck-{os.getpid()}", rows, only)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": [r.__dict__ for r in rows]}, f, indent=2)
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0
