"""Weights of a Llama-family checkpoint (``*.safetensors``), each tensor-parallel rank reading only its shard.

The split (Megatron-style, so a rank needs one all-reduce after attention and one after the MLP):

- q/k/v projections and the MLP's gate/up: by output rows, i.e. by heads (a rank's query heads and the KV heads
  they share) and by intermediate columns;
- o_proj and down_proj: by input columns, the same heads / intermediate slice; each rank's product is a partial
  sum of the full one;
- embeddings, norms, lm_head and o_proj's bias: replicated (a bias is added once, after the all-reduce).

``safetensors`` reads a slice of a tensor without reading the rest, so a rank's memory is its shard only. Every
tensor's shape is checked against the config before anything is kept: a checkpoint that does not match fails
by name, with the expected and found shapes.
"""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpkv.errors import ModelError
from mpkv.models.hf_config import ModelConfig, check_trusted

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(heads + 2 kv_heads) / tp * head_dim, hidden]: this rank's q, k, v rows, fused
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads / tp * head_dim]: this rank's input columns
    o_bias: torch.Tensor | None  # [hidden], replicated: added after the all-reduce
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 intermediate / tp, hidden]: this rank's gate rows, then its up rows
    down: torch.Tensor  # [hidden, intermediate / tp]


@dataclass
class RankWeights:
    """Views of one flat allocation (``arena``): a reload copies into it in place, and dropping it frees it all
    at once (on cpu an anonymous mapping, returned to the system when the last view goes)."""

    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied
    arena: torch.Tensor | None = None  # uint8, every tensor above is a view of it


@dataclass(frozen=True)
class _Part:
    """One tensor to read: its full shape in the checkpoint, and which slice this rank takes of it."""

    name: str
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # split by output rows (dim 0)
    cols: tuple[int, int] | None = None  # split by input columns (dim 1)


def load_weights(
    model_dir: str | Path,
    cfg: ModelConfig,
    rank: int = 0,
    tp: int = 1,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> RankWeights:
    """Rank ``rank``'s shard of the checkpoint in ``model_dir``, as ``dtype`` (default: the checkpoint's)."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is not in 0..{tp - 1}")
    cfg.check_tp(tp)
    ckpt = _Checkpoint(Path(model_dir))
    want = dtype if dtype is not None else getattr(torch, cfg.dtype)
    for part in _parts(cfg, rank, tp):  # every tensor present and of its shape before anything is allocated
        ckpt.view(part)
    w = allocate(cfg, rank, tp, want, device)
    fill(w, cfg, rank, tp, ckpt.read)
    return w


def allocate(cfg: ModelConfig, rank: int, tp: int, dtype: torch.dtype, device: torch.device | str) -> RankWeights:
    """Rank ``rank``'s weights, uninitialised, as views of one allocation (see RankWeights)."""
    d, hidden, item = cfg.head_dim, cfg.hidden, torch.empty(0, dtype=dtype).element_size()
    q, kv, m = cfg.heads * d // tp, cfg.kv_heads * d // tp, cfg.intermediate // tp
    shapes: list[tuple[int, ...]] = [(cfg.vocab, hidden), (hidden,)] + (
        [] if cfg.tie_embeddings else [(cfg.vocab, hidden)]
    )
    layer = [(hidden,), (q + 2 * kv, hidden), (hidden, q), (hidden,), (2 * m, hidden), (hidden, m)]
    layer += [(q + 2 * kv,)] if cfg.qkv_bias else []
    layer += [(hidden,)] if cfg.o_bias else []
    shapes += layer * cfg.layers
    sizes = [-(-math.prod(s) * item // 64) * 64 for s in shapes]  # each view 64-byte aligned
    arena = _arena(sum(sizes), torch.device(device))
    views, off = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        views.append(arena[off : off + math.prod(shape) * item].view(dtype).view(shape))
        off += size
    it = iter(views)
    embed, norm = next(it), next(it)
    lm_head = embed if cfg.tie_embeddings else next(it)
    layers = []
    for _ in range(cfg.layers):
        input_norm, qkv, o, post_norm, gate_up, down = (next(it) for _ in range(6))
        qkv_bias = next(it) if cfg.qkv_bias else None
        o_bias = next(it) if cfg.o_bias else None
        layers.append(LayerWeights(input_norm, qkv, qkv_bias, o, o_bias, post_norm, gate_up, down))
    return RankWeights(embed, layers, norm, lm_head, arena)


def _arena(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type != "cpu":
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    # An anonymous mapping of its own, not the heap: freeing it returns the memory to the system, measurably (a
    # heap allocation below malloc's mmap threshold would stay in the process). Through numpy: the array holds
    # an export of the mapping, which stays mapped exactly as long as a view of it lives.
    return torch.from_numpy(np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8))


def fill(w: RankWeights, cfg: ModelConfig, rank: int, tp: int, read: Callable[[_Part], Any]) -> None:
    """Copy every tensor of rank ``rank``'s shard into ``w``, in place: ``read(part)`` gives the part's slice (a
    tensor, or anything ``torch.as_tensor`` takes), converted to ``w``'s dtype and device as it is copied."""
    into = _placement(w, cfg, tp)
    for part in _parts(cfg, rank, tp):
        src = read(part)
        dst = into[part.name]
        if tuple(src.shape) != tuple(dst.shape):  # copy_ would broadcast a smaller tensor without a word
            raise ModelError(
                f"tensor {part.name}: this rank's slice has shape {list(src.shape)}, expected {list(dst.shape)}"
            )
        dst.copy_(src)


def _placement(w: RankWeights, cfg: ModelConfig, tp: int) -> dict[str, torch.Tensor]:
    """Where each checkpoint tensor's slice goes in ``w``: q, k, v rows into the fused qkv, gate and up into
    gate_up, the rest one to one."""
    q, kv, m = cfg.heads * cfg.head_dim // tp, cfg.kv_heads * cfg.head_dim // tp, cfg.intermediate // tp
    out = {"model.embed_tokens.weight": w.embed, "model.norm.weight": w.norm}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w.lm_head
    for i, lw in enumerate(w.layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        out[f"model.layers.{i}.input_layernorm.weight"] = lw.input_norm
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = lw.post_norm
        for x, rows in zip("qkv", (slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)), strict=True):
            out[at + f"{x}_proj.weight"] = lw.qkv[rows]
            if lw.qkv_bias is not None:
                out[at + f"{x}_proj.bias"] = lw.qkv_bias[rows]
        out[at + "o_proj.weight"] = lw.o
        if lw.o_bias is not None:
            out[at + "o_proj.bias"] = lw.o_bias
        out[mlp + "gate_proj.weight"] = lw.gate_up[:m]
        out[mlp + "up_proj.weight"] = lw.gate_up[m:]
        out[mlp + "down_proj.weight"] = lw.down
    return out


def slice_of(t: Any, part: _Part) -> Any:
    """This rank's slice of a full tensor (or of a safetensors slice handle)."""
    if part.rows is not None:
        return t[part.rows[0] : part.rows[1]]
    if part.cols is not None:
        return t[:, part.cols[0] : part.cols[1]]
    return t[:]


def check_checkpoint(model_dir: str | Path, cfg: ModelConfig, tp: int = 1) -> None:
    """Every tensor the model needs is in the checkpoint, with its shape, before anything is started or changed:
    reads the safetensors headers only. A ModelError names the first tensor missing or misshapen."""
    cfg.check_tp(tp)
    ckpt = _Checkpoint(Path(model_dir))
    for part in _parts(cfg, 0, tp):
        ckpt.view(part)


def _parts(cfg: ModelConfig, rank: int, tp: int) -> list[_Part]:
    d, hidden = cfg.head_dim, cfg.hidden

    def share(total: int) -> tuple[int, int]:
        n = total // tp
        return rank * n, (rank + 1) * n

    q_rows, kv_rows, mlp_rows = share(cfg.heads * d), share(cfg.kv_heads * d), share(cfg.intermediate)
    parts = [_Part("model.embed_tokens.weight", (cfg.vocab, hidden)), _Part("model.norm.weight", (hidden,))]
    if not cfg.tie_embeddings:
        parts.append(_Part("lm_head.weight", (cfg.vocab, hidden)))
    for i in range(cfg.layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        parts += [
            _Part(f"model.layers.{i}.input_layernorm.weight", (hidden,)),
            _Part(f"model.layers.{i}.post_attention_layernorm.weight", (hidden,)),
            _Part(at + "q_proj.weight", (cfg.heads * d, hidden), rows=q_rows),
            _Part(at + "k_proj.weight", (cfg.kv_heads * d, hidden), rows=kv_rows),
            _Part(at + "v_proj.weight", (cfg.kv_heads * d, hidden), rows=kv_rows),
            _Part(at + "o_proj.weight", (hidden, cfg.heads * d), cols=q_rows),
            _Part(mlp + "gate_proj.weight", (cfg.intermediate, hidden), rows=mlp_rows),
            _Part(mlp + "up_proj.weight", (cfg.intermediate, hidden), rows=mlp_rows),
            _Part(mlp + "down_proj.weight", (hidden, cfg.intermediate), cols=mlp_rows),
        ]
        if cfg.qkv_bias:
            parts += [
                _Part(at + "q_proj.bias", (cfg.heads * d,), rows=q_rows),
                _Part(at + "k_proj.bias", (cfg.kv_heads * d,), rows=kv_rows),
                _Part(at + "v_proj.bias", (cfg.kv_heads * d,), rows=kv_rows),
            ]
        if cfg.o_bias:
            parts.append(_Part(at + "o_proj.bias", (hidden,)))
    return parts


class _Checkpoint:
    """Where each tensor lives: the shard index when there is one, else the one ``.safetensors`` file."""

    def __init__(self, model_dir: Path) -> None:
        check_trusted(model_dir)
        self.dir = model_dir
        self._open: dict[str, Any] = {}  # file name -> safe_open handle, opened once
        self.where = self._index() if (model_dir / INDEX_FILE).exists() else self._single()

    def _index(self) -> dict[str, Path]:
        path = self.dir / INDEX_FILE
        check_trusted(path)
        try:
            index = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: not a readable JSON file: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{path}: malformed index: no 'weight_map' object mapping tensor names to files")
        where = {}
        for name, file in weight_map.items():
            # A shard is a file next to the index: a path elsewhere is a broken (or hostile) index.
            if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
                raise ModelError(f"{path}: malformed index: tensor {name!r} maps to {file!r}, not a shard file name")
            if not (self.dir / file).is_file():
                raise ModelError(f"{path}: malformed index: tensor {name!r} is in {file}, which does not exist")
            where[name] = self.dir / file
        return where

    def _single(self) -> dict[str, Path]:
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise ModelError(f"{self.dir}: no *.safetensors file (and no {INDEX_FILE})")
        if len(files) > 1:
            names = ", ".join(f.name for f in files[:4])
            raise ModelError(f"{self.dir}: {len(files)} .safetensors files ({names}...) but no {INDEX_FILE}")
        return dict.fromkeys(self._file(files[0]).keys(), files[0])

    def _file(self, path: Path) -> Any:
        from safetensors import safe_open

        if path.name not in self._open:
            check_trusted(path)
            try:
                self._open[path.name] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error type for a corrupt header
                raise ModelError(f"{path}: not a readable safetensors file: {e}") from None
        return self._open[path.name]

    def read(self, part: _Part) -> torch.Tensor:
        out: torch.Tensor = slice_of(self.view(part), part)
        return out

    def view(self, part: _Part) -> Any:
        """The tensor's lazy slice handle, once its presence and shape are checked (nothing read yet)."""
        path = self.where.get(part.name)
        if path is None:
            raise ModelError(f"{self.dir}: checkpoint has no tensor {part.name} (expected shape {list(part.shape)})")
        f = self._file(path)
        if part.name not in set(f.keys()):  # a safe_open handle has keys() but no `in`
            raise ModelError(f"{self.dir / INDEX_FILE}: malformed index: {part.name} is not in {path.name}")
        view = f.get_slice(part.name)
        found = tuple(view.get_shape())
        if found != part.shape:
            raise ModelError(
                f"{path}: tensor {part.name} has shape {list(found)}, expected {list(part.shape)} from config.json"
            )
        return view
