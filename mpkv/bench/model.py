"""`mpkv bench model`: a small Llama's prefill and decode through launched instances, side by side with
transformers' own greedy ``generate`` and with mpkv's model alone in this process, in one run.

The checkpoint is the seeded Llama of ``mpkv.bench.model_decode`` (hidden 256, 4 layers, float32), written with
transformers to a temporary directory; every contender loads it from there. For batch 1 and batch 8, the same
prompts (all of one length: no padding) go through

  ref    transformers' ``generate`` (greedy, use_cache=True) in this process, ``torch.set_num_threads(1)`` (each
         worker runs one thread too: mpkv.actors.entry);
  alone  mpkv's paged ``LlamaModel`` in this process (prefill, then one decode call per token): the model's own
         cost, with no task path;
  tp1    ``Client.generate`` on an instance launched with the checkpoint, TP=1: one batched prefill task, then
         one decode task per token over the whole batch, each a round trip client -> worker -> client;
  tp2    the same on a TP=2 instance (two workers, an all-reduce per layer through shared memory);
  pd     ``Client.generate(prompts, n, prefill_on=...)`` on a TP=1 decode instance with a TP=1 prefill instance:
         the prompts are prefilled there, their KV shipped layer by layer into the decode pool, decoded here.

Prefill is the time to the first token of every prompt of the batch (for the reference, generate's own setup
too; for pd, the shipping too). Decode tokens/s counts every token after the first, across the batch. Each
contender runs once to warm up, then repeat after repeat in rotating order (drift hits them alike); medians are
reported, and ratios against the reference. Every run's tokens must equal the reference's (greedy): the run
fails otherwise. Next to the numbers: how busy the rest of the machine was (CPU time of every process but this
one and the instances' own, from /proc/stat, in cores), and where an instance's decode step goes (the worker's
CPU per step, this client's, against the step's wall time and the model alone, and the one-way wake-up latency
between two processes measured here: a step is two of those, client -> worker -> client).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpkv.bench import all_equal, emit, scratch_dir
from mpkv.bench.lifecycle import one_way_signal_us
from mpkv.bench.model_decode import (
    BATCHES,
    BLOCK,
    MODEL,
    SEED,
    TARGETS,
    Load,
    Run,
    block_tables,
    first_difference,
    run_mpkv,
    run_reference,
    save_model,
    token_differences,
    transformers,
)
from mpkv.client import Client, Ticket
from mpkv.launched import LaunchedInstance, launch_args
from mpkv.models import LlamaModel, load_weights, read_config
from mpkv.protocol import Done
from mpkv.shm.proc import cpu_seconds

WAYS = ("ref", "alone", "tp1", "tp2", "pd")
LABELS = {
    "ref": "transformers generate",
    "alone": "mpkv model alone (in process)",
    "tp1": "mpkv instance TP=1",
    "tp2": "mpkv instance TP=2",
    "pd": "mpkv prefill -> decode (TP=1 each)",
}


class TimedClient(Client):
    """A Client that notes when each wait for completions returns (``generate`` waits once per prefill task or PD
    batch, then once per decode step), and at the ``snap_at``-th such return (0: when asked), the CPU time so far
    of the ``watch`` processes (the decoding workers) and of this process."""

    def __init__(self, name: str, watch: Sequence[int] = ()) -> None:
        super().__init__(name)
        self.watch = list(watch)
        self.marks: list[float] = []
        self.snap_at = 0
        self.snaps: list[tuple[float, float]] = []

    def reset(self, snap_at: int) -> None:
        self.marks, self.snaps, self.snap_at = [], [], snap_at
        if snap_at == 0:
            self.snap()

    def snap(self) -> None:
        self.snaps.append((sum(cpu_seconds(pid) for pid in self.watch), time.process_time()))

    def _mark(self) -> None:
        self.marks.append(time.perf_counter())
        if len(self.marks) == self.snap_at:
            self.snap()

    def wait(self, ticket: Ticket, timeout_s: float = 60.0) -> list[Done]:
        dones = super().wait(ticket, timeout_s)
        self._mark()
        return dones

    def wait_send(self, ticket: Ticket, timeout_s: float = 60.0) -> list[Done]:
        dones = super().wait_send(ticket, timeout_s)
        self._mark()
        return dones


@dataclass
class Served:
    """One contender served by instances: the client that decodes, and the one that prefills for it (PD)."""

    decode: TimedClient
    prefill: TimedClient | None
    tp: int


@dataclass
class Step:
    """A decode run's cost per step: wall time, the decoding workers' CPU (per worker), this process's CPU."""

    wall_ms: float
    worker_cpu_ms: float
    client_cpu_ms: float


def run_served(s: Served, prompts: list[list[int]], new: int) -> tuple[Run, Step]:
    c, pre = s.decode, s.prefill
    c.reset(snap_at=0 if pre is not None else 1)  # the decode steps start after the prefill's one wait
    if pre is not None:
        pre.reset(snap_at=-1)
    t0 = time.perf_counter()
    out = c.generate(prompts, new, prefill_on=pre)
    c.snap()
    marks = sorted(c.marks + (pre.marks if pre is not None else []))
    first_waits = 1  # one batched prefill (a PD batch, or one PrefillBatch task)
    assert len(marks) == first_waits + new - 1, f"{len(marks)} waits, expected {first_waits + new - 1}"
    first, last = marks[first_waits - 1], marks[-1]
    (w0, p0), (w1, p1) = c.snaps
    steps = new - 1
    step = Step((last - first) / steps * 1e3, (w1 - w0) / s.tp / steps * 1e3, (p1 - p0) / steps * 1e3)
    return Run([o.tolist() for o in out], first - t0, last - first), step


@dataclass
class Local:
    """The contenders in this process: transformers' model, and mpkv's with its pool of ``blocks`` blocks."""

    ref: Any
    model: LlamaModel
    pool: torch.Tensor
    blocks: int


def stop_all(launched: dict[str, LaunchedInstance]) -> None:
    """Stop every instance at once (each stop waits for its launcher to tear its actors down)."""
    with ThreadPoolExecutor(max_workers=max(len(launched), 1)) as pool:
        list(pool.map(lambda inst: inst.stop(), launched.values()))


@contextmanager
def instances(
    model_dir: Path, blocks: int, meanwhile: Callable[[], None]
) -> Iterator[tuple[dict[str, Served], list[int]]]:
    """The instances of the run, launched with the checkpoint, all up at once (the contenders interleave), always
    torn down; with the pids of their launchers and actors. ``meanwhile`` runs while they start."""
    base = f"benchmodel-{os.getpid()}"
    common: dict[str, Any] = dict(model=str(model_dir), block_size=BLOCK, device_blocks=blocks, host_blocks=1)
    with ExitStack() as stack:
        launched: dict[str, LaunchedInstance] = {}
        stack.callback(stop_all, launched)
        for tag, tp, role in (("tp1", 1, "mixed"), ("tp2", 2, "mixed"), ("pdd", 1, "decode"), ("pdp", 1, "prefill")):
            # mpkv.launch's steps, with every launcher started before any is waited for (each imports torch)
            name = f"{base}-{tag}"
            launched[tag] = LaunchedInstance(name, launch_args(name, tp=tp, role=role, **common))
            launched[tag].start()
        meanwhile()
        for inst in launched.values():
            inst.wait_ready()

        def client(tag: str) -> TimedClient:
            workers = [pid for who, pid in launched[tag].pids.items() if who.startswith("worker:")]
            c = TimedClient(launched[tag].name, workers)
            stack.callback(c.close)
            return c

        served = {
            "tp1": Served(client("tp1"), None, 1),
            "tp2": Served(client("tp2"), None, 2),
            "pd": Served(client("pdd"), client("pdp"), 1),
        }
        ours = [pid for inst in launched.values() for pid in (inst.pid, *inst.pids.values())]
        yield served, ours


def measure(
    local: Local, served: dict[str, Served], ours: list[int], batch: int, prompt_len: int, new: int, repeats: int
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(SEED + batch)
    prompts = torch.randint(0, local.model.cfg.vocab, (batch, prompt_len), generator=g)
    as_lists = prompts.tolist()
    tables = block_tables(batch, prompt_len + new, local.blocks)

    def run(who: str) -> tuple[Run, Step | None]:
        if who == "ref":
            return run_reference(local.ref, prompts, new), None
        if who == "alone":
            r = run_mpkv(local.model, local.pool, prompts, tables, new)
            t0 = time.perf_counter()  # and the prefill one prompt at a time, for comparison with the batched one
            for p, table in zip(prompts, tables, strict=True):
                local.model.prefill([p], [table], local.pool)
            each.append(time.perf_counter() - t0)
            return r, None
        return run_served(served[who], as_lists, new)

    each: list[float] = []

    want = run("ref")[0].tokens
    warm = {who: [run(who)[0].tokens] for who in WAYS if who != "ref"}  # warm-up, checked, not timed
    each.clear()
    runs: dict[str, list[Run]] = {who: [] for who in WAYS}
    steps: dict[str, list[Step]] = {who: [] for who in served}
    load = Load(ours=ours)
    load.start()
    for i in range(repeats):
        for who in WAYS[i % len(WAYS) :] + WAYS[: i % len(WAYS)]:
            r, step = run(who)
            runs[who].append(r)
            if step is not None:
                steps[who].append(step)
    machine = load.stop()
    diff = first_difference(
        {f"{who} (warm-up)": outs for who, outs in warm.items()}
        | {w: [r.tokens for r in rs] for w, rs in runs.items()},
        want,
    )
    decoded = batch * (new - 1)
    out: dict[str, Any] = {"batch": batch, "equal": diff is None, "first_diff": diff, "machine": machine, "ways": {}}
    for who, rs in runs.items():
        rates = [decoded / r.decode_s for r in rs]
        row = {
            "prefill_ms": statistics.median(r.prefill_s for r in rs) * 1e3,
            "decode_tok_s": statistics.median(rates),
            "decode_tok_s_min": min(rates),
            "decode_tok_s_max": max(rates),
            "step_ms": statistics.median(r.decode_s for r in rs) / (new - 1) * 1e3,
            "step_cpu_ms": statistics.median(r.decode_cpu_s for r in rs) / (new - 1) * 1e3,
        }
        if who in steps:
            row |= {
                k: statistics.median(getattr(s, k) for s in steps[who])
                for k in ("wall_ms", "worker_cpu_ms", "client_cpu_ms")
            }
        out["ways"][who] = row
    out["ways"]["alone"]["prefill_each_ms"] = statistics.median(each) * 1e3
    return out


def pool_blocks(prompt_len: int, new: int) -> int:
    return max(BATCHES) * -(-(prompt_len + new) // BLOCK) + 4


def bench(prompt_len: int, new: int, repeats: int, quick: bool) -> dict[str, Any]:
    t_start = time.perf_counter()
    torch.set_num_threads(1)  # the reference and the model alone: one thread, as each worker
    hf = transformers()
    blocks = pool_blocks(prompt_len, new)
    with scratch_dir("model") as tmp:
        model_dir = save_model(Path(tmp) / "llama")
        locals_: list[Local] = []

        def load_local() -> None:
            ref = hf.AutoModelForCausalLM.from_pretrained(model_dir).eval()  # float32, as saved
            cfg = read_config(model_dir)
            alone = LlamaModel(cfg, load_weights(model_dir, cfg, dtype=torch.float32))
            pool = torch.zeros(alone.pool_shape(blocks, BLOCK), dtype=torch.float32)
            locals_.append(Local(ref, alone, pool, blocks))

        t0 = time.perf_counter()
        with instances(model_dir, blocks, load_local) as (served, ours):
            t1 = time.perf_counter()
            local = locals_[0]
            dtype = served["tp1"].decode.cfg.dtype
            wake_us = 0.0 if quick else one_way_signal_us(200)
            t2 = time.perf_counter()
            rows = [measure(local, served, ours, b, prompt_len, new, repeats) for b in BATCHES]
            t3 = time.perf_counter()
        t4 = time.perf_counter()
    phases = {"setup": t0 - t_start, "launch": t1 - t0, "wake-up floor": t2 - t1, "measure": t3 - t2, "stop": t4 - t3}
    return {
        "torch": torch.__version__,
        "transformers": hf.__version__,
        "attn": local.ref.config._attn_implementation,
        "pool_dtype": dtype,
        "prompt_len": prompt_len,
        "new": new,
        "repeats": repeats,
        "device_blocks": blocks,
        "launch_s": t1 - t0,
        "phases_s": phases,
        "one_way_wake_us": wake_us,
        "model": MODEL,
        "rows": rows,
    }


def report(r: dict[str, Any]) -> list[str]:
    m = MODEL
    lines = [
        f"Llama checkpoint (transformers {r['transformers']}): hidden {m['hidden_size']}, {m['num_hidden_layers']} "
        f"layers, {m['num_attention_heads']} heads / {m['num_key_value_heads']} KV heads, intermediate "
        f"{m['intermediate_size']}, vocab {m['vocab_size']}, float32 (pools: {r['pool_dtype']}); block size {BLOCK}",
        f"prompt {r['prompt_len']} tokens, {r['new']} new tokens per request, greedy; median of {r['repeats']} "
        f"interleaved repeats; torch {r['torch']}, one thread per process; machine: {os.cpu_count()} CPUs",
        f"reference: transformers generate (attn {r['attn']}, use_cache=True) in this process; instances: launched "
        f"once ({r['launch_s']:.1f} s for all four), every actor one thread",
        "run's phases, s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phases_s"].items()),
        "",
        "| batch | contender | prefill ms | prefill ref/this | decode tok/s (min-max) | decode this/ref | target "
        "| tokens equal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        ref = row["ways"]["ref"]
        for who in WAYS:
            w = row["ways"][who]
            ratio = w["decode_tok_s"] / ref["decode_tok_s"]
            want = TARGETS.get(row["batch"]) if who == "tp1" else None
            target = f">= {want:.1f}x: {'PASS' if ratio >= want else 'MISS'}" if want else ""
            lines.append(
                f"| {row['batch']} | {LABELS[who]} | {w['prefill_ms']:.1f} | "
                f"{ref['prefill_ms'] / w['prefill_ms']:.2f}x "
                f"| {w['decode_tok_s']:.0f} ({w['decode_tok_s_min']:.0f}-{w['decode_tok_s_max']:.0f}) | {ratio:.2f}x "
                f"| {target} | {'yes' if row['equal'] else 'NO'} |"
            )
    lines.append("")
    for row in r["rows"]:
        mach = row["machine"]
        lines.append(
            f"batch {row['batch']}: other processes (not this one, not the instances) used {mach['others_cores']:.2f} "
            f"of {os.cpu_count()} cores over the {mach['wall_s']:.0f} s of timed runs (the instances' launchers and "
            f"actors {mach['ours_cores']:.2f}); load average {mach['loadavg_start']:.1f} -> {mach['loadavg_end']:.1f}"
        )
    lines += [
        "",
        "where a decode step goes (medians, ms per step; one-way wake-up between two processes here: "
        + (f"{r['one_way_wake_us']:.0f} us, two per step):" if r["one_way_wake_us"] else "not measured in --quick):"),
        "| batch | contender | step wall | worker CPU (per worker) | client CPU | on no CPU (wall - worker - client) "
        "| wall - model alone's wall |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        alone = row["ways"]["alone"]
        lines.append(
            f"| {row['batch']} | {LABELS['alone']} | {alone['step_ms']:.2f} | {alone['step_cpu_ms']:.2f} (this "
            f"process) | | {alone['step_ms'] - alone['step_cpu_ms']:.2f} | |"
        )
        for who in ("tp1", "tp2", "pd"):
            w = row["ways"][who]
            lines.append(
                f"| {row['batch']} | {LABELS[who]} | {w['wall_ms']:.2f} | {w['worker_cpu_ms']:.2f} | "
                f"{w['client_cpu_ms']:.2f} | {w['wall_ms'] - w['worker_cpu_ms'] - w['client_cpu_ms']:.2f} | "
                f"{w['wall_ms'] - alone['step_ms']:+.2f} |"
            )
    lines.append(
        "(process CPU times are read from /proc in clock ticks of "
        f"{1e3 / os.sysconf('SC_CLK_TCK'):.0f} ms, over a run of {r['new'] - 1} steps: +-"
        f"{1e3 / os.sysconf('SC_CLK_TCK') / (r['new'] - 1):.2f} ms per step); TP=2: "
        f"{2 * r['model']['num_hidden_layers']} all-reduces per step (two per layer), each a meeting of both workers"
    )
    for row in r["rows"]:
        w = row["ways"]
        lines.append(
            f"prefill of batch {row['batch']}, ms: model alone {w['alone']['prefill_ms']:.1f} (one forward over "
            f"every prompt), {w['alone']['prefill_each_ms']:.1f} (one prompt at a time); instance TP=1 "
            f"{w['tp1']['prefill_ms']:.1f} (Client.generate: one batched prefill task); prefill -> decode "
            f"{w['pd']['prefill_ms']:.1f} (one PD batch, shipped layer by layer)"
        )
    return lines + token_differences(r["rows"])


def main(args: argparse.Namespace) -> int:
    prompt_len, new, repeats = (16, 8, 1) if args.quick else (64, 64, 5)
    r = bench(prompt_len, new, repeats, args.quick)
    emit(report(r), r, args.json)
    return all_equal(r)
