"""The benchmarks' reports from fixed results (nothing launched): what else ran, the verdicts a quiet machine gets
and the no-verdict of a busy one, and the --plot pictures."""

from __future__ import annotations

import copy
import sys
from typing import Any

import pytest

from mpkv import cli
from mpkv.bench import lifecycle, pd
from mpkv.bench.machine import QUIET_PCT, Noise, Sample, busy, noise_line, verdict_line

QUIET = {"cores": 2, "other_cpu_s": 0.2, "steal_s": 0.1, "wall_s": 10.0, "loadavg_start": 0.5, "loadavg_end": 0.6}
BUSY = QUIET | {"other_cpu_s": 1.6}  # 8 % of two cores for 10 s, + 0.5 % steal


def _m(d: dict[str, Any]) -> dict[str, Any]:
    span = d["wall_s"] * d["cores"]
    return d | {"other_pct": 100 * d["other_cpu_s"] / span, "steal_pct": 100 * d["steal_s"] / span}


def _rl(cycle_tp4: float = 2.5, restore_64: float = 110.0, machine: dict[str, Any] = QUIET) -> dict[str, Any]:
    def steps(cycle: float) -> dict[str, float]:
        return {"cycle": cycle, "cycle_p99": cycle * 1.3, "pause": cycle / 5, "clear": cycle / 4}

    def tp_row(tp: int, cycle: float) -> dict[str, Any]:
        extra = {"restore": cycle / 3, "resume": cycle / 6, "actor_cpu": 3.0 * tp, "controller_cpu": 1.0}
        return {"tp": tp, "pool_bytes": 2**19 * tp} | steps(cycle) | extra

    def pool_row(mib: int, restore: float) -> dict[str, Any]:
        floor = {"device_alloc": mib * 1.5, "host_alloc": mib * 1.4, "device_free": mib / 8, "host_free": mib / 9}
        floor |= {"alloc": mib * 1.5, "free": mib / 8}
        extra = {"restore": restore, "resume": 0.5, "actor_cpu": 5.0, "controller_cpu": 1.0}
        return {"pool_mib": mib, "floor": floor} | steps(restore + mib / 6) | extra

    return {
        "floor_one_way_us": 30.0,  # floor of a cycle: 0.3 ms
        "cycles": 30,
        "tp_rows": [tp_row(1, 1.0), tp_row(2, 1.6), tp_row(4, cycle_tp4), tp_row(8, 9.0)],
        "pool_rows": [pool_row(4, 7.0), pool_row(16, 26.0), pool_row(64, restore_64), pool_row(256, 420.0)],
        "machine": _m(machine),
    }


def _swap(worst: float = 0.93, machine: dict[str, Any] = QUIET) -> dict[str, Any]:
    # The 16 KiB row is below the target's blocks: its 0.5x must not count.
    ratios = {16: (0.5, 0.6), 64: (worst, 0.95), 256: (0.97, 0.96), 1024: (0.98, 0.99)}
    rows = [
        {"block_kib": k, "task_mib": 16.0, "out": 5e9 * o, "in": 5e9 * i, "memcpy": 5e9, "out_ratio": o, "in_ratio": i}
        for k, (o, i) in ratios.items()
    ]
    return {"rows": rows, "machine": _m(machine)}


def _pd(ship_1mib: float = 0.85, machine: dict[str, Any] = QUIET) -> dict[str, Any]:
    def row(tokens: int, x: float) -> dict[str, Any]:
        nbytes = tokens // 16 * 256 * 1024  # 256 KiB blocks of 8 layers: 32 KiB per block per layer
        ms = {"alone": tokens / 100, "layerwise": tokens / 95, "after": tokens / 80}
        return {"tokens": tokens, "repeats": 7, "bytes": nbytes, "ms": ms, "ship_gbs": 4.0 * x, "copy_gbs": 4.0}

    config = {"tp": 1, "layers": 8, "kv_heads": 8, "head_dim": 64, "dtype": "float16", "hidden": 64}
    # 256 tokens ship 512 KiB per layer (below the target, its 0.3x must not count); 512 tokens ship 1 MiB
    rows = [row(256, 0.3), row(512, ship_1mib), row(4096, 0.95)]
    return {"config": config, "rows": rows, "machine": _m(machine)}


# -- the machine line and the verdict -----------------------------------------------------------------------------


def test_noise_adds_windows_and_subtracts_our_own_cpu() -> None:
    n = Noise(cores=2)
    # window 1: the machine was busy 3.0 CPU-s of which 2.5 ours; window 2: 1.0 of which 1.0 ours, 0.2 stolen
    n.add(Sample(10.0, 1.0, 4.0, 100.0, 0.5), Sample(13.0, 1.0, 6.5, 104.0, 0.7))
    n.add(Sample(20.0, 2.0, 9.0, 200.0, 0.7), Sample(21.0, 2.2, 10.0, 206.0, 0.9))
    m = n.record()
    assert m["other_cpu_s"] == pytest.approx(0.5) and m["steal_s"] == pytest.approx(0.2)
    assert m["wall_s"] == pytest.approx(10.0)
    assert m["other_pct"] == pytest.approx(2.5) and m["steal_pct"] == pytest.approx(1.0)
    assert (m["loadavg_start"], m["loadavg_end"]) == (0.5, 0.9)
    assert busy(m) is None
    assert "other processes used 2.5 % of the 2 cores, the hypervisor stole 1.0 %" in noise_line(m)
    # a window that came out below zero (ticks against finer rusage) offsets the others, the sum is clamped
    n.add(Sample(30.0, 3.0, 20.0, 300.0, 0.9), Sample(30.0, 3.0, 20.1, 310.0, 0.9))
    assert n.record()["other_cpu_s"] == pytest.approx(0.4)
    n.add(Sample(40.0, 3.0, 30.0, 400.0, 0.9), Sample(40.0, 3.0, 31.0, 410.0, 0.9))
    assert n.record()["other_cpu_s"] == 0.0 and n.record()["other_pct"] == 0.0


def test_quiet_threshold_is_others_plus_steal() -> None:
    at = _m(QUIET | {"other_cpu_s": (QUIET_PCT - 0.5) / 100 * 20, "steal_s": 0.1})  # exactly QUIET_PCT
    assert busy(at) is None
    over = _m(QUIET | {"other_cpu_s": (QUIET_PCT - 0.5) / 100 * 20, "steal_s": 0.2})
    assert busy(over) == "other processes 4.5 % + steal 1.0 % of the 2 cores > 5 %"


def test_verdict_line_quiet_pass_and_miss_busy_none() -> None:
    assert verdict_line("x <= 3 ms", "2.50 ms", True, _m(QUIET)) == "target: x <= 3 ms: 2.50 ms -> PASS"
    assert verdict_line("x <= 3 ms", "3.50 ms", False, _m(QUIET)) == "target: x <= 3 ms: 3.50 ms -> MISS"
    for ok in (True, False):
        line = verdict_line("x <= 3 ms", "2.50 ms", ok, _m(BUSY))
        assert line == (
            "target: x <= 3 ms: 2.50 ms -> no verdict: the machine was busy "
            "(other processes 8.0 % + steal 0.5 % of the 2 cores > 5 %)"
        )


# -- rl -----------------------------------------------------------------------------------------------------------


def test_rl_targets_quiet_pass() -> None:
    assert lifecycle.rl_targets(_rl()) == [
        "target: handshake cycle (1-block pool) at TP=4 <= 3 ms (goal 2 ms) and <= 10x the floor (0.30 ms): "
        "2.50 ms = 8.3x the floor -> PASS",
        "target: restore at TP=1 with 64 MiB pools <= 1.2x the allocation floor: 110.00 ms = 1.15x the floor "
        "(96.00 ms) -> PASS",
    ]


@pytest.mark.parametrize(
    ("cycle", "one_way_us", "measured"),
    [
        (3.5, 40.0, "3.50 ms = 8.8x the floor"),  # over 3 ms, within 10x the floor (0.4 ms)
        (2.9, 25.0, "2.90 ms = 11.6x the floor"),  # within 3 ms, over 10x the floor (0.25 ms)
    ],
)
def test_rl_handshake_target_needs_both_bounds(cycle: float, one_way_us: float, measured: str) -> None:
    r = _rl(cycle_tp4=cycle)
    r["floor_one_way_us"] = one_way_us
    assert lifecycle.rl_targets(r)[0].endswith(f": {measured} -> MISS")


def test_rl_restore_target_miss() -> None:
    assert lifecycle.rl_targets(_rl(restore_64=116.0))[1].endswith("116.00 ms = 1.21x the floor (96.00 ms) -> MISS")


def test_rl_busy_machine_gets_values_and_no_verdict() -> None:
    lines = lifecycle.rl_targets(_rl(cycle_tp4=37.9, machine=BUSY))
    assert "37.90 ms = 126.3x the floor -> no verdict: the machine was busy (other processes 8.0 %" in lines[0]
    assert "110.00 ms = 1.15x the floor (96.00 ms) -> no verdict: the machine was busy" in lines[1]
    assert not any("PASS" in x or "MISS" in x for x in lines)


def test_rl_quick_run_without_tp4_says_not_measured() -> None:
    r = _rl()
    r["tp_rows"] = r["tp_rows"][:2]
    assert lifecycle.rl_targets(r)[0].endswith(": not measured (this run: TP 1, 2)")


def test_rl_report_has_tables_machine_line_and_targets() -> None:
    text = "\n".join(lifecycle.report_rl(_rl()))
    assert "| 8 | 24 | 9.00 / 11.70 ms | 30.0x |" in text
    assert "| 64 MiB |" in text and "| 96.00 ms (96.00, 89.60) | 1.15x |" in text
    assert "machine while measuring (10.0 s): other processes used 1.0 % of the 2 cores" in text
    assert text.count("-> PASS") == 2


# -- swap and pd --------------------------------------------------------------------------------------------------


def test_swap_target_pass_miss_busy() -> None:
    assert lifecycle.swap_target(_swap()) == (
        "target: swap-out and swap-in >= 0.9x memcpy for blocks >= 64 KiB: worst 0.93x -> PASS"
    )
    assert lifecycle.swap_target(_swap(worst=0.88)).endswith("worst 0.88x -> MISS")
    assert "worst 0.88x -> no verdict: the machine was busy" in lifecycle.swap_target(_swap(0.88, BUSY))
    assert lifecycle.report_swap(_swap())[-1].endswith("-> PASS")


def test_pd_ship_target_pass_miss_busy() -> None:
    assert pd.ship_target(_pd()) == (
        "target: same-host ship >= 0.8x a plain copy for >= 1 MiB per layer: worst 0.85x (512 tokens) -> PASS"
    )
    assert pd.ship_target(_pd(ship_1mib=0.7)).endswith("worst 0.70x (512 tokens) -> MISS")
    assert "worst 0.70x (512 tokens) -> no verdict: the machine was busy" in pd.ship_target(_pd(0.7, BUSY))


def test_pd_report_prints_kib_per_layer_and_gates_row_verdicts() -> None:
    quiet = pd.report_pd(_pd())
    assert any(line.startswith("| 512 | 8.0 | 1024 | ") for line in quiet)
    assert any(line.startswith("| 256 | 4.0 | 512 | ") and line.endswith("after-prefill: PASS |") for line in quiet)
    noisy = "\n".join(pd.report_pd(_pd(machine=BUSY)))
    assert "PASS" not in noisy and "MISS" not in noisy
    assert "| layer-wise <= 1.15x alone: no verdict (busy) |" in noisy


# -- --plot -------------------------------------------------------------------------------------------------------

RESULTS = {"rl": _rl, "swap": _swap, "pd": _pd}


@pytest.mark.parametrize("what", sorted(RESULTS))
def test_plot_renders_a_png(what: str, tmp_path: Any) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs the optional extra mpkv[bench] (matplotlib)")
    from mpkv.bench import plot

    path = tmp_path / f"{what}.png"
    r = RESULTS[what]()
    before = copy.deepcopy(r)
    plot.draw(what, r, str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert r == before  # drawing reads the results, as --json wrote them


def test_plot_draws_a_saved_run_again(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib", reason="--plot needs the optional extra mpkv[bench] (matplotlib)")
    from mpkv.bench import emit, plot

    results, png = tmp_path / "swap.json", tmp_path / "swap.png"
    emit([], _swap(), str(results))  # as --json writes it
    assert plot.main(["swap", str(results), str(png)]) == 0
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert capsys.readouterr().out.endswith(f"plot: {png}\n")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["bench", "rl"], "bench rl: --plot needs matplotlib: install it with `pip install mpkv[bench]`"),
        (["bench", "ipc"], "bench ipc: --plot draws rl, swap, pd only, not ipc"),
    ],
)
def test_plot_refused_before_the_benchmark_runs(
    argv: list[str], says: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mpkv.bench.ipc

    ran: list[str] = []
    for mod in (lifecycle, mpkv.bench.ipc):
        monkeypatch.setattr(mod, "main", lambda args: ran.append(args.what) or 0)
    if argv[1] == "rl":
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert cli.main([*argv, "--quick", "--plot", str(tmp_path / "x.png")]) == 2
    assert ran == []
    err = capsys.readouterr().err
    assert err.startswith(f"mpkv: {says}") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
