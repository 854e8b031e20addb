"""``mpkv bench rl|swap|pd --plot FILE.png``: how a cost grows, each curve beside its baseline, from the results
dict the benchmark writes with ``--json``. matplotlib (Agg: no display) is the optional extra ``mpkv[bench]``.

A run's JSON drawn again later: ``python -m mpkv.bench.plot rl|swap|pd RESULTS.json FILE.png``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTTED = ("rl", "swap", "pd")
GB = 1e9


def missing(what: str) -> str | None:
    """Why ``--plot`` cannot draw benchmark ``what`` here (checked before the benchmark runs), or None."""
    if what not in PLOTTED:
        return f"--plot draws {', '.join(PLOTTED)} only, not {what}; nothing was run"
    if importlib.util.find_spec("matplotlib") is None:
        return "--plot needs matplotlib: install it with `pip install mpkv[bench]`; nothing was run"
    return None


def _figure(panels: int) -> tuple[Figure, list[Axes]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    return fig, list(axes[0])


def _save(fig: Figure, path: str, title: str) -> None:
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)


def rl(r: dict[str, Any], path: str) -> None:
    """Handshake cycle and CPU per cycle against TP, with the floor; restore and clear against pool size, with
    the allocation and release floors."""
    from mpkv.bench.lifecycle import HOPS_PER_CYCLE, TARGET_CYCLE_MS, TARGET_TP

    fig, (by_tp, cpu, by_pool) = _figure(3)
    tps = [t["tp"] for t in r["tp_rows"]]
    floor_ms = HOPS_PER_CYCLE * r["floor_one_way_us"] / 1e3
    by_tp.plot(tps, [t["cycle"] for t in r["tp_rows"]], "o-", label="handshake cycle p50 (1-block pool)")
    by_tp.plot(tps, [t["cycle_p99"] for t in r["tp_rows"]], "o:", label="p99")
    by_tp.axhline(floor_ms, color="gray", linestyle="--", label=f"floor: {HOPS_PER_CYCLE} one-way signals")
    by_tp.axhline(TARGET_CYCLE_MS, color="red", linestyle=":", label=f"target at TP={TARGET_TP}")
    by_tp.set(xlabel="TP", ylabel="ms", xticks=tps, title="handshake cycle")
    cpu.plot(tps, [t["actor_cpu"] for t in r["tp_rows"]], "o-", label="actors (summed)")
    cpu.plot(tps, [t["controller_cpu"] for t in r["tp_rows"]], "o-", label="controller")
    cpu.axhline(floor_ms, color="gray", linestyle="--", label="cycle floor (wall)")
    cpu.set(xlabel="TP", ylabel="CPU ms per cycle", xticks=tps, title="CPU per handshake cycle")
    mib = [p["pool_mib"] for p in r["pool_rows"]]
    by_pool.plot(mib, [p["restore"] for p in r["pool_rows"]], "o-", label="restore p50")
    by_pool.plot(mib, [p["floor"]["alloc"] for p in r["pool_rows"]], "s--", label="allocation floor")
    by_pool.plot(mib, [p["clear"] for p in r["pool_rows"]], "o-", label="clear p50")
    by_pool.plot(mib, [p["floor"]["free"] for p in r["pool_rows"]], "s--", label="release floor")
    by_pool.set(xscale="log", yscale="log", xlabel="MiB per tier (TP=1)", ylabel="ms", title="restore, clear")
    by_pool.set_xticks(mib, [str(x) for x in mib])
    by_pool.minorticks_off()
    for ax in (by_tp, cpu, by_pool):
        ax.legend(fontsize="small")
    _save(fig, path, "mpkv bench rl")


def swap(r: dict[str, Any], path: str) -> None:
    """Swap-out and swap-in GB/s against block size, beside memcpy of the same bytes."""
    fig, (ax,) = _figure(1)
    kib = [row["block_kib"] for row in r["rows"]]
    for key, label, style in (("out", "swap-out", "o-"), ("in", "swap-in", "o-"), ("memcpy", "memcpy", "s--")):
        ax.plot(kib, [row[key] / GB for row in r["rows"]], style, label=label)
    ax.set(xscale="log", xlabel="block KiB", ylabel="GB/s", title="swap vs memcpy, same bytes")
    ax.set_xticks(kib, [str(x) for x in kib])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    _save(fig, path, "mpkv bench swap")


def pd(r: dict[str, Any], path: str) -> None:
    """Same-host ship GB/s against KiB per layer, beside a plain copy of the same blocks."""
    from mpkv.bench.pd import layer_bytes

    fig, (ax,) = _figure(1)
    kib = [layer_bytes(row, r["config"]["layers"]) / 1024 for row in r["rows"]]
    ax.plot(kib, [row["ship_gbs"] for row in r["rows"]], "o-", label="ship (messager in the transport)")
    ax.plot(kib, [row["copy_gbs"] for row in r["rows"]], "s--", label="plain copy")
    ax.set(xscale="log", xlabel="KiB per layer", ylabel="GB/s", title="prefill -> decode, same host")
    ax.set_xticks(kib, [f"{x:.0f}" for x in kib])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    _save(fig, path, "mpkv bench pd")


def draw(what: str, r: dict[str, Any], path: str) -> None:
    {"rl": rl, "swap": swap, "pd": pd}[what](r, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpkv.bench.plot", description="draw a benchmark's --json results")
    p.add_argument("what", choices=PLOTTED)
    p.add_argument("results", help="the JSON that `mpkv bench WHAT --json FILE` wrote")
    p.add_argument("out", help="the PNG to write")
    args = p.parse_args(argv)
    if why := missing(args.what):
        p.error(why)
    with open(args.results) as f:
        draw(args.what, json.load(f), args.out)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
