"""Read KV back through a Client and compare it byte for byte with the synthetic model's recomputation
(``model.expected_kv``): how the demo, the benchmarks and the tests know that every byte landed where it should.

Blocks are read in chunks a completion can carry (``DONE_RING_BYTES``), from every rank, and compared per rank
(each rank holds its own heads). A difference is a ``KVMismatch`` naming the first rank, block and layer that
differ, so a failure says where to look rather than only that something is off.
"""

from __future__ import annotations

import numpy as np
import torch

from mpkv.client import Client
from mpkv.config import CacheConfig
from mpkv.errors import KVMismatch
from mpkv.model import expected_kv
from mpkv.topology import DONE_RING_BYTES


def chunk_blocks(cfg: CacheConfig) -> int:
    """How many blocks one read can ask for: their KV must fit in one completion (half a ring, less a header)."""
    return max(1, (DONE_RING_BYTES // 2 - 4096) // cfg.block_bytes)


def read_back(client: Client, ids: np.ndarray, host: bool = False) -> dict[int, tuple[int, torch.Tensor]]:
    """Every rank's KV of blocks (or host slots) ``ids``, in order: rank -> (weight version, tensor
    [layers, 2, len(ids) * block_size, heads_per_rank, head_dim]). A rank whose chunks disagree on the weight
    version (a restore came in between) reports the oldest."""
    cfg = client.cfg
    ids = np.asarray(ids)
    parts: dict[int, list[torch.Tensor]] = {}
    versions: dict[int, int] = {}
    step = chunk_blocks(cfg)
    for i in range(0, len(ids), step):
        for d in client.wait(client.read_blocks(ids[i : i + step], host=host)):
            got = torch.frombuffer(bytearray(d.data), dtype=cfg.torch_dtype)
            parts.setdefault(d.rank, []).append(got.view(cfg.layers, 2, -1, cfg.heads_per_rank, cfg.head_dim))
            versions[d.rank] = min(versions.get(d.rank, d.weight_version), d.weight_version)
    return {rank: (versions[rank], torch.cat(chunks, dim=2)) for rank, chunks in sorted(parts.items())}


def verify_kv(
    client: Client,
    tokens: np.ndarray,
    ids: np.ndarray,
    weight_version: int,
    *,
    host: bool = False,
    what: str = "",
    skip_other_versions: bool = False,
    prefilled: int | None = None,
) -> int:
    """Check that blocks ``ids`` (host slots with ``host``) hold, on every rank, exactly the KV of ``tokens`` under
    ``weight_version``. Returns how many ranks were compared. A rank that serves another weight version is a
    KVMismatch, unless ``skip_other_versions`` (traffic racing a restore): then it is not compared, nor counted.
    ``what`` (e.g. "decode copy of req-1") starts the message of a KVMismatch. ``prefilled``: the tokens after the
    first ``prefilled`` were written one by one by decode steps (``model.expected_kv``)."""
    cfg = client.cfg
    label = f"{what}: " if what else ""
    tier = "host slot" if host else "block"
    compared = 0
    for rank, (version, got) in read_back(client, ids, host).items():
        if version != weight_version:
            if skip_other_versions:
                continue
            raise KVMismatch(
                f"{label}rank {rank} serves weight version {version} for {tier}s {np.asarray(ids).tolist()}, "
                f"expected {weight_version}"
            )
        want = expected_kv(cfg, rank, weight_version, tokens, prefilled)
        got = got[:, :, : len(tokens)].contiguous()
        if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
            raise KVMismatch(label + _first_difference(cfg, got, want, ids, rank, weight_version, tier))
        compared += 1
    return compared


def _first_difference(
    cfg: CacheConfig, got: torch.Tensor, want: torch.Tensor, ids: np.ndarray, rank: int, wv: int, tier: str
) -> str:
    """Where ``got`` first differs from ``want`` ([layers, 2, T, heads, dim]), in token order, then layer order."""
    differs = (got.view(torch.uint8) != want.view(torch.uint8)).flatten(3).any(dim=3)  # [layers, 2, T]
    token, layer, kv = (int(x) for x in differs.permute(2, 0, 1).nonzero()[0])
    position = token // cfg.block_size
    return (
        f"rank {rank} {tier} {int(np.asarray(ids)[position])} (#{position} of {len(ids)}), layer {layer} "
        f"{'KV'[kv]}, token {token}: KV differs from weight version {wv}'s recomputation "
        f"({int(differs.sum())} of {differs.numel()} token rows of this rank differ)"
    )
