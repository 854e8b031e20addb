"""cuda/: the library builds under -Werror, exports its entry points, needs no CUDA library at link time, and
reports a missing driver (the real dlopen failure, on machines without one); mpkv.cudaext loads it only from the
package directory and refuses bad input before issuing anything. Skipped where no cuda.h is found."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from mpkv import cudaext
from mpkv.errors import MpkvError

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "mpkv_cuda_error",
    "mpkv_copy_runs",
    "mpkv_vmm_granularity",
    "mpkv_vmm_reserve",
    "mpkv_vmm_unreserve",
    "mpkv_vmm_create_and_map",
    "mpkv_vmm_import_and_map",
    "mpkv_vmm_unmap_and_release",
}
U64 = ctypes.c_uint64


def _driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cuda")
    done = subprocess.run(
        [sys.executable, str(ROOT / "cuda" / "build.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, f"cuda/build.py failed:\n{done.stdout}\n{done.stderr}"
    if "nothing compiled" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert f"compiled {out / 'libmpkv_cuda.so'}" in done.stdout, done.stdout
    return out / "libmpkv_cuda.so"


@pytest.fixture
def raw(built: Path) -> ctypes.CDLL:
    """The built library opened directly (not through cudaext), with its signatures."""
    lib = ctypes.CDLL(str(built))
    lib.mpkv_cuda_error.argtypes, lib.mpkv_cuda_error.restype = [ctypes.c_int], ctypes.c_char_p
    lib.mpkv_copy_runs.argtypes = [U64] * 6 + [ctypes.POINTER(ctypes.c_int64), U64, U64]
    lib.mpkv_vmm_granularity.argtypes = [ctypes.c_int, ctypes.POINTER(U64)]
    return lib


@pytest.fixture
def as_package_library(built: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """cudaext pointed at the library built here, as if it were the package's."""
    monkeypatch.setattr(cudaext, "LIB_PATH", built)
    cudaext.load.cache_clear()
    yield built
    cudaext.load.cache_clear()


def test_every_entry_point_is_exported_and_no_cuda_library_is_needed(built: Path) -> None:
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built)], capture_output=True, text=True, check=True)
    defined = {line.split()[-1] for line in symbols.stdout.splitlines() if line.strip()}
    assert {s for s in defined if s.startswith("mpkv_")} == ENTRY_POINTS
    # -fvisibility=hidden: the loader's internals (mpkv_driver, the entry table) stay private.
    assert "mpkv_driver" not in defined
    dynamic = subprocess.run(["readelf", "-d", str(built)], capture_output=True, text=True, check=True)
    needed = [line for line in dynamic.stdout.splitlines() if "(NEEDED)" in line]
    assert needed, dynamic.stdout
    assert not [line for line in needed if "libcuda" in line or "libcudart" in line or "libnv" in line], needed


def _rows(*rows: tuple[int, int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _ptr(a: np.ndarray) -> object:
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64))  # valid while ``a`` lives


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ((1 << 20, 4096, 1 << 30, 4096, 4, 512, ((-1, 0, 1),), 1), "negative destination id"),
        ((1 << 20, 4096, 1 << 30, 4096, 4, 512, ((0, -1, 1),), 1), "negative source id"),
        ((1 << 20, 4096, 1 << 30, 4096, 4, 512, ((0, 0, 0),), 1), "zero count"),
        ((1 << 20, 4096, 1 << 30, 4096, 4, 512, ((7, 0, 2),), 1), "run past the destination plane (8 blocks)"),
        ((1 << 20, 4096, 1 << 30, 2048, 4, 512, ((0, 0, 5),), 1), "run past the source plane (4 blocks)"),
        ((1 << 20, 4096, 1 << 30, 4096, 4, 512, ((0, 0, 1), (1 << 62, 0, 1)), 2), "offset overflows"),
        ((2**64 - 4096, 4096, 1 << 30, 4096, 4, 512, ((0, 0, 1),), 1), "pool end overflows"),
        ((0, 4096, 1 << 30, 4096, 4, 512, ((0, 0, 1),), 1), "null destination"),
        ((1 << 20, 4096, 0, 4096, 4, 512, ((0, 0, 1),), 1), "null source"),
        ((1 << 20, 4096, 1 << 30, 4096, 0, 512, ((0, 0, 1),), 1), "no planes"),
        ((1 << 20, 4096, 1 << 30, 4096, 4, 0, ((0, 0, 1),), 1), "zero block size"),
    ],
)
def test_copy_runs_refuses_bad_arguments_before_touching_the_driver(raw: ctypes.CDLL, args: tuple, why: str) -> None:
    dst, dst_stride, src, src_stride, planes, block_bytes, rows, nruns = args
    runs = _rows(*rows)
    status = raw.mpkv_copy_runs(dst, dst_stride, src, src_stride, planes, block_bytes, _ptr(runs), nruns, 0)
    assert status == -3, why
    assert b"bad argument" in raw.mpkv_cuda_error(-3)


def test_copy_runs_of_nothing_is_a_no_op(raw: ctypes.CDLL) -> None:
    assert raw.mpkv_copy_runs(1 << 20, 4096, 1 << 30, 4096, 4, 512, None, 0, 0) == 0
    assert raw.mpkv_copy_runs(1 << 20, 4096, 1 << 30, 4096, 4, 512, None, 1, 0) == -3  # rows promised, none given


@pytest.mark.skipif(_driver_present(), reason="libcuda.so.1 loads here: the no-driver path cannot be reached")
def test_without_a_driver_every_call_says_libcuda_is_missing(raw: ctypes.CDLL) -> None:
    out = U64(7)
    assert raw.mpkv_vmm_granularity(0, ctypes.byref(out)) == -1
    assert out.value == 0
    runs = _rows((0, 0, 1))
    assert raw.mpkv_copy_runs(1 << 20, 4096, 1 << 30, 4096, 4, 512, _ptr(runs), 1, 0) == -1
    message = raw.mpkv_cuda_error(-1)
    assert b"libcuda.so.1 could not be loaded" in message and b"NVIDIA driver" in message, message


@pytest.mark.skipif(_driver_present(), reason="libcuda.so.1 loads here: the no-driver path cannot be reached")
def test_cudaext_raises_naming_the_function_and_libcuda(as_package_library: Path) -> None:
    with pytest.raises(MpkvError, match=r"mpkv_vmm_granularity failed: libcuda\.so\.1 could not be loaded.*status -1"):
        cudaext.vmm_granularity(0)
    with pytest.raises(MpkvError, match=r"mpkv_vmm_reserve failed: libcuda\.so\.1"):
        cudaext.vmm_reserve(1 << 21)


def test_missing_library_is_a_sentence_naming_the_build_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cudaext, "LIB_PATH", tmp_path / "_cuda" / "libmpkv_cuda.so")
    cudaext.load.cache_clear()
    try:
        sentence = cudaext.missing()
        assert "not built" in sentence and "tools/build-cuda" in sentence, sentence
        with pytest.raises(MpkvError, match="not built: run tools/build-cuda"):
            cudaext.load()
    finally:
        cudaext.load.cache_clear()


def test_a_library_elsewhere_is_refused(built: Path) -> None:
    # The real package path is left alone: a copy anywhere else (here a temporary directory) is not loaded.
    with pytest.raises(MpkvError, match=r"refusing to load .*only from .*mpkv/_cuda/libmpkv_cuda\.so"):
        cudaext._open(built)


def test_a_library_others_could_write_or_a_link_is_refused(
    built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    planted = tmp_path / "libmpkv_cuda.so"
    shutil.copy(built, planted)
    monkeypatch.setattr(cudaext, "LIB_PATH", planted)
    planted.chmod(0o777)
    with pytest.raises(MpkvError, match="another user could have written it"):
        cudaext._open(planted)
    planted.chmod(0o755)
    link = tmp_path / "link.so"
    link.symlink_to(planted)
    monkeypatch.setattr(cudaext, "LIB_PATH", link)
    with pytest.raises(MpkvError, match="not a regular file"):
        cudaext._open(link)
    shared = tmp_path / "shared"
    shared.mkdir()
    in_shared = shared / "libmpkv_cuda.so"
    shutil.copy(planted, in_shared)
    shared.chmod(0o777)
    monkeypatch.setattr(cudaext, "LIB_PATH", in_shared)
    with pytest.raises(MpkvError, match="another user could replace the library"):
        cudaext._open(in_shared)
    shared.chmod(0o700)


def _pool(blocks: int) -> torch.Tensor:
    return torch.zeros(2, 2, blocks, 4, 8, dtype=torch.float16)


@pytest.mark.parametrize(
    ("runs", "match"),
    [
        ([[6, 0, 3]], "run 0 covers destination blocks 6..8, outside the destination pool's 8 blocks"),
        ([[0, 0, 1], [0, 3, 2]], "run 1 covers source blocks 3..4, outside the source pool's 4 blocks"),
        ([[0, -1, 1]], "run 0 covers source blocks -1..-1"),
        ([[0, 0, 0]], "run 0 has a count of 0"),
        ([[0, 0]], "runs must be integer rows"),
    ],
)
def test_copy_runs_refuses_ids_out_of_range_before_issuing(runs: list[list[int]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cudaext.copy_runs(_pool(8), _pool(4), np.array(runs, dtype=np.int64), 0)


def test_copy_runs_refuses_mismatched_or_pageable_pools() -> None:
    ok = np.array([[0, 0, 1]], dtype=np.int64)
    with pytest.raises(ValueError, match="pools differ"):
        cudaext.copy_runs(_pool(8), torch.zeros(2, 2, 4, 4, 4, dtype=torch.float16), ok, 0)
    with pytest.raises(ValueError, match="pools differ"):
        cudaext.copy_runs(_pool(8), _pool(4).float(), ok, 0)
    with pytest.raises(ValueError, match="not contiguous"):
        cudaext.copy_runs(_pool(8).transpose(3, 4), _pool(4), ok, 0)
    with pytest.raises(ValueError, match="not pinned"):
        cudaext.copy_runs(_pool(8), _pool(4), ok, 0)
