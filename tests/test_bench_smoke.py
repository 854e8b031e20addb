"""The benchmarks run end to end and print their tables (quick mode). Their numbers decide nothing here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest


def _bench(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "mpkv.cli", "bench", *args, "--quick"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow  # ~25 s of two busy cores (the transports spin): with the soak tests, for the suite's 10 minutes
def test_bench_ipc_quick() -> None:
    text = _bench("ipc")
    assert "mpkv ring" in text and "mp.Queue" in text and "idle blocked reader" in text


@pytest.mark.slow
@pytest.mark.parametrize("what", ["rl", "swap", "pd"])
def test_bench_lifecycle_quick(what: str, tmp_path: Path) -> None:
    """Each prints what else ran and its targets (a verdict or why not), and draws its curves with --plot."""
    plot = tmp_path / f"{what}.png"
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    text = _bench(what, *(["--plot", str(plot)] if has_mpl else []))
    assert "machine while measuring" in text and "target:" in text
    if has_mpl:
        assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
