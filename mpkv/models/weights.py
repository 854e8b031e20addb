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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    embed: torch.Tensor  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]; the embedding itself when tied


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
    parts = _parts(cfg, rank, tp)
    # Read (and check) everything before building anything: a bad checkpoint leaves nothing half-made.
    read = {p.name: ckpt.read(p).to(device=device, dtype=want) for p in parts}
    return _assemble(cfg, read)


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


def _assemble(cfg: ModelConfig, w: dict[str, torch.Tensor]) -> RankWeights:
    layers = []
    for i in range(cfg.layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        qkv_bias = None
        if cfg.qkv_bias:
            qkv_bias = torch.cat([w[at + f"{x}_proj.bias"] for x in "qkv"])
        layers.append(
            LayerWeights(
                input_norm=w[f"model.layers.{i}.input_layernorm.weight"],
                qkv=torch.cat([w[at + f"{x}_proj.weight"] for x in "qkv"]),  # one matmul instead of three
                qkv_bias=qkv_bias,
                o=w[at + "o_proj.weight"],
                o_bias=w.get(at + "o_proj.bias"),
                post_norm=w[f"model.layers.{i}.post_attention_layernorm.weight"],
                gate_up=torch.cat([w[mlp + "gate_proj.weight"], w[mlp + "up_proj.weight"]]),
                down=w[mlp + "down_proj.weight"],
            )
        )
    embed = w["model.embed_tokens.weight"]
    lm_head = embed if cfg.tie_embeddings else w["lm_head.weight"]
    return RankWeights(embed=embed, layers=layers, norm=w["model.norm.weight"], lm_head=lm_head)


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
        view = self.view(part)
        if part.rows is not None:
            return view[part.rows[0] : part.rows[1]]
        if part.cols is not None:
            return view[:, part.cols[0] : part.cols[1]]
        return view[:]

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
