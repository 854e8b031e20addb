"""Child-process bodies for tests/test_allreduce.py (module level, so the spawn start method can import them).

Each child reports through a Pipe connection, as in procs.py: ("ok", result) or ("error", type name, message).
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from procs import report


@dataclass(frozen=True)
class Case:
    """One generation's tensor, the same on every rank (the ranks derive it from the shared seed)."""

    numel: int
    dtype: str
    strided: bool  # the caller's tensor is a transposed view, not contiguous


def cases(seed: int, n: int, max_elems: int) -> list[Case]:
    """Mostly decode-like sizes; sometimes larger than one buffer (reduced in pieces), other dtypes, strides."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        numel = r.choice((1, 7, 64, 256, 1000)) if r.random() < 0.8 else r.randint(1, 3 * max_elems)
        dtype = r.choice(("float32",) * 6 + ("float64", "bfloat16"))
        out.append(Case(numel, dtype, strided=numel % 2 == 0 and r.random() < 0.2))
    return out


def partial(seed: int, gen: int, rank: int, case: Case):  # -> torch.Tensor (torch is imported in the child)
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + gen * 31 + rank)
    return torch.randn(case.numel, generator=g, dtype=getattr(torch, case.dtype))


def allreduce_member(name: str, rank: int, tp: int, seed: int, n: int, max_elems: int, conn: Connection) -> None:
    """Reduce ``n`` seeded cases, stalling at random (a fast rank races ahead to the next generation), and
    compare every result with the rank-ordered sum computed here; report mismatches and a digest of the bits."""

    def body() -> dict[str, object]:
        import torch

        from mpkv.shm.allreduce import AllReduce

        stalls = random.Random(seed + 1000 + rank)
        digest = hashlib.sha256()
        wrong = []
        with AllReduce(name, rank, timeout_s=60) as ar:
            for gen, case in enumerate(cases(seed, n, max_elems)):
                parts = [partial(seed, gen, r, case) for r in range(tp)]
                want = parts[0].clone()
                for p in parts[1:]:
                    want += p  # ((p0 + p1) + p2): rank order
                mine = parts[rank]
                if case.strided:
                    mine = mine.view(2, -1).t()  # a transposed view: not contiguous
                    want = want.view(2, -1).t()
                ar(mine)
                if not torch.equal(mine, want):
                    wrong.append(gen)
                digest.update(mine.contiguous().view(torch.uint8).numpy().tobytes())
                if stalls.random() < 0.05:
                    time.sleep(stalls.uniform(0, 0.003))
            return {"wrong": wrong, "digest": digest.hexdigest(), "generation": ar.generation}

    report(conn, body)


def allreduce_sizes(name: str, rank: int, sizes: list[int], conn: Connection) -> None:
    def body() -> None:
        import torch

        from mpkv.shm.allreduce import AllReduce

        with AllReduce(name, rank, timeout_s=60) as ar:
            for n in sizes:
                ar(torch.ones(n))

    report(conn, body)


def allreduce_forever(name: str, rank: int, conn: Connection) -> None:
    """Reduce until something fails; tells the parent when it has attached."""

    def body() -> None:
        import torch

        from mpkv.shm.allreduce import AllReduce

        with AllReduce(name, rank, timeout_s=60) as ar:
            conn.send("started")
            while True:
                ar(torch.ones(64))

    report(conn, body)
