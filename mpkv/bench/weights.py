"""`mpkv bench weights`: weights from a trainer into a running instance (NOTE [ weight publications ] in
mpkv.publication), against a plain memcpy of the same bytes, in one run.

Per size (50M and 200M parameters, bfloat16; ``--quick``: 15M): a seeded Llama-shaped checkpoint is written to a
private scratch directory, an instance (TP=1, cpu) serves it, and this process plays the trainer with the same
tensors in memory. Measured, in this order:
  memcpy    ``copy_`` of one flat buffer of the model's bytes into another, both warm (the floor of any copy);
  publish   ``Controller.update_weights`` of a new version: the first into fresh buffers (segments created, every
            page faulted in), then re-publishes into the buffers of a version no longer served (the double
            buffer's reuse);
  load      what a worker does at a restore, here in this process: map the publication and copy every tensor
            into the memory of the weights held (in place), and the same into fresh memory;
  RL step   pause, clear, publish, restore (each worker loads before it acknowledges), resume, each timed.
Publishes and loads are timed ``repeats`` times (versions alternate between the two slots); each row reports
the median, and the re-publish + load throughput as a fraction of memcpy (the target: at least 0.5). How busy
the rest of the machine was is reported with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mpkv.bench import emit, machine_line, scratch_dir
from mpkv.bench.allreduce import Machine

# (label, layers, vocab): hidden 1024, 16 heads (4 KV heads), intermediate 2816; ~11.3M parameters per layer
SIZES = {"15M": (1, 2048), "50M": (3, 8192), "200M": (16, 8192)}
GEOMETRY = dict(hidden=1024, heads=16, kv_heads=4, intermediate=2816)
SEED = 0


def _median_s(times: list[float]) -> float:
    return statistics.median(times)


def _memcpy_s(nbytes: int, repeats: int) -> list[float]:
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    dst.copy_(src)  # both warm
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        out.append(time.perf_counter() - t0)
    return out


def _load_s(ctl: Any, version: int, fresh: bool, maps: Any) -> float:
    """A worker's load of ``version`` at TP=1 (rank 0), in this process, as the worker does it (its bucket mappings
    ``maps`` kept between loads): into held weights, or fresh memory."""
    from mpkv.models.hf_config import read_config
    from mpkv.models.weights import allocate, fill, slice_of
    from mpkv.publication import OpenPublication, expected_tensors

    cfg = read_config(ctl.cfg.model)
    pub = ctl.inst.read_weights().find(version)
    held = allocate(cfg, 0, 1, torch.bfloat16, "cpu")
    if not fresh and held.arena is not None:
        held.arena.zero_()  # every page there: the memory of weights a worker holds
    t0 = time.perf_counter()
    with OpenPublication(pub, 0, expected_tensors(cfg), maps) as p:
        fill(held, cfg, 0, 1, lambda part: slice_of(p.tensor(part.name), part))
    return time.perf_counter() - t0


def run_size(label: str, repeats: int, scratch: str) -> dict[str, Any]:
    import mpkv
    from mpkv import Controller
    from mpkv.models.hf_config import read_config
    from mpkv.models.tiny import write_checkpoint
    from mpkv.models.weights import _Checkpoint, _parts
    from mpkv.publication import BucketMaps

    layers, vocab = SIZES[label]
    model_dir = write_checkpoint(Path(scratch) / label, SEED, layers=layers, vocab=vocab, **GEOMETRY)  # type: ignore[arg-type]
    cfg = read_config(model_dir)
    ckpt = _Checkpoint(model_dir)
    tensors = {p.name: ckpt.read(p).to(torch.bfloat16) for p in _parts(cfg, 0, 1)}
    nbytes = sum(t.nbytes for t in tensors.values())
    params = sum(t.numel() for t in tensors.values())
    name = f"bench-weights-{os.getpid()}"
    row: dict[str, Any] = {"size": label, "params": params, "bytes": nbytes}
    with mpkv.launch(name, tp=1, model=str(model_dir), dtype="bfloat16", device_blocks=16, host_blocks=16) as inst:
        machine = Machine(list(inst.pids.values()))
        with Controller(name, timeout_s=600) as ctl:
            row["memcpy_s"] = _memcpy_s(nbytes, repeats)
            first = ctl.update_weights(tensors, 2)
            assert not first.reused
            row["first_publish_s"] = first.seconds
            maps = BucketMaps()
            row["first_load_s"] = _load_s(ctl, 2, fresh=True, maps=maps)
            # One RL step whose publish goes into the other slot's fresh buffers, then steps that reuse buffers.
            steps: list[dict[str, Any]] = []
            for version in range(3, 4 + repeats):
                t: dict[str, Any] = {}
                t["pause"] = ctl.pause().latency_s
                t["clear"] = ctl.clear().latency_s
                pub = ctl.update_weights(tensors, version)
                t["publish"], t["reused"] = pub.seconds, pub.reused
                t["restore"] = ctl.restore(version).latency_s
                t["resume"] = ctl.resume().latency_s
                t["load_in_place"] = _load_s(ctl, version, fresh=False, maps=maps) if pub.reused else None
                steps.append(t)
            row["steps"] = steps
            maps.close()
        row["machine"] = machine.stop()
    reused = [s for s in steps if s["reused"]]
    row["republish_s"] = [s["publish"] for s in reused]
    row["load_s"] = [s["load_in_place"] for s in reused]
    return row


def report(r: dict[str, Any]) -> list[str]:
    lines = [
        f"weights from a trainer into an instance (TP=1, cpu, bfloat16; torch {r['torch']}, {r['cpus']} CPUs, "
        f"{r['date']}); medians over {r['repeats']} repeats",
        "",
        "| size | bytes | memcpy GB/s | first publish GB/s | re-publish GB/s | first load GB/s | load (in place) "
        "GB/s | re-publish + load GB/s | vs memcpy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        gb = row["bytes"] / 1e9
        memcpy = gb / _median_s(row["memcpy_s"])
        both = gb / (_median_s(row["republish_s"]) + _median_s(row["load_s"]))
        lines.append(
            f"| {row['size']} ({row['params'] / 1e6:.0f}M params) | {row['bytes'] / 2**20:.0f} MiB | {memcpy:.2f} | "
            f"{gb / row['first_publish_s']:.2f} | {gb / _median_s(row['republish_s']):.2f} | "
            f"{gb / row['first_load_s']:.2f} | {gb / _median_s(row['load_s']):.2f} | {both:.2f} | "
            f"{both / memcpy:.2f}x |"
        )
    lines += ["", "RL step, split (ms, median over the steps that reuse buffers; restore includes the worker's load):"]
    lines += ["", "| size | pause | clear | publish | restore | resume | total |", "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        reused = [s for s in row["steps"] if s["reused"]]
        parts = {k: _median_s([s[k] for s in reused]) * 1e3 for k in ("pause", "clear", "publish", "restore", "resume")}
        cells = " | ".join(f"{v:.1f}" for v in parts.values())
        lines.append(f"| {row['size']} | {cells} | {sum(parts.values()):.1f} |")
    lines.append("")
    lines += [machine_line(f"during {row['size']}", row["machine"]) for row in r["rows"]]
    return lines


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        p = argparse.ArgumentParser(prog="python -m mpkv.bench.weights", description=__doc__.split("\n")[0])
        p.add_argument("--quick", action="store_true")
        p.add_argument("--json")
        p.add_argument("--sizes", help=f"comma-separated, of {', '.join(SIZES)} (default: 50M,200M)")
        args = p.parse_args()
    repeats = 3 if args.quick else 5
    sizes = ["15M"] if args.quick else ["50M", "200M"]
    if getattr(args, "sizes", None):
        sizes = args.sizes.split(",")
        if not set(sizes) <= set(SIZES):
            raise SystemExit(f"--sizes: each of {', '.join(SIZES)}; got {args.sizes}")
    with scratch_dir("weights") as scratch:
        rows = [run_size(label, repeats, scratch) for label in sizes]
    r = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "repeats": repeats,
        "rows": rows,
    }
    emit(report(r), r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
