"""GPU memory as NVML sees it, per process and per device: the one module that talks to NVML (pynvml).

``GpuMemory.open()`` is this process's NVML session; it never raises for "no GPU, no driver, no pynvml": it is
then not ``available``, ``reason`` says why, and every figure is None (``process_bytes``) or absent (``devices``).
``fmt_bytes`` is how mpkv writes a size ("1.5 GiB", "n/a").

NOTE what the figures mean, and what they do not:
- NVML numbers devices in PCI bus order and ignores CUDA_VISIBLE_DEVICES (a process's cuda:0 may be NVML's device
  3): ``process_bytes`` sums a pid over every device rather than mapping indices.
- Inside a container without the host's pid namespace NVML reports host pids: our pids are then listed nowhere
  (0 B) though NVML lists other processes. ``note`` says so, as it cannot tell that from processes that hold no
  CUDA context yet.
- A process's figure includes its CUDA context (~500 MiB on recent GPUs) and what its allocator caches: compare
  before and after, never against zero.
- NVML withholds a process's figure (NVML_VALUE_NOT_AVAILABLE) under some virtualisation, on MIG devices and
  without permission: that pid's figure is then None, and ``note`` names it.
- nvmlInit runs once per process (``open`` caches the session, per pid: a forked child opens its own) and the
  session is never shut down: nvmlShutdown per query would pay the driver's start-up on every status read.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable
from typing import Any

import msgspec

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
_NOT_AVAILABLE = 2**64 - 1  # NVML_VALUE_NOT_AVAILABLE as an unsigned long long (pynvml maps it to None)

_lock = threading.Lock()
_session: tuple[int, GpuMemory] | None = None  # (the pid that opened it, the session)


class DeviceMemory(msgspec.Struct, frozen=True):
    """One GPU as NVML numbers it (PCI order, not CUDA's): its name and its free and total memory."""

    index: int
    name: str
    free_bytes: int
    total_bytes: int


def fmt_bytes(v: int | None) -> str:
    """A size in binary units with at most one decimal ("0 B", "512 MiB", "1.5 GiB"); "n/a" for None."""
    if v is None:
        return "n/a"
    size: float = abs(v)
    unit = 0
    while unit < len(_UNITS) - 1 and round(size, 1) >= 1024:  # 1023.96 MiB reads "1 GiB", not "1024 MiB"
        size, unit = size / 1024, unit + 1
    text = f"{size:.1f}".removesuffix(".0") if unit else str(abs(v))
    return f"{'-' if v < 0 else ''}{text} {_UNITS[unit]}"


class GpuMemory:
    """One NVML session (``open``). ``available``: NVML started and lists at least one device; ``reason`` why not
    ("" when available). ``note``: what the figures of the last ``process_bytes`` call need said (pids listed
    nowhere while others are, figures NVML withholds, an NVML error; "" when nothing), or why the last ``devices``
    call came back empty though NVML is available."""

    def __init__(self, nvml: Any, handles: Iterable[Any], reason: str) -> None:
        self._nvml = nvml
        self._handles = tuple(handles)
        self.available = bool(self._handles) and not reason
        self.reason = reason
        self.note = ""

    @classmethod
    def open(cls) -> GpuMemory:
        """This process's session: NVML is started on the first call (and a failure to start is kept) only."""
        global _session
        with _lock:
            if _session is None or _session[0] != os.getpid():
                _session = (os.getpid(), cls._start())
            return _session[1]

    @classmethod
    def _start(cls) -> GpuMemory:
        try:
            with warnings.catch_warnings():
                # pynvml 13 is a shim over nvidia-ml-py and warns on import that it is deprecated: not ours to act on
                warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)
                import pynvml
        except ImportError as e:
            return cls(None, (), f"NVML is not installed: {e} (pip install nvidia-ml-py)")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            return cls(None, (), _why_not(pynvml, e))
        try:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError as e:
            return cls(None, (), f"NVML started but could not list the GPUs: {e}")
        return cls(pynvml, handles, "" if handles else "NVML lists no NVIDIA GPU on this machine")

    def process_bytes(self, pids: Iterable[int]) -> dict[int, int | None]:
        """Per pid, the bytes of GPU memory NVML attributes to it, summed over every device (compute and graphics
        processes); 0: NVML lists it nowhere; None: NVML is not available, failed, or withholds its figure."""
        wanted = list(dict.fromkeys(pids))
        if not self.available:
            self.note = self.reason
            return dict.fromkeys(wanted)
        try:
            used = self._used_by_pid()
        except self._nvml.NVMLError as e:
            self.note = f"NVML could not list the processes on the GPUs: {e}"
            return dict.fromkeys(wanted)
        got = {pid: used.get(pid, 0) for pid in wanted}
        self.note = _note(got, used)
        return got

    def devices(self) -> list[DeviceMemory]:
        """Every GPU's free and total memory, in NVML's order; [] when NVML is not available or fails (``note``)."""
        nvml = self._nvml
        if not self.available:
            return []
        try:
            out = []
            for index, handle in enumerate(self._handles):
                mem, name = nvml.nvmlDeviceGetMemoryInfo(handle), nvml.nvmlDeviceGetName(handle)
                name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)  # bytes before 11.x
                out.append(DeviceMemory(index, name, int(mem.free), int(mem.total)))
            return out
        except nvml.NVMLError as e:
            self.note = f"NVML could not read the GPUs' memory: {e}"
            return []

    def _used_by_pid(self) -> dict[int, int | None]:
        """Every pid NVML lists on any device, with its bytes summed over the devices (None: a figure withheld)."""
        nvml = self._nvml
        per_device: dict[tuple[int, int], int | None] = {}
        for index, handle in enumerate(self._handles):
            for listing in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                for proc in listing(handle):
                    key, mem = (index, int(proc.pid)), _figure(proc.usedGpuMemory)
                    # A process doing compute and graphics is listed twice per device, with the one figure it has.
                    per_device[key] = _larger(per_device[key], mem) if key in per_device else mem
        out: dict[int, int | None] = {}
        for (_, pid), mem in per_device.items():
            before = out.get(pid, 0)
            out[pid] = None if mem is None or before is None else before + mem
        return out


def _figure(v: int | None) -> int | None:
    return None if v is None or v >= _NOT_AVAILABLE else int(v)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _note(got: dict[int, int | None], used: dict[int, int | None]) -> str:
    withheld = sorted(pid for pid, v in got.items() if v is None)
    if withheld:
        return (
            f"NVML withholds the GPU memory of pid {', '.join(map(str, withheld))} (virtualised or MIG GPU, or no "
            "permission)"
        )
    if got and used and not set(got) & set(used):
        return (
            f"NVML lists {len(used)} other process(es) on the GPUs but none of these: either they hold no CUDA "
            "context, or this runs in a container without the host's pid namespace (NVML reports host pids)"
        )
    return ""


def _why_not(nvml: Any, e: Exception) -> str:
    """Why nvmlInit failed, as a sentence naming what is missing."""
    code = getattr(e, "value", None)
    if code == getattr(nvml, "NVML_ERROR_LIBRARY_NOT_FOUND", None):
        return "no NVIDIA driver (libnvidia-ml.so.1 not found)"
    if code == getattr(nvml, "NVML_ERROR_DRIVER_NOT_LOADED", None):
        return "the NVIDIA driver is installed but not loaded (no GPU, or the kernel module is missing)"
    if code == getattr(nvml, "NVML_ERROR_NO_PERMISSION", None):
        return f"no permission to use NVML ({e}): check the rights on /dev/nvidia*"
    return f"NVML did not start: {e}"
