"""The worker's plug-in for a Hugging Face checkpoint directory (``mpkv launch --model DIR``): one rank's shard of a
Llama-family model (``LlamaModel``), its weights loaded by version.

Which weights a weight version means: what a trainer published for it (``Controller.update_weights``, NOTE
[ weight publications ] in mpkv.publication), or for the version the instance was launched with
(``CacheConfig.weight_version``), the configured checkpoint ``CacheConfig.model``. A worker loads a publication
unless it holds that very one (publications are compared by id: a version re-published after a restore that did
not complete is loaded again). A new version is copied over the old one in place: never two copies in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mpkv.config import CacheConfig
from mpkv.errors import ModelError
from mpkv.models.hf_config import ModelConfig, read_config
from mpkv.models.llama import AllReduce, Chunk, LlamaModel
from mpkv.models.sampling import next_tokens
from mpkv.models.weights import RankWeights, _Checkpoint, allocate, check_checkpoint, fill, slice_of
from mpkv.protocol import DecodeItem, Prefill
from mpkv.publication import BucketMaps, OpenPublication, Publication, expected_tensors
from mpkv.shm.proc import ProcId

LAUNCH = "launch"  # HFRunner.held: the weights of the configured checkpoint (CacheConfig.model)


def _resident_bytes(device: torch.device) -> int:
    """What this process holds: resident memory on cpu, its GPU memory as NVML sees it on cuda."""
    if device.type == "cuda":
        from mpkv.pool.cuda import held_bytes

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the weights' memory goes back to the device, not to torch's cache
        return held_bytes(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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
        self.weights: RankWeights | None = None  # kept across reloads: a new version is copied into it in place
        self.held = ""  # what the weights are: LAUNCH (the configured checkpoint) or a publication's id
        self.version = -1
        self._maps = BucketMaps()  # cpu: published buckets stay mapped between loads

    def load(self, weight_version: int, published: Publication | None) -> None:
        if published is not None and not published.complete:
            if self.holds(weight_version, published):
                return
            raise ModelError(
                f"the publication of weight version {weight_version} is incomplete (its publisher exited, or was "
                f"killed while writing it): worker r{self.rank} has nothing to load"
            )
        if published is not None:
            if published.id != self.held or self.model is None:
                with self._open(published) as pub:
                    self._fill(weight_version, published.id, lambda part: slice_of(pub.tensor(part.name), part))
                    if published.backend == "cuda":
                        self._check_publisher_lived(published, weight_version)
            return
        if weight_version == self.cfg.weight_version and weight_version != self.version:
            if self.held != LAUNCH or self.model is None:
                check_checkpoint(self.cfg.model, self.model_cfg, self.cfg.tp)
                self._fill(weight_version, LAUNCH, _Checkpoint(Path(self.cfg.model)).read)
            return
        if self.holds(weight_version, None):
            # A newer version nobody published, adopted while holding the launch weights: they are what it means
            # (a controller that writes the command block itself, docs/control-block.md; mpkv.Controller refuses).
            self.version = weight_version
            return
        held = "no weights (they were cleared)" if self.model is None else f"the weights of version {self.version}"
        raise ModelError(
            f"weight version {weight_version} has no published weights (Controller.update_weights publishes them) "
            f"and worker r{self.rank} holds {held}: nothing it may serve as version {weight_version}"
        )

    def holds(self, weight_version: int, published: Publication | None) -> bool:
        if self.model is None:
            return False
        if published is not None:
            return published.id == self.held
        if weight_version == self.version:  # what it holds, whatever the record says now
            return True
        if weight_version == self.cfg.weight_version:
            return self.held == LAUNCH
        return self.held == LAUNCH and weight_version >= self.version  # the launch weights, renamed (see load)

    def _check_publisher_lived(self, published: Publication, weight_version: int) -> None:
        """A cuda publication is the publisher's memory: if it exited during our copy, the copy cannot be trusted."""
        torch.cuda.synchronize(self.device)
        if not ProcId(published.writer, published.writer_start).alive():
            self.model, self.held = None, ""
            raise ModelError(
                f"the publisher of weight version {weight_version} (pid {published.writer}) exited while "
                f"worker r{self.rank} copied its CUDA memory: the copy cannot be trusted"
            )

    def _open(self, published: Publication) -> OpenPublication:
        return OpenPublication(published, self.rank, expected_tensors(self.model_cfg), self._maps)

    def _fill(self, weight_version: int, held: str, read: Callable[[Any], Any]) -> None:
        """Copy the new weights over the old ones in place (never two copies in memory). From the first byte on
        the old weights are gone: a failure here fails the worker, which never serves half-copied weights."""
        self.model, self.held, self.version = None, "", -1
        if self.weights is None:
            self.weights = allocate(self.model_cfg, self.rank, self.cfg.tp, self.cfg.torch_dtype, self.device)
        with torch.no_grad():
            fill(self.weights, self.model_cfg, self.rank, self.cfg.tp, read)
        tp = self.cfg.tp
        self.model = LlamaModel(self.model_cfg, self.weights, rank=self.rank, tp=tp, all_reduce=self.all_reduce)
        self.held, self.version = held, weight_version

    def release(self) -> int:
        """Drop the weights (the tier ``clear(weights=True)`` frees); the bytes the system got back, measured (the
        published buckets are unmapped first: their pages are the publication's, not ours to count)."""
        self._maps.close()
        before = _resident_bytes(self.device)
        self.model, self.weights, self.held, self.version = None, None, "", -1
        return max(0, before - _resident_bytes(self.device))

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
