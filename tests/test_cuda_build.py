"""cuda/: the library builds under -Werror, exports its entry points, needs no CUDA library at link time, and
reports a missing driver (the real dlopen failure, on machines without one); mpkv.cudaext loads it only from the
package directory and refuses bad input before issuing anything. Skipped where no cuda.h is found."""

from __future__ import annotations

import ast
import ctypes
import importlib.util
import json
import os
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

# One worker builds the library once for the module (the build fixture is module-scoped).
pytestmark = pytest.mark.xdist_group("cuda_build")
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


# With a stand-in libcuda.so.1 (tests/cuda_stand_in_driver.c, recording every call) in a child process: what the
# library asks the driver for and which calls it issues, checked here without a GPU.

TESTS = Path(__file__).resolve().parent
ENTRY_VERSIONS = {
    "cuInit": 2000,
    "cuGetErrorName": 6000,
    "cuGetErrorString": 6000,
    "cuCtxGetDevice": 2000,  # the one-argument ABI; 13.0's has two
    "cuDeviceGetAttribute": 2000,
    "cuMemcpy2DAsync": 3020,  # cuMemcpy2DAsync_v2
    "cuMemcpyAsync": 4000,
    **dict.fromkeys(
        (
            "cuMemGetAllocationGranularity",
            "cuMemAddressReserve",
            "cuMemAddressFree",
            "cuMemCreate",
            "cuMemRelease",
            "cuMemMap",
            "cuMemUnmap",
            "cuMemSetAccess",
            "cuMemExportToShareableHandle",
            "cuMemImportFromShareableHandle",
        ),
        10020,
    ),
}
LEGACY_STREAM = 1  # CU_GET_PROC_ADDRESS_LEGACY_STREAM
# mpkv_copy_runs(0x10000000, 8 blocks, 0x20000000, 16 blocks, 4 planes, 512 bytes, runs (1, 3, 2), (7, 0, 1)):
TWO_D = [
    "cuMemcpy2DAsync types=4,4 src=20000600+0,0 spitch=8192 dst=10000200+0,0 dpitch=4096 w=1024 h=4 stream=abc",
    "cuMemcpy2DAsync types=4,4 src=20000000+0,0 spitch=8192 dst=10000e00+0,0 dpitch=4096 w=512 h=4 stream=abc",
]
PLANE_BY_PLANE = [
    f"cuMemcpyAsync dst={0x10000000 + p * 4096 + d * 512:x} src={0x20000000 + p * 8192 + s * 512:x} n={n * 512} "
    "stream=abc"
    for d, s, n in ((1, 3, 2), (7, 0, 1))
    for p in range(4)
]


@pytest.fixture(scope="module")
def stand_in(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = importlib.util.spec_from_file_location("mpkv_cuda_build", ROOT / "cuda" / "build.py")
    assert spec is not None and spec.loader is not None
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    out = tmp_path_factory.mktemp("stand_in")
    subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{build.find_include()}"]
        + [str(TESTS / "cuda_stand_in_driver.c"), "-o", str(out / "libcuda.so.1")],
        check=True,
        timeout=60,
    )
    return out


def _with_stand_in(
    built: Path, stand_in: Path, scenario: str, mode: str = "", max_pitch: int = 2**31 - 1
) -> tuple[dict, list[str], dict[str, tuple[int, int]]]:
    """(what the calls returned, the driver calls but the lookups, {name: (version, flags)} of the lookups)."""
    log = stand_in / f"log.{scenario}.{mode.replace(':', '_')}.{max_pitch}"
    log.unlink(missing_ok=True)
    env = {
        **os.environ,
        "LD_LIBRARY_PATH": str(stand_in),
        "STAND_IN_LOG": str(log),
        "STAND_IN_MODE": mode,
        "STAND_IN_MAX_PITCH": str(max_pitch),
    }
    done = subprocess.run(
        [sys.executable, str(TESTS / "cuda_stand_in.py"), str(built), scenario],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = log.read_text().splitlines()
    lookups = {}
    for line in lines:
        if line.startswith("cuGetProcAddress_v2 "):
            _, name, version, flags = line.split()
            lookups[name] = (int(version), int(flags))
    return json.loads(done.stdout), [x for x in lines if not x.startswith("cuGetProcAddress_v2 ")], lookups


def test_entry_points_are_asked_for_by_the_version_of_their_abi(built: Path, stand_in: Path) -> None:
    returned, calls, lookups = _with_stand_in(built, stand_in, "copy")
    assert returned == {"copy": 0}
    assert lookups == {name: (version, LEGACY_STREAM) for name, version in ENTRY_VERSIONS.items()}
    assert calls == ["cuInit 0", "cuCtxGetDevice", "cuDeviceGetAttribute 11 0", *TWO_D]  # 11: MAX_PITCH


def test_without_cuGetProcAddress_the_exported_abi_names_are_used(built: Path, stand_in: Path) -> None:
    returned, calls, lookups = _with_stand_in(built, stand_in, "copy", mode="nogpa")
    assert returned == {"copy": 0} and set(lookups) == set(ENTRY_VERSIONS)
    assert calls == ["cuInit 0", "cuCtxGetDevice", "cuDeviceGetAttribute 11 0", *TWO_D]


def test_a_plane_stride_over_the_pitch_limit_goes_plane_by_plane(built: Path, stand_in: Path) -> None:
    returned, calls, _ = _with_stand_in(built, stand_in, "copy", max_pitch=4096)  # the source's is 8192
    assert returned == {"copy": 0}
    assert calls == ["cuInit 0", "cuCtxGetDevice", "cuDeviceGetAttribute 11 0", *PLANE_BY_PLANE]


def test_a_refused_2d_copy_is_issued_plane_by_plane(built: Path, stand_in: Path) -> None:
    returned, calls, _ = _with_stand_in(built, stand_in, "copy", mode="refuse2d")
    assert returned == {"copy": 0}
    assert calls == ["cuInit 0", "cuCtxGetDevice", "cuDeviceGetAttribute 11 0", TWO_D[0], *PLANE_BY_PLANE]


@pytest.mark.parametrize(
    ("scenario", "mode", "steps"),
    [
        ("create", "", "Create Map SetAccess Export | Unmap Release"),
        ("create", "fail:cuMemCreate", "Create"),
        ("create", "fail:cuMemMap", "Create Map Release"),
        ("create", "fail:cuMemSetAccess", "Create Map SetAccess Unmap Release"),
        ("create", "fail:cuMemExportToShareableHandle", "Create Map SetAccess Export Unmap Release"),
        ("import", "", "Import Map SetAccess | Unmap Release"),
        ("import", "fail:cuMemImportFromShareableHandle", "Import"),
        ("import", "fail:cuMemMap", "Import Map Release"),
        ("import", "fail:cuMemSetAccess", "Import Map SetAccess Unmap Release"),
    ],
)
def test_vmm_steps_and_their_unwinding(built: Path, stand_in: Path, scenario: str, mode: str, steps: str) -> None:
    returned, calls, _ = _with_stand_in(built, stand_in, scenario, mode=mode)
    short = {
        "cuMemCreate": "Create",
        "cuMemMap": "Map",
        "cuMemSetAccess": "SetAccess",
        "cuMemExportToShareableHandle": "Export",
        "cuMemImportFromShareableHandle": "Import",
        "cuMemUnmap": "Unmap",
        "cuMemRelease": "Release",
    }
    done = [short[c.split()[0]] for c in calls if c.split()[0] in short]
    ok = not mode
    expected = steps.replace("| ", "").split()  # "|": where the mpkv call returned, before unmap_and_release
    assert done == expected, calls
    assert calls[:3] == [
        "cuInit 0",
        "cuMemGetAllocationGranularity type=1 handles=1 loc=1:0 option=1",  # pinned, POSIX fd, device 0, RECOMMENDED
        "cuMemAddressReserve size=4194304 align=0 addr=0 flags=0",
    ]
    assert calls[-1] == "cuMemAddressFree 7f0000000000 4194304"
    if scenario == "create":
        assert "cuMemCreate size=4194304 type=1 handles=1 loc=1:1 flags=0" in calls
        status, handle, fd = returned["create"]
        assert (status, handle) == ((0, 0x1234) if ok else (2, 0)) and (fd >= 0) == ok
    else:
        assert "cuMemImportFromShareableHandle fd=42 type=1" in calls
        assert tuple(returned["import"]) == ((0, 0x5678) if ok else (2, 0))
    if "SetAccess" in done:
        assert "cuMemSetAccess 7f0000000000 4194304 loc=1:1 flags=3 n=1" in calls  # read-write for device 1
    assert returned["error"] == ("no error" if ok else "CUDA_ERROR_OUT_OF_MEMORY: out of memory")
    assert returned.get("release", 0) == 0 and returned["unreserve"] == 0


# mpkv/pool/cuda_driver.py's own ctypes calls (the default cuda path's pool), on the same stand-in.
HANDLE = bytes((i * 37) % 256 for i in range(64))  # what the stand-in's cuIpcGetMemHandle writes for its pointer


def test_the_ipc_handle_reaches_the_driver_byte_for_byte(built: Path, stand_in: Path) -> None:
    returned, calls, _ = _with_stand_in(built, stand_in, "ipc")
    assert returned == {"ptr": 0x7E0000000000, "handle": HANDLE.hex(), "device": 0, "imported": 0x7E1000000000}
    assert calls == [
        "cuMemAlloc_v2 1048576",
        "cuIpcGetMemHandle 7e0000000000",
        "cuCtxGetDevice",
        f"cuIpcOpenMemHandle_v2 {HANDLE.hex()} flags=1",  # 1: CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
        "cuIpcCloseMemHandle 7e1000000000",
        "cuMemFree_v2 7e0000000000",
        "cuMemHostAlloc 4096 flags=1",  # 1: CU_MEMHOSTALLOC_PORTABLE
        "cuMemFreeHost",
    ]


def test_a_failed_driver_call_is_an_error_naming_it(built: Path, stand_in: Path) -> None:
    returned, calls, _ = _with_stand_in(built, stand_in, "ipc", mode="fail:cuIpcOpenMemHandle_v2")
    assert returned["error"] == "cuIpcOpenMemHandle_v2 failed: out of memory (CUresult 2)"
    assert calls[-1].startswith("cuIpcOpenMemHandle_v2 ")


def test_nothing_in_mpkv_shares_memory_through_torchs_reductions() -> None:
    # NOTE [ CUDA IPC without torch's reductions ]: a share per receiver, counted by that receiver alone, and
    # dependent on the allocator's settings; mpkv shares only memory it allocated itself, by the driver's handles
    torchs = {"reduce_tensor", "rebuild_cuda_tensor", "_share_cuda_", "_new_shared_cuda", "ipc_collect"}
    used = []
    for path in sorted((ROOT / "mpkv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "id", None) or getattr(node, "attr", None) or getattr(node, "name", None)
            if name in torchs:
                used.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')} {name}")
    assert used == []
