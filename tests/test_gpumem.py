"""mpkv.gpumem against the real NVML: where there is no NVIDIA driver it says so and every figure is n/a, quietly;
where there is a GPU, memory this process allocates shows in its NVML figure."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
import torch

from mpkv import gpumem
from mpkv.config import CacheConfig
from mpkv.gpumem import GpuMemory, fmt_bytes
from mpkv.report import ActorStatus
from mpkv.status import gpu_memory


def _nvml_library_here() -> bool:
    """Whether the driver's NVML library loads: asked of the loader directly, not through mpkv.gpumem."""
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


@pytest.mark.skipif(_nvml_library_here(), reason="an NVIDIA driver is installed here")
def test_without_a_driver_every_figure_is_na_and_the_reason_names_it() -> None:
    gm = GpuMemory.open()
    assert not gm.available
    assert gm.reason == "no NVIDIA driver (libnvidia-ml.so.1 not found)", gm.reason
    assert gm.process_bytes([os.getpid(), os.getppid(), os.getpid()]) == {os.getpid(): None, os.getppid(): None}
    assert gm.devices() == []
    assert GpuMemory.open() is gm  # one session per process: NVML is started (or found missing) once


@pytest.mark.skipif(_nvml_library_here(), reason="an NVIDIA driver is installed here")
def test_a_cuda_instance_without_a_driver_reads_na_with_the_reason() -> None:
    """The status of a cuda instance here (the launch itself needs a GPU: this is its status reader's GPU part):
    every process n/a, no devices, and the note says why; a cpu instance's says cpu without asking NVML."""
    me = ActorStatus("worker", 0, os.getpid(), True, "alive, running", "READY", 0, 0, 0.1, "")
    assert gpu_memory(CacheConfig(backend="cuda"), [me]) == (
        [me],
        (),
        "n/a: no NVIDIA driver (libnvidia-ml.so.1 not found)",
    )
    assert gpu_memory(CacheConfig(backend="cpu"), [me]) == ([me], (), "n/a: cpu backend")


@pytest.mark.skipif(_nvml_library_here(), reason="an NVIDIA driver is installed here")
def test_opening_without_a_driver_is_quiet_with_warnings_as_errors() -> None:
    """pynvml 13 warns on import that it is deprecated: mpkv.gpumem itself silences that (not the filter mpkv's
    package or pytest installs), and a missing driver is an answer, not a traceback. The module is loaded on its own
    (not through the mpkv package) in a fresh interpreter with every warning an error."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('gpumem', {gpumem.__file__!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['gpumem'] = m; spec.loader.exec_module(m)\n"
        "gm = m.GpuMemory.open()\n"
        "print(gm.available, gm.reason, gm.process_bytes([1]), gm.devices(), sep='|')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stderr) == (0, ""), out.stderr
    assert out.stdout == "False|no NVIDIA driver (libnvidia-ml.so.1 not found)|{1: None}|[]\n", out.stdout


@pytest.mark.parametrize(
    ("v", "text"),
    [
        (None, "n/a"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (512 << 20, "512 MiB"),
        (3 << 29, "1.5 GiB"),
        ((1 << 30) - 1, "1 GiB"),  # 1023.999 MiB: rounded into the next unit, not "1024 MiB"
        (int(139.8 * 2**30), "139.8 GiB"),
        (-(256 << 20), "-256 MiB"),  # a difference of two figures
        (5 << 40, "5 TiB"),
    ],
)
def test_fmt_bytes(v: int | None, text: str) -> None:
    assert fmt_bytes(v) == text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_memory_this_process_allocates_shows_in_its_figure() -> None:
    """Figures include the CUDA context and the allocator's cache: the test compares before and after 256 MiB more,
    never against zero."""
    gm = GpuMemory.open()
    assert gm.available, gm.reason
    assert gm.devices() and all(0 < d.free_bytes <= d.total_bytes for d in gm.devices()), gm.devices()
    me = os.getpid()
    torch.zeros(1, device="cuda")  # the context first, so it is in "before"
    torch.cuda.synchronize()
    before = gm.process_bytes([me])[me]
    if before == 0 and gm.note:
        pytest.skip(f"NVML does not list this process: {gm.note}")
    assert before is not None, gm.note
    block = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    after = gm.process_bytes([me])[me]
    assert after is not None and after - before >= 256 << 20, (fmt_bytes(before), fmt_bytes(after), gm.note)
    # The status reader's GPU part puts that figure on the process and lists the devices.
    status = ActorStatus("worker", 0, me, True, "alive, running", "READY", 0, 0, 0.1, "")
    (got,), devices, _ = gpu_memory(CacheConfig(backend="cuda"), [status])
    assert got.gpu_bytes is not None and got.gpu_bytes >= 256 << 20, (got, gm.note)
    assert devices and {d.index for d in devices} == set(range(len(devices))), devices
    del block
