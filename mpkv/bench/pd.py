"""`mpkv bench pd`: time to KV-ready on the decode side, prefill -> decode, three ways in one run.

For each prompt length, through a launched prefill instance and a launched decode instance (TP=1: on this
2-core machine a rank's worker and messager then each have a core, which is what layer-wise overlap needs):
  prefill alone   Client.prefill on the prefill instance: submit -> the worker's completion (no transfer)
  layer-wise      Client.send: the messager ships layer l as soon as the worker finished it; submit -> every
                  worker and messager reported and the lease is complete (the KV is readable on decode)
  after prefill   the same with layerwise=False: the messager ships only after the last layer (the baseline)
The three run interleaved, repeat after repeat, so drift hits them alike; medians are reported, and ratios.
Transfer bytes/s is the messager's time inside the transport (its ``busy_s``) against a plain copy of the
same blocks between two pools of the same shape in this process; per layer, a prompt ships tokens/16 blocks
(rounded up) x a block's bytes of one layer (the "KiB per layer" column). What else ran while it measured is
printed, and the targets get a verdict only on a quiet machine (mpkv.bench.machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np
import torch

from mpkv.bench import emit
from mpkv.bench.lifecycle import draw_plot, launched
from mpkv.bench.machine import Noise, noise_line, nproc, verdict_cell, verdict_line
from mpkv.client import Client
from mpkv.config import CacheConfig
from mpkv.pd.nixl import NixlUnavailable, load_nixl
from mpkv.pool.copy import copy_blocks
from mpkv.protocol import PdRole
from mpkv.verify import verify_kv

LENGTHS = (256, 1024, 2048, 4096, 8192)
LONG, SHORT = 4096, 1024  # the targets: layer-wise <= 1.15x prefill alone from LONG up; <= after-prefill to SHORT
SHIP_TARGET_KIB, SHIP_TARGET_X = 1024, 0.8  # same-host ship >= 0.8x a plain copy from 1 MiB per layer up


def geometry(max_tokens: int) -> CacheConfig:
    blocks = -(-max_tokens // 16) + 8
    return CacheConfig(
        layers=8, kv_heads=8, head_dim=64, block_size=16, hidden=64, device_blocks=blocks, host_blocks=1, tp=1
    )


def plain_copy_gbs(cfg: CacheConfig, n_blocks: int, repeats: int) -> float:
    src = torch.zeros(cfg.pool_shape(cfg.device_blocks), dtype=cfg.torch_dtype)
    dst = torch.zeros_like(src)
    src.view(torch.uint8).fill_(1)
    ids = np.arange(n_blocks, dtype=np.int64)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for layer in range(cfg.layers):
            copy_blocks(dst[layer : layer + 1], ids, src[layer : layer + 1], ids)
        times.append(time.perf_counter() - t0)
    return n_blocks * cfg.block_bytes / statistics.median(times) / 1e9


def measure(p: Client, d: Client, n: int, repeats: int, rng: np.random.Generator, via: str) -> dict[str, Any]:
    cfg = p.cfg
    tokens = rng.integers(0, cfg.vocab, n, dtype=np.int32)
    blocks = np.arange(-(-n // cfg.block_size), dtype=np.int32)
    modes = ("layerwise", "after", "nixl") if via else ("layerwise", "after")
    t: dict[str, list[float]] = {"alone": [], **{m: [] for m in modes}}
    busy: list[float] = []
    for rep in range(repeats + 1):  # the first round warms up and is verified, not timed
        t0 = time.perf_counter()
        p.wait(p.prefill(f"alone{n}", tokens, blocks))
        took = {"alone": time.perf_counter() - t0}
        for mode in modes:
            lease = d.allocate(f"{mode}{n}", n)
            batch = [(lease.request, tokens, blocks, lease)]
            t0 = time.perf_counter()
            dones = p.wait_send(p.send(d, batch, layerwise=mode != "after", via=via if mode == "nixl" else ""))
            took[mode] = time.perf_counter() - t0
            if mode == "layerwise":
                busy.append(dones[-1].busy_s)
            if rep == 0:
                # the benchmark times real transfers, not empty ones
                verify_kv(d, tokens, lease.blocks, cfg.weight_version, what=f"bench pd, {n} tokens, {mode}")
            d.allocator.release(lease)
        if rep:
            for k, v in took.items():
                t[k].append(v)
    nbytes = len(blocks) * cfg.block_bytes
    return {
        "tokens": n,
        "repeats": repeats,
        "bytes": nbytes,
        "ms": {k: statistics.median(v) * 1e3 for k, v in t.items()},
        "ship_gbs": nbytes / statistics.median(busy[1:]) / 1e9,
        "copy_gbs": plain_copy_gbs(cfg, len(blocks), repeats),
    }


def bench_pd(quick: bool) -> dict[str, Any]:
    lengths = LENGTHS[:3] if quick else LENGTHS
    cfg = geometry(max(lengths))
    pname, dname = f"benchpd-{os.getpid()}-p", f"benchpd-{os.getpid()}-d"
    rng = np.random.default_rng(0)
    decode_cfg = CacheConfig(**(cfg.__dict__ | {"pd_role": PdRole.DECODE}))
    prefill_cfg = CacheConfig(**(cfg.__dict__ | {"pd_role": PdRole.PREFILL}))
    via = ""
    try:
        load_nixl()
        port = 20000 + os.getpid() % 20000
        decode_cfg = CacheConfig(**(decode_cfg.__dict__ | {"nixl_port": port}))
        prefill_cfg = CacheConfig(**(prefill_cfg.__dict__ | {"nixl_port": port + 8}))
        via = f"nixl://127.0.0.1:{port}"
    except NixlUnavailable as e:
        print(f"(no NIXL column: {e})")
    noise = Noise(nproc())
    with launched(dname, decode_cfg) as di, launched(pname, prefill_cfg) as pi:
        p, d = Client(pname), Client(dname)
        try:
            with noise.window([di.pid, *di.pids.values(), pi.pid, *pi.pids.values()]):
                # short prompts are cheap and noisy: more repeats there
                rows = [measure(p, d, n, 2 if quick else max(7, 25 * 1024 // n), rng, via) for n in lengths]
        finally:
            p.close()
            d.close()
    return {"config": json.loads(cfg.to_json()), "rows": rows, "machine": noise.record()}


def layer_bytes(row: dict[str, Any], layers: int) -> float:
    """What the messager ships per layer for a prompt: tokens/16 blocks (rounded up) x a block's bytes per layer."""
    return float(row["bytes"]) / layers


def report_pd(r: dict[str, Any]) -> list[str]:
    c, m = r["config"], r["machine"]
    nixl = "nixl" in r["rows"][0]["ms"]
    out = [
        f"prefill -> decode, TP={c['tp']}, {c['layers']} layers, {c['kv_heads']} KV heads x {c['head_dim']}, "
        f"{c['dtype']}, hidden {c['hidden']}; medians of interleaved repeats (7 to 25 per length)",
        "",
        "| tokens | KV MiB | KiB per layer | prefill alone ms | layer-wise ms (x alone) | after-prefill ms (x alone) | "
        "layer-wise / after |"
        + (" layer-wise over NIXL ms (x alone) |" if nixl else "")
        + " ship GB/s | plain copy GB/s | ship / copy | target |",
        "|---|---|---|---|---|---|---|" + ("---|" if nixl else "") + "---|---|---|---|",
    ]
    for row in r["rows"]:
        ms = row["ms"]
        lw, af = ms["layerwise"] / ms["alone"], ms["after"] / ms["alone"]
        vs = ms["layerwise"] / ms["after"]
        target = ""
        if row["tokens"] >= LONG:
            target = f"layer-wise <= 1.15x alone: {verdict_cell(lw <= 1.15, m)}"
        elif row["tokens"] <= SHORT:
            target = f"layer-wise <= after-prefill: {verdict_cell(vs <= 1.0, m)}"
        over = f" {ms['nixl']:.1f} ({ms['nixl'] / ms['alone']:.2f}x) |" if nixl else ""
        out.append(
            f"| {row['tokens']} | {row['bytes'] / 2**20:.1f} | {layer_bytes(row, c['layers']) / 1024:.0f} | "
            f"{ms['alone']:.1f} | {ms['layerwise']:.1f} ({lw:.2f}x) | {ms['after']:.1f} ({af:.2f}x) | {vs:.2f} |{over} "
            f"{row['ship_gbs']:.2f} | {row['copy_gbs']:.2f} | {row['ship_gbs'] / row['copy_gbs']:.2f}x | {target} |"
        )
    return [*out, "", noise_line(m), ship_target(r)]


def ship_target(r: dict[str, Any]) -> str:
    """The same-host ship target's line: the worst ship / plain copy over the prompts it is stated for."""
    what = f"same-host ship >= {SHIP_TARGET_X:g}x a plain copy for >= {SHIP_TARGET_KIB // 1024} MiB per layer"
    big = [row for row in r["rows"] if layer_bytes(row, r["config"]["layers"]) >= SHIP_TARGET_KIB * 1024]
    if not big:
        return f"target: {what}: not measured (no prompt that long)"
    worst = min(big, key=lambda row: row["ship_gbs"] / row["copy_gbs"])
    x = worst["ship_gbs"] / worst["copy_gbs"]
    return verdict_line(what, f"worst {x:.2f}x ({worst['tokens']} tokens)", x >= SHIP_TARGET_X, r["machine"])


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    r = bench_pd(args.quick)
    emit(report_pd(r), r, args.json)
    draw_plot(args, r)
    return 0
