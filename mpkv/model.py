"""The model plug-in interface the worker calls, how the worker builds a plug-in, and the default plug-in: a small
deterministic synthetic model.

``CacheConfig.model`` names the plug-in:
- ``"synthetic"``: ``SyntheticModel`` below (the byte-exact checks of the demo, benchmarks and tests);
- a directory: a Hugging Face checkpoint (``config.json`` and ``*.safetensors``) of a Llama-family model, run by
  ``mpkv.models.runner.HFRunner``;
- ``"module:Class"``: any class with this interface, built as ``Class(cfg, rank, device, all_reduce)``.

A plug-in writes K/V into the rank's pool tensor ``[layers, 2, blocks, block_size, kv_heads / tp, head_dim]``
through each request's block table, and returns each request's next token. Every rank gets the same tasks in the
same order (invariant I4) and must return the same tokens: under tensor parallelism the ranks' logits agree
because ``all_reduce`` sums the partial products in one fixed order.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from mpkv.config import CacheConfig
from mpkv.errors import ModelError
from mpkv.models.sampling import next_tokens
from mpkv.protocol import DecodeItem, Prefill
from mpkv.publication import Publication

SYNTHETIC = "synthetic"
AllReduce = Callable[[torch.Tensor], torch.Tensor]  # the sum over the ranks of an instance
LayerDone = Callable[[int], None]


class ModelRunner(Protocol):
    """What the worker calls. ``holds(weight_version, published)`` runs whenever the worker maps a pool (start-up,
    restore): whether it holds that version's weights already; if not, ``load`` runs next (after the pool is
    published), and also after its weights were cleared. ``published`` is what a trainer published for the version
    (``mpkv.publication.OpenPublication`` reads it), or None (the configured weights: a checkpoint's, or seeded by
    the version). ``release`` drops the weights (the tier ``clear(weights=True)`` frees) and returns the bytes
    released. ``prefill`` writes every layer's K/V of each request's tokens and calls ``on_layer_done(l)`` once
    layer l is written for the whole batch (a prefill instance ships it then); ``decode`` writes the K/V of each
    item's token at its position. Both return the next token of each request, in order.

    Under tensor parallelism every rank must run the same collectives: input a runner refuses (``BadTask``, which
    fails the task and not the worker) must be refused before its first ``all_reduce``, alike on every rank; any
    other exception fails the worker."""

    def load(self, weight_version: int, published: Publication | None) -> None: ...

    def holds(self, weight_version: int, published: Publication | None) -> bool:
        """Whether ``load(weight_version, published)`` would load nothing (what is held is that already)."""
        ...

    def release(self) -> int: ...

    def prefill(self, batch: Sequence[Prefill], pool: torch.Tensor, on_layer_done: LayerDone) -> list[int]: ...

    def decode(self, batch: Sequence[DecodeItem], pool: torch.Tensor) -> list[int]: ...


def build_runner(cfg: CacheConfig, rank: int, device: torch.device, all_reduce: AllReduce | None) -> ModelRunner:
    """The plug-in ``cfg.model`` names, for ``rank``."""
    if cfg.model == SYNTHETIC:
        return SyntheticModel(cfg, rank, device)
    if Path(cfg.model).is_dir():
        from mpkv.models.runner import HFRunner

        return HFRunner(cfg, rank, device, all_reduce)
    runner: ModelRunner = plugin_class(cfg.model)(cfg, rank, device, all_reduce)
    return runner


def plugin_class(model: str) -> Callable[..., ModelRunner]:
    """The class ``module:Class`` names, with the three methods of ModelRunner, or a ModelError saying why not."""
    module, _, name = model.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"model {model!r}: cannot import {name} from {module}: {e}") from None
    missing = [m for m in ("load", "holds", "release", "prefill", "decode") if not callable(getattr(cls, m, None))]
    if not isinstance(cls, type) or missing:
        raise ModelError(
            f"model {model!r}: {name} is not a class with load, holds, release, prefill and decode "
            "(mpkv.model.ModelRunner)" + (f"; it lacks {', '.join(missing)}" if missing else "")
        )
    return cls


class SyntheticModel:
    """``layers`` of: k = x Wk, v = x Wv (this rank's heads), x = tanh(x Wo); logits = x E^T with E the
    embedding. No attention: a token's K/V depend on the token alone, so the exact K/V of any token on any
    rank can be recomputed anywhere (``expected_kv``), which is how the demo and the tests verify every byte.
    Float32 compute, stored in the pool's dtype; one request at a time, so shapes (and so rounding) never depend
    on batching. Weights are drawn from a generator seeded by the weight version. It computes on the CPU whatever
    the pool's device (a GPU's float32 products round differently from the CPU's, so the bytes would no longer be
    ``expected_kv``'s): only the K/V it writes go to the pool's device."""

    def __init__(
        self, cfg: CacheConfig, rank: int, device: torch.device | str = "cpu", all_reduce: AllReduce | None = None
    ) -> None:
        # ``all_reduce`` is unused: every rank computes the whole hidden state (only K/V are split by head);
        # ``device`` too: it computes on the CPU (see above)
        self.cfg, self.rank, self.device = cfg, rank, torch.device("cpu")
        self.weight_version = -1
        self._w: dict[str, torch.Tensor] = {}

    def load(self, weight_version: int, published: Publication | None = None) -> None:
        if published is not None:
            raise ModelError("the synthetic model is seeded by its weight version; it takes no published weights")
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

    def holds(self, weight_version: int, published: Publication | None = None) -> bool:
        return published is None and weight_version == self.weight_version and bool(self._w)

    def release(self) -> int:
        held = sum(t.nbytes for t in self._w.values())
        self._w, self.weight_version = {}, -1
        return held

    def layers_kv(self, tokens: np.ndarray) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K and V of every layer for ``tokens`` on this rank, in the pool's dtype."""
        return [kv for kv, _ in self._iter(tokens)]

    def _iter(self, tokens: np.ndarray):  # type: ignore[no-untyped-def]
        """Per layer: ((K, V) of the tokens, the hidden state after the layer)."""
        c, w = self.cfg, self._w
        if not w:
            raise RuntimeError("model weights are not loaded (load(weight_version) first)")
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64) % c.vocab, device=self.device)
        x = w["emb"][ids]
        shape = (len(ids), c.heads_per_rank, c.head_dim)
        for layer in range(c.layers):
            k = (x @ w["wk"][layer]).view(shape).to(c.torch_dtype)
            v = (x @ w["wv"][layer]).view(shape).to(c.torch_dtype)
            x = torch.tanh(x @ w["wo"][layer])
            yield (k, v), x

    def _logits(self, x_last: torch.Tensor) -> torch.Tensor:
        return x_last @ self._w["emb"].T

    def prefill(self, batch: Sequence[Prefill], pool: torch.Tensor, on_layer_done: LayerDone) -> list[int]:
        gens = [self._iter(req.tokens) for req in batch]
        tables = [torch.as_tensor(np.asarray(req.blocks, dtype=np.int64), device=pool.device) for req in batch]
        last: list[torch.Tensor] = [torch.empty(0)] * len(batch)
        bs = self.cfg.block_size
        for layer in range(self.cfg.layers):
            for i, (gen, blocks) in enumerate(zip(gens, tables, strict=True)):
                (k, v), x = next(gen)
                last[i] = x[-1]
                for kv_index, t in ((0, k), (1, v)):
                    full = len(blocks) * bs  # whole blocks: the tail of the last one is zeroed
                    t = torch.cat([t, t.new_zeros((full - t.shape[0], *t.shape[1:]))])
                    pool[layer, kv_index, blocks] = t.view(len(blocks), bs, *t.shape[1:]).to(pool.device)
            on_layer_done(layer)
        logits = torch.stack([self._logits(x) for x in last])
        return next_tokens(logits, [r.sampling for r in batch], [len(r.tokens) for r in batch])

    def decode(self, batch: Sequence[DecodeItem], pool: torch.Tensor) -> list[int]:
        bs, logits = self.cfg.block_size, []
        for item in batch:
            block, offset = int(item.blocks[item.position // bs]), item.position % bs
            steps = list(self._iter(np.array([item.token])))
            for layer, ((k, v), _) in enumerate(steps):
                pool[layer, 0, block, offset] = k[0].to(pool.device)
                pool[layer, 1, block, offset] = v[0].to(pool.device)
            logits.append(self._logits(steps[-1][1][-1]))
        return next_tokens(torch.stack(logits), [i.sampling for i in batch], [i.position + 1 for i in batch])


def expected_kv(
    cfg: CacheConfig, rank: int, weight_version: int, tokens: np.ndarray, prefilled: int | None = None
) -> torch.Tensor:
    """The exact bytes a rank's pool must hold for ``tokens``: [layers, 2, T, heads_per_rank, head_dim].
    ``prefilled``: only the first that many tokens were prefilled (together); each later one was written by a
    decode step of its own, computed as a one-row product, whose rounding may differ from the same row's in a
    product of many rows."""
    m = SyntheticModel(cfg, rank)
    m.load(weight_version)
    tokens = np.asarray(tokens)
    n = len(tokens) if prefilled is None else prefilled
    runs = [tokens[:n], *(tokens[i : i + 1] for i in range(n, len(tokens)))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: a matmul's rounding may depend on how it was split
    try:
        per_run = [torch.stack([torch.stack(kv) for kv in m.layers_kv(run)]) for run in runs if len(run)]
        return torch.cat(per_run, dim=2)
    finally:
        torch.set_num_threads(threads)


def expected_tokens(cfg: CacheConfig, weight_version: int, prompt: np.ndarray, max_new_tokens: int) -> list[int]:
    """The tokens the synthetic model generates greedily after ``prompt`` (what ``Client.generate`` must return)."""
    m = SyntheticModel(cfg, 0)
    m.load(weight_version)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out: list[int] = []
        tokens = np.asarray(prompt)
        while len(out) < max_new_tokens:
            x = list(m._iter(tokens))[-1][1]  # the hidden state after the last layer
            out.append(int(m._logits(x[-1]).argmax()))
            tokens = np.array(out[-1:])
        return out
    finally:
        torch.set_num_threads(threads)


__all__ = ["SYNTHETIC", "ModelRunner", "SyntheticModel", "build_runner", "expected_kv", "expected_tokens"]
