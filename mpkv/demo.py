"""`mpkv demo`: the main job on the embedded default (cpu backend).

Launches a prefill instance and a decode instance, TP=2 each (mpkv.launch: `mpkv launch` in child processes),
then runs cycles of:
  - on the prefill instance: prefills of random lengths, a read-back of every request's KV from every rank
    compared byte for byte with the synthetic model's recomputation in this process, swaps out and back in to
    other device blocks (verified again);
  - prefill -> decode: a stream of requests of varied prompt lengths, leased on the decode side, batched by
    this engine, prefilled and shipped layer by layer; every byte verified on the decode side;
  - an RL transaction on both instances with a new weight version: pause, clear device and host, restore,
    resume. After each restore the host entries of the old version must be refused (stale KV is never served)
    and new KV must match the new weights.
Ends with a summary; exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mpkv.client import Client, TaskFailed
from mpkv.controller import Controller
from mpkv.launched import launch
from mpkv.launcher import ready_line
from mpkv.verify import verify_kv


@dataclass
class Tally:
    prefills: int = 0
    transfers: int = 0
    transfer_batches: int = 0
    transferred_bytes: int = 0
    transfer_ms: list[float] = field(default_factory=list)
    kv_bytes_written: int = 0
    swapped_bytes: int = 0
    verified_bytes: int = 0
    stale_refusals: int = 0
    clear_ms: list[float] = field(default_factory=list)
    restore_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def checked_bytes(client: Client, tokens: np.ndarray, ids: np.ndarray, wv: int, what: str, host: bool = False) -> int:
    """Check ``ids`` against the recomputation on every rank (mpkv.verify); the bytes of KV compared."""
    cfg = client.cfg
    ranks = verify_kv(client, tokens, ids, wv, host=host, what=what)
    return ranks * cfg.layers * 2 * len(tokens) * cfg.heads_per_rank * cfg.head_dim * cfg.itemsize


def ship(client: Client, decode: Client, rng: random.Random, n: int, wv: int, t: Tally) -> None:
    """Prefill -> decode: ``n`` requests of varied lengths, in batches of 1-4 fixed here, each batch sent only
    once its destination blocks are leased; every byte checked on the decode side, then the blocks given back."""
    cfg = client.cfg
    free = list(range(cfg.device_blocks))
    rng.shuffle(free)
    sent = 0
    while sent < n:
        batch = []
        for j in range(min(rng.randint(1, 4), n - sent)):
            n_tokens = rng.randint(1, 16 * cfg.block_size)
            tokens = np.array([rng.randrange(cfg.vocab) for _ in range(n_tokens)], dtype=np.int32)
            lease = decode.allocate(f"pd{t.transfers + j}", n_tokens)
            src = np.array([free.pop() for _ in lease.blocks], dtype=np.int32)
            batch.append((lease.request, tokens, src, lease))
        t0 = time.perf_counter()
        client.wait_send(client.send(decode, batch))
        t.transfer_ms.append((time.perf_counter() - t0) * 1e3)
        t.transfer_batches += 1
        for request, tokens, src, lease in batch:
            t.verified_bytes += checked_bytes(decode, tokens, lease.blocks, wv, f"decode copy of {request}")
            t.transferred_bytes += len(src) * cfg.block_bytes * cfg.tp
            decode.allocator.release(lease)
            free.extend(src.tolist())
            t.transfers += 1
        sent += len(batch)


def run(cycles: int, tp: int, requests_per_cycle: int, seed: int) -> Tally:
    name, dname = f"demo-{os.getpid()}-p", f"demo-{os.getpid()}-d"
    t = Tally()
    with launch(dname, tp=tp, role="decode") as decode_inst, launch(name, tp=tp, role="prefill") as prefill_inst:
        for inst in (decode_inst, prefill_inst):
            print(ready_line(inst.ready))
        try:
            _cycles(name, dname, cycles, requests_per_cycle, random.Random(seed), t)
            for inst in (prefill_inst, decode_inst):  # shut down by their controllers: each exits 0 on its own
                code = inst.wait_exit()
                if code != 0:
                    t.errors.append(f"the launcher of {inst.name} exited with {code}; its actors' logs: {inst.log_dir}")
        except BaseException as e:
            t.errors.append(f"{type(e).__name__}: {e}")
            raise
    return t


def _cycles(name: str, dname: str, cycles: int, requests_per_cycle: int, rng: random.Random, t: Tally) -> None:
    """The RL cycles on the prefill instance ``name`` and the decode instance ``dname``; then shuts both down."""
    client, ctl = Client(name), Controller(name)
    decode, dctl = Client(dname), Controller(dname)
    cfg = client.cfg
    free = list(range(cfg.device_blocks))
    wv = ctl.weight_version
    for cycle in range(1, cycles + 1):
        t0 = time.perf_counter()
        rng.shuffle(free)
        live: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(requests_per_cycle):
            n_tokens = rng.randint(1, 12 * cfg.block_size)
            need = -(-n_tokens // cfg.block_size)
            if len(free) < need:
                break
            blocks = np.array([free.pop() for _ in range(need)], dtype=np.int32)
            tokens = np.array([rng.randrange(cfg.vocab) for _ in range(n_tokens)], dtype=np.int32)
            client.wait(client.prefill(f"c{cycle}-r{i}", tokens, blocks))
            t.prefills += 1
            t.kv_bytes_written += need * cfg.block_bytes * cfg.tp
            t.verified_bytes += checked_bytes(client, tokens, blocks, wv, f"prefill c{cycle}-r{i}")
            live.append((tokens, blocks))
        # Swap half of the requests out, reuse their device blocks elsewhere, swap them back in.
        parked: list[tuple[np.ndarray, np.ndarray]] = []
        for tokens, blocks in live[: len(live) // 2]:
            dones = client.wait(client.swap_out(blocks))
            slots = dones[0].slots
            assert slots is not None, "a swap-out completion without its host slots"
            assert all(np.array_equal(np.asarray(d.slots), slots) for d in dones), "ranks chose different slots"
            t.verified_bytes += checked_bytes(client, tokens, slots, wv, "host copy", host=True)
            parked.append((tokens, slots))
            free.extend(blocks.tolist())
            t.swapped_bytes += len(blocks) * cfg.block_bytes * cfg.tp
        rng.shuffle(free)
        stale: list[np.ndarray] = []
        for tokens, slots in parked:
            blocks = np.array([free.pop() for _ in range(len(slots))], dtype=np.int32)
            client.wait(client.swap_in(slots, blocks, free_slots=False))
            t.verified_bytes += checked_bytes(client, tokens, blocks, wv, "swapped-in copy")
            t.swapped_bytes += len(blocks) * cfg.block_bytes * cfg.tp
            free.extend(blocks.tolist())
            stale.append(slots)
        for _, blocks in live[len(live) // 2 :]:
            free.extend(blocks.tolist())
        ship(client, decode, rng, 2 * requests_per_cycle, wv, t)
        # The RL transaction on both instances: new weights; nothing of the old version may be served after.
        for c in (ctl, dctl):
            c.pause()
            res = c.clear()
            t.clear_ms.append(res.latency_s * 1e3)
            t.released.append(sum(res.released_bytes.values()))
        wv += 1
        for c in (ctl, dctl):
            res = c.restore(wv)
            t.restore_ms.append(res.latency_s * 1e3)
            c.resume()
        for slots in stale:
            try:
                client.wait(client.swap_in(slots, np.arange(len(slots), dtype=np.int32)))
                t.errors.append(f"cycle {cycle}: host KV of weight version {wv - 1} was served after restore")
            except TaskFailed as e:
                assert "hold nothing" in str(e) or "weight version" in str(e), e
                t.stale_refusals += 1
        t.cycle_ms.append((time.perf_counter() - t0) * 1e3)
        print(
            f"cycle {cycle:3}/{cycles}: {len(live)} prefills, {len(parked)} swapped out and in, "
            f"{t.transfers} shipped to decode so far, clear "
            f"{t.clear_ms[-1]:.1f} ms (released {t.released[-1] / 2**20:.1f} MiB), "
            f"restore {t.restore_ms[-1]:.1f} ms, "
            f"now weight version {wv}, {t.verified_bytes / 2**20:.1f} MiB verified so far",
            flush=True,
        )
    client.close()
    decode.close()
    for c in (ctl, dctl):
        c.shutdown()
        c.close()


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cycles = 3 if args.quick else args.cycles
    seed = int(os.environ.get("MPKV_DEMO_SEED", random.randrange(2**31)))
    print(
        f"mpkv demo: a prefill and a decode instance, tp={args.tp} each, {cycles} RL cycles, seed {seed} "
        f"(replay with MPKV_DEMO_SEED={seed})"
    )
    t = run(cycles, args.tp, requests_per_cycle=4 if args.quick else 8, seed=seed)
    mib = 2**20
    print("\nsummary")
    print(f"  prefills                {t.prefills} ({t.kv_bytes_written / mib:.1f} MiB of KV written)")
    print(f"  swapped                 {t.swapped_bytes / mib:.1f} MiB out and in")
    print(
        f"  prefill -> decode       {t.transfers} requests in {t.transfer_batches} batches, "
        f"{t.transferred_bytes / mib:.1f} MiB shipped layer by layer; batch p50 {_pct(t.transfer_ms, 50):.1f} ms"
    )
    print(f"  verified                {t.verified_bytes / mib:.1f} MiB, byte for byte against the recomputation")
    print(f"  RL cycles               {len(t.clear_ms) // 2} (on both instances)")
    print(f"  clear latency           p50 {_pct(t.clear_ms, 50):.1f} ms, p99 {_pct(t.clear_ms, 99):.1f} ms")
    print(f"  restore latency         p50 {_pct(t.restore_ms, 50):.1f} ms, p99 {_pct(t.restore_ms, 99):.1f} ms")
    print(f"  released per clear      {_pct([float(x) for x in t.released], 50) / mib:.1f} MiB (median, measured)")
    print(f"  stale KV refused        {t.stale_refusals} swap-ins of an old weight version")
    print(f"  errors                  {len(t.errors)}")
    for e in t.errors:
        print(f"    {e}")
    return 0 if not t.errors else 1
