"""The worker's plug-in for a Hugging Face checkpoint directory (``mpkv launch --model DIR``): one rank's shard of a
Llama-family model (``LlamaModel``), its weights loaded by version.

Which weights a weight version means: the directory the controller published for that version
(``Controller.restore(weight_version, weights_from=DIR)``; loaded again even if it is the directory of the weights
held), else the weights the worker holds already (a restore to a new version number with the same checkpoint),
else, at start-up, the configured ``CacheConfig.model``. A directory must describe the same model (architecture
and every shape): anything else is a ModelError naming the difference, and the weights held stay as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from mpkv.config import CacheConfig
from mpkv.errors import ModelError
from mpkv.models.hf_config import ModelConfig, read_config
from mpkv.models.llama import AllReduce, Chunk, LlamaModel
from mpkv.models.sampling import next_tokens
from mpkv.models.weights import check_checkpoint, load_weights
from mpkv.protocol import DecodeItem, Prefill


def check_same_model(held: ModelConfig, new: ModelConfig, where: str) -> None:
    """``new`` (read from ``where``) is the same network as ``held``: only its weights may differ."""
    if replace(new, dtype=held.dtype) != held:  # the dtype weights are stored in is not the model's shape
        fields = [k for k in held.__dataclass_fields__ if k != "dtype" and getattr(held, k) != getattr(new, k)]
        diff = [f"{k}: {getattr(held, k)!r} -> {getattr(new, k)!r}" for k in fields]
        raise ModelError(f"{where}: not the model this instance serves ({'; '.join(diff)})")


class HFRunner:
    def __init__(self, cfg: CacheConfig, rank: int, device: torch.device, all_reduce: AllReduce | None) -> None:
        self.cfg, self.rank, self.device, self.all_reduce = cfg, rank, device, all_reduce
        self.model_cfg = read_config(cfg.model)
        self.model: LlamaModel | None = None

    def load(self, weight_version: int, source: str) -> None:
        if not source and self.model is not None:
            return  # a new version number for the weights held
        # A published source is loaded even from the directory of the weights held: a trainer may save every
        # update into one directory, so a path says nothing about whether its files changed.
        src = source or self.cfg.model
        if src != self.cfg.model:
            check_same_model(self.model_cfg, read_config(src), f"{src}/config.json")
            check_checkpoint(src, self.model_cfg, self.cfg.tp)
        self.model = None  # the old weights go first: never two copies in memory (a failed load fails the worker)
        weights = load_weights(src, self.model_cfg, self.rank, self.cfg.tp, self.cfg.torch_dtype, self.device)
        tp = self.cfg.tp
        self.model = LlamaModel(self.model_cfg, weights, rank=self.rank, tp=tp, all_reduce=self.all_reduce)

    def _model(self) -> LlamaModel:
        if self.model is None:
            raise RuntimeError("model weights are not loaded (load(weight_version, source) first)")
        return self.model

    def prefill(self, batch: Sequence[Prefill], pool: torch.Tensor, on_layer_done: object) -> list[int]:
        chunks = [Chunk(torch.as_tensor(r.tokens, dtype=torch.long), torch.as_tensor(r.blocks)) for r in batch]
        logits = self._model().forward(chunks, pool, on_layer_done)  # type: ignore[arg-type]
        return next_tokens(logits, [r.sampling for r in batch], [len(r.tokens) for r in batch])

    def decode(self, batch: Sequence[DecodeItem], pool: torch.Tensor) -> list[int]:
        tokens = torch.tensor([i.token for i in batch], dtype=torch.long)
        positions = [i.position for i in batch]
        logits = self._model().decode(tokens, positions, [torch.as_tensor(i.blocks) for i in batch], pool)
        return next_tokens(logits, [i.sampling for i in batch], [p + 1 for p in positions])
