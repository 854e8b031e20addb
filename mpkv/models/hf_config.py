"""A Hugging Face ``config.json`` of a Llama-family causal LM, read into one frozen ``ModelConfig``.

Both layouts ``transformers`` writes are read: 4.x (``torch_dtype``; ``rope_theta`` at the top level, scaling in
``rope_scaling``) and 5.x (``dtype``; ``rope_parameters`` holding ``rope_theta``, ``rope_type`` and the scaling
parameters). Anything that would change the math and is not implemented here (a rope type, sliding-window
attention, an activation, quantization, ...) is refused with a ``ModelError`` naming the key: a checkpoint that
loads must compute what its authors trained, never an approximation of it. Keys that do not change the forward
(token ids, ``use_cache``, ``initializer_range``, ...) are ignored.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpkv.errors import ModelError

# architecture -> (model_type, q/k/v projections have a bias whatever ``attention_bias`` says)
ARCHITECTURES = {"LlamaForCausalLM": ("llama", False), "Qwen2ForCausalLM": ("qwen2", True)}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    kind: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0  # linear, llama3: how much longer the context is than the one trained on
    low_freq_factor: float = 1.0  # llama3 (the defaults are unused for other kinds)
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 8192  # llama3


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool  # Qwen2 always; Llama with attention_bias
    o_bias: bool  # Llama with attention_bias (Qwen2's o_proj has none)
    tie_embeddings: bool
    dtype: str  # the checkpoint's dtype (what the weights are stored in)
    max_positions: int

    def check_tp(self, tp: int) -> None:
        """Heads (query and KV) and the MLP's intermediate width are split by rank: each must divide by ``tp``."""
        for what, n in (("num_attention_heads", self.heads), ("num_key_value_heads", self.kv_heads)):
            if n % tp:
                raise ModelError(f"config: {what} ({n}) is not divisible by the tensor-parallel size {tp}")
        if self.intermediate % tp:
            raise ModelError(f"config: intermediate_size ({self.intermediate}) is not divisible by tp {tp}")


def check_trusted(path: Path) -> None:
    """Refuse a checkpoint directory or file that another user could have written (I8): one owned by someone else
    than this user or root, or writable by everyone. Links are followed (the Hugging Face cache links each file
    of a snapshot to a blob): it is the target that is loaded. Group-writable is accepted: a group is a choice of
    whom to trust."""
    try:
        st = path.stat()
    except OSError as e:
        raise ModelError(f"{path}: cannot be read ({e.strerror})") from None
    if st.st_uid not in (os.getuid(), 0):
        raise ModelError(
            f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()}) or root: another user could "
            "change the weights under the instance; copy the checkpoint to a directory of your own"
        )
    if st.st_mode & stat.S_IWOTH:
        raise ModelError(f"{path} is writable by every user (mode {stat.filemode(st.st_mode)}); chmod o-w it")


def read_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    check_trusted(Path(model_dir))
    if path.exists():
        check_trusted(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{model_dir}: no config.json (a model directory is Hugging Face format)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON file: {e}") from None
    return parse_config(raw, str(path))


def parse_config(raw: object, where: str = "config.json") -> ModelConfig:
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: must hold a JSON object, got {type(raw).__name__}")
    c = _Reader(raw, where)
    arch = _architecture(c)
    _refuse_unsupported(c)
    hidden, heads = c.int("hidden_size"), c.int("num_attention_heads")
    kv_heads = c.int("num_key_value_heads", default=heads)
    head_dim = c.int("head_dim", default=hidden // heads)
    if heads % kv_heads:
        raise ModelError(
            f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    if head_dim % 2:
        raise ModelError(f"{where}: head_dim ({head_dim}) must be even (rotary embeddings rotate pairs)")
    attention_bias = c.bool("attention_bias", default=False)
    return ModelConfig(
        architecture=arch,
        hidden=hidden,
        intermediate=c.int("intermediate_size"),
        layers=c.int("num_hidden_layers"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=c.int("vocab_size"),
        rms_norm_eps=c.float("rms_norm_eps", default=1e-6),
        rope=_rope(c),
        qkv_bias=ARCHITECTURES[arch][1] or attention_bias,
        o_bias=arch == "LlamaForCausalLM" and attention_bias,
        tie_embeddings=c.bool("tie_word_embeddings", default=False),
        dtype=_dtype(c),
        max_positions=c.int("max_position_embeddings", default=2**31 - 1),
    )


class _Reader:
    """Typed access to the config's keys; every error names the key. ``null`` counts as absent (both
    ``transformers`` versions write ``"head_dim": null`` and the like)."""

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw, self.where = raw, where

    def get(self, key: str, default: object = None) -> Any:
        value = self.raw.get(key)
        return default if value is None else value

    def fail(self, key: str, message: str) -> ModelError:
        return ModelError(f"{self.where}: {key} {message}")

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise self.fail(key, "is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise self.fail(key, f"must be a positive integer, got {value!r}")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default)
        if value is None:
            raise self.fail(key, "is missing")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise self.fail(key, f"must be a positive number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {value!r}")
        return value


def _architecture(c: _Reader) -> str:
    archs = c.get("architectures", [])
    if not isinstance(archs, list) or len(archs) != 1:
        raise c.fail("architectures", f"must list exactly one architecture, got {archs!r}")
    arch = archs[0]
    if arch not in ARCHITECTURES:
        raise c.fail(
            "architectures", f"names {arch!r}, which mpkv does not implement; supported: {sorted(ARCHITECTURES)}"
        )
    model_type = c.get("model_type", ARCHITECTURES[arch][0])
    if model_type != ARCHITECTURES[arch][0]:
        raise c.fail("model_type", f"is {model_type!r}, but the architecture {arch} is {ARCHITECTURES[arch][0]!r}")
    return str(arch)


def _refuse_unsupported(c: _Reader) -> None:
    """Keys whose non-default values change the forward in ways not implemented here."""
    if c.get("hidden_act", "silu") != "silu":
        raise c.fail("hidden_act", f"is {c.get('hidden_act')!r}; only 'silu' (SwiGLU) is implemented")
    if c.get("mlp_bias", False) is not False:
        raise c.fail("mlp_bias", "is set; MLP biases are not implemented")
    if c.get("use_sliding_window", False) is not False:
        raise c.fail("use_sliding_window", "is set; sliding-window attention is not implemented")
    layer_types = c.get("layer_types", [])
    if not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types):
        raise c.fail(
            "layer_types", f"must all be 'full_attention' (sliding windows are not implemented): {layer_types}"
        )
    if c.get("quantization_config") is not None:
        raise c.fail("quantization_config", "is set; quantized checkpoints are not supported")
    if c.get("use_mrope", False) is not False:
        raise c.fail("use_mrope", "is set; multimodal rotary embeddings are not implemented")


def _dtype(c: _Reader) -> str:
    key = "dtype" if c.get("dtype") is not None else "torch_dtype"  # 5.x writes dtype; 4.x torch_dtype
    value = c.get(key, "float32")
    if value not in DTYPES:
        raise c.fail(key, f"is {value!r}; supported: {', '.join(DTYPES)}")
    return str(value)


def _rope(c: _Reader) -> RopeConfig:
    """5.x: everything in ``rope_parameters``. 4.x: ``rope_theta`` at the top level, ``rope_scaling`` null or a
    dict whose type is under ``rope_type`` (or, older, ``type``)."""
    params = c.get("rope_parameters")
    key = "rope_parameters"
    if params is None:
        key = "rope_scaling"
        scaling = c.get("rope_scaling", {})
        if not isinstance(scaling, dict):
            raise c.fail(key, f"must be an object or null, got {scaling!r}")
        params = {**scaling, "rope_theta": c.get("rope_theta", 10000.0)}
    if not isinstance(params, dict):
        raise c.fail(key, f"must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):  # 5.x's per-layer-type form (Gemma-style)
        raise c.fail(key, "holds per-layer-type rope parameters, which are not implemented")
    p = _Reader(params, f"{c.where}: {key}")
    kind = p.get("rope_type", p.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise p.fail("rope_type", f"is {kind!r}, which mpkv does not implement; supported: {', '.join(ROPE_TYPES)}")
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise p.fail("partial_rotary_factor", "is not 1.0; partial rotary embeddings are not implemented")
    theta = p.float("rope_theta", default=10000.0)
    if kind == "default":
        return RopeConfig(theta)
    if kind == "linear":
        return RopeConfig(theta, kind, factor=p.float("factor"))
    # llama3: every parameter is required, as in the checkpoints Meta published; no guessed defaults
    low, high = p.float("low_freq_factor"), p.float("high_freq_factor")
    if high <= low:
        raise p.fail("high_freq_factor", f"({high}) must be greater than low_freq_factor ({low})")
    return RopeConfig(
        theta,
        kind,
        factor=p.float("factor"),
        low_freq_factor=low,
        high_freq_factor=high,
        original_max_positions=p.int("original_max_position_embeddings"),
    )
