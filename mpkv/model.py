"""The model plug-in interface, and the default plug-in: a small deterministic synthetic transformer.

A plug-in is anything with ``load(weight_version)`` and ``forward(batch, kv, on_layer_done)``: given a batch
of prefill requests with their block tables, it writes each layer's K/V into the pool and reports each layer
as it finishes (the messager ships finished layers while later ones compute).

The synthetic model does real matmuls on the backend's device with weights drawn from a generator seeded by
the weight version, so the exact K/V of any token on any rank can be recomputed anywhere (``expected_kv``),
which is how the demo and the tests verify every byte.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from mpkv.config import CacheConfig
from mpkv.protocol import Prefill


class KVWriter(Protocol):
    def write(self, layer: int, blocks: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V of ``T`` tokens ([T, heads_per_rank, head_dim]) into ``blocks`` (in order)."""
        ...


class ModelRunner(Protocol):
    def load(self, weight_version: int) -> None: ...

    def forward(self, batch: Sequence[Prefill], kv: KVWriter, on_layer_done: Callable[[int], None]) -> None: ...


class SyntheticModel:
    """``layers`` of: k = x Wk, v = x Wv (this rank's heads), x = tanh(x Wo). Float32 compute, stored in the
    pool's dtype. One request at a time, so shapes (and so rounding) never depend on batching."""

    def __init__(self, cfg: CacheConfig, rank: int, device: torch.device | str = "cpu") -> None:
        self.cfg, self.rank, self.device = cfg, rank, torch.device(device)
        self.weight_version = -1
        self._w: dict[str, torch.Tensor] = {}

    def load(self, weight_version: int) -> None:
        if weight_version == self.weight_version:
            return
        c = self.cfg
        # An odd factor modulo 2**64: no two weight versions share a seed.
        g = torch.Generator().manual_seed((1_000_003 * weight_version + 17) % 2**64)
        scale = c.hidden**-0.5
        cols = slice(self.rank * c.heads_per_rank * c.head_dim, (self.rank + 1) * c.heads_per_rank * c.head_dim)
        full = c.kv_heads * c.head_dim

        def draw(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float32)

        emb = draw(c.vocab, c.hidden)
        wk = draw(c.layers, c.hidden, full)[:, :, cols] * scale
        wv = draw(c.layers, c.hidden, full)[:, :, cols] * scale
        wo = draw(c.layers, c.hidden, c.hidden) * scale
        self._w = {k: t.contiguous().to(self.device) for k, t in dict(emb=emb, wk=wk, wv=wv, wo=wo).items()}
        self.weight_version = weight_version

    def layers_kv(self, tokens: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V of every layer for ``tokens`` on this rank, in the pool's dtype."""
        return list(self._iter_kv(tokens))

    def _iter_kv(self, tokens: np.ndarray):  # type: ignore[no-untyped-def]
        c, w = self.cfg, self._w
        if not w:
            raise RuntimeError("model weights are not loaded (load(weight_version) first)")
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64) % c.vocab, device=self.device)
        x = w["emb"][ids]
        shape = (len(ids), c.heads_per_rank, c.head_dim)
        for layer in range(c.layers):
            k = (x @ w["wk"][layer]).view(shape).to(c.torch_dtype)
            v = (x @ w["wv"][layer]).view(shape).to(c.torch_dtype)
            yield k, v
            x = torch.tanh(x @ w["wo"][layer])

    def forward(self, batch: Sequence[Prefill], kv: KVWriter, on_layer_done: Callable[[int], None]) -> None:
        gens = [self._iter_kv(req.tokens) for req in batch]
        tables = [torch.as_tensor(np.asarray(req.blocks, dtype=np.int64), device=self.device) for req in batch]
        for layer in range(self.cfg.layers):
            for gen, blocks in zip(gens, tables, strict=True):
                k, v = next(gen)
                kv.write(layer, blocks, k, v)
            on_layer_done(layer)


def expected_kv(cfg: CacheConfig, rank: int, weight_version: int, tokens: np.ndarray) -> torch.Tensor:
    """The exact bytes a rank's pool must hold for ``tokens``: [layers, 2, T, heads_per_rank, head_dim]."""
    m = SyntheticModel(cfg, rank)
    m.load(weight_version)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: a matmul's rounding may depend on how it was split
    try:
        return torch.stack([torch.stack(kv) for kv in m.layers_kv(tokens)])
    finally:
        torch.set_num_threads(threads)
