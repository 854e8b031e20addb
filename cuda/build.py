"""Compile cuda/ into mpkv/_cuda/libmpkv_cuda.so (or --out DIR), against the first cuda.h found.

Where cuda.h is looked for, in order: $MPKV_CUDA_INCLUDE (an error if it has none), /usr/local/cuda/include, the
include directory of an installed nvidia-cuda-runtime* wheel (CUDA 12 or 13 layout). No header: say so and succeed, compiling nothing.
The library links only libdl and libpthread (it opens libcuda.so.1 itself at first use), so it builds on machines
without a driver. Usage: tools/build-cuda [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("driver.c", "block_copy.c", "vmm_pool.c")
LIBRARY = "libmpkv_cuda.so"
DEFAULT_OUT = HERE.parent / "mpkv" / "_cuda"
FLAGS = ("-O2", "-shared", "-fPIC", "-std=c11", "-Wall", "-Wextra", "-Werror", "-fvisibility=hidden")


def _wheel_include() -> Path | None:
    # The CUDA 12 wheels install nvidia/cuda_runtime/include/cuda.h, the CUDA 13 ones nvidia/cu13/include/cuda.h:
    # ask the wheel's own file list rather than guess.
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().startswith("nvidia-cuda-runtime"):
            for f in dist.files or ():
                if f.name == "cuda.h" and f.parent.name == "include":
                    inc = Path(str(dist.locate_file(f))).parent
                    if (inc / "cuda.h").is_file():
                        return inc
    return None


def find_include() -> Path | None:
    env = os.environ.get("MPKV_CUDA_INCLUDE")
    if env:
        if not (Path(env) / "cuda.h").is_file():
            sys.exit(
                f"cuda/: MPKV_CUDA_INCLUDE={env} has no cuda.h; point it at the directory holding cuda.h or unset it"
            )
        return Path(env)
    system = Path("/usr/local/cuda/include")
    if (system / "cuda.h").is_file():
        return system
    return _wheel_include()


def build(out: Path, include: Path) -> Path:
    out.mkdir(mode=0o755, parents=True, exist_ok=True)  # mpkv.cudaext refuses a library others could replace
    target = out / LIBRARY
    # Written beside the target and renamed over it: a process that mapped the old library keeps its copy intact.
    tmp = out / f".{LIBRARY}.{os.getpid()}.tmp"
    cmd = [os.environ.get("CC", "gcc"), *FLAGS, f"-I{include}", *(str(HERE / s) for s in SOURCES)]
    cmd += ["-o", str(tmp), "-ldl", "-lpthread"]
    try:
        subprocess.run(cmd, check=True)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"cuda/: compiled {target} from {', '.join(SOURCES)} with {include / 'cuda.h'}")
    print(f"cuda/: {shlex.join(cmd)}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"directory for {LIBRARY} (default: %(default)s)")
    args = ap.parse_args(argv)
    include = find_include()
    if include is None:
        print("cuda/: no cuda.h found, nothing compiled (set MPKV_CUDA_INCLUDE, or install a CUDA toolkit)")
        return 0
    try:
        build(args.out, include)
    except subprocess.CalledProcessError as e:
        print(f"cuda/: the compiler failed (exit {e.returncode}); nothing was installed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
