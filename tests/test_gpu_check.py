"""tools/gpu-check and `mpkv bench gpu` where there is no GPU (every CI machine): they say so and succeed, having
set nothing up. On a GPU machine they are the check itself (minutes): not run from the test suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run tools/gpu-check itself")


def test_gpu_check_without_a_gpu_says_so_and_succeeds() -> None:
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run([ROOT / "tools" / "gpu-check"], capture_output=True, text=True, timeout=120, env=env)
    assert (done.returncode, done.stdout, done.stderr) == (0, "no GPU: nothing to check\n", "")


def test_bench_gpu_without_a_gpu_says_so_and_succeeds() -> None:
    cmd = [sys.executable, "-m", "mpkv.cli", "bench", "gpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert (done.returncode, done.stdout) == (0, "no GPU: nothing to check\n")
