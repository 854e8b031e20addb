"""How many Python calls each process of an instance makes per pause/clear/restore/resume cycle (1-block pool).

Deterministic where timings are not: cProfile counts calls, not time, so a busy machine gives the same answer.
Two runs of N and 3N cycles; per cycle = the difference / 2N, so start-up, warm-up and shutdown cancel out.
The actors profile themselves (MPKV_PROFILE, mpkv.actors.entry); the controller is this script's child.
Usage: tools/profile-handshake [--tp TP] [--cycles N]
"""

from __future__ import annotations

import argparse
import glob
import os
import pstats
import subprocess
import sys
import tempfile


def cycles(tp: int, n: int) -> None:
    """The child: an instance with a 1-block pool, 5 warm-up cycles and ``n`` counted ones, then shutdown."""
    from mpkv.bench.lifecycle import launched
    from mpkv.config import CacheConfig
    from mpkv.controller import Controller

    cfg = CacheConfig(tp=tp, layers=8, kv_heads=8, head_dim=64, block_size=16, device_blocks=1, host_blocks=1)
    name = f"profile-{os.getpid()}"
    with launched(name, cfg), Controller(name) as ctl:
        for _ in range(5 + n):
            ctl.pause()
            ctl.clear()
            ctl.restore()
            ctl.resume()
        ctl.shutdown()


def calls(tp: int, n: int) -> dict[str, int]:
    out = tempfile.mkdtemp(prefix="mpkv-profile-")
    env = dict(os.environ, MPKV_PROFILE=f"{out}/actor")
    me = os.path.abspath(__file__)
    child = [sys.executable, "-m", "cProfile", "-o", f"{out}/controller", me, "--child", str(tp), str(n)]
    subprocess.run(child, env=env, check=True)
    files = sorted(glob.glob(f"{out}/actor.*")) + [f"{out}/controller"]
    got = {os.path.basename(f).removeprefix("actor."): pstats.Stats(f).total_calls for f in files}
    for f in files:
        os.unlink(f)
    os.rmdir(out)
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cycles", type=int, default=50, help="N (the runs are N and 3N cycles)")
    a = ap.parse_args()
    short, long = calls(a.tp, a.cycles), calls(a.tp, 3 * a.cycles)
    runs = f"({3 * a.cycles} - {a.cycles} cycles) / {2 * a.cycles}"
    print(f"Python calls per handshake cycle, TP={a.tp}, 1-block pool (cProfile; {runs})")
    for who in short:
        print(f"  {who:<14} {(long[who] - short[who]) / (2 * a.cycles):8.0f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        cycles(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
