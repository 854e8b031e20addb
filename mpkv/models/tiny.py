"""Tiny seeded Llama-family checkpoints, written without ``transformers``, and the greedy reference over them.

``write_checkpoint`` writes a Hugging Face model directory (``config.json`` in the 5.x layout that
``mpkv.models.hf_config`` reads, and ``model.safetensors``) whose weights are drawn from a seeded generator: the
same seed and sizes give the same bytes on any machine. Weights are N(0, std) with std 0.1 by default (wider than
the usual 0.02, so the logits of a few tokens are far apart and greedy picks are not near-ties that float
rounding could flip); norms are 1 + N(0, 0.1) (a norm weight read from the wrong place shows); Qwen2's q/k/v
biases are N(0, 0.5) (a model that dropped them would not compute the same tokens).

``greedy`` is the single-process reference: ``LlamaModel`` at TP=1 on a pool tensor of its own, one prompt at a
time (nothing batched with it, no padding), the most likely token at each step. It also gives, per generated
token, the margin of the pick (the top logit minus the runner-up): a token whose margin is within float
rounding of zero may come out otherwise in a computation that sums in another order (TP=2 sums partial products
across ranks), which a caller comparing tokens can name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mpkv.models.hf_config import ARCHITECTURES, read_config
from mpkv.models.llama import LlamaModel
from mpkv.models.weights import SINGLE_FILE, load_weights


def write_checkpoint(
    model_dir: str | Path,
    seed: int,
    *,
    arch: str = "LlamaForCausalLM",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int = 128,
    vocab: int = 256,
    tie_embeddings: bool = False,
    std: float = 0.1,
    max_positions: int = 4096,
) -> Path:
    """Write a seeded checkpoint of ``arch`` (``LlamaForCausalLM`` or ``Qwen2ForCausalLM``) into ``model_dir``
    (created if missing; its config.json and model.safetensors are replaced); returns the directory."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not one mpkv implements; supported: {sorted(ARCHITECTURES)}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    d = head_dim if head_dim is not None else hidden // heads
    if d < 2 or d % 2:
        raise ValueError(f"head_dim ({d}) must be even and at least 2 (rotary embeddings rotate pairs)")
    from safetensors.torch import save_file  # a dependency of the models only; the synthetic path never needs it

    model_type, qkv_bias = ARCHITECTURES[arch]
    g = torch.Generator().manual_seed(seed)

    def normal(*shape: int, scale: float = std) -> torch.Tensor:
        return torch.randn(shape, generator=g) * scale

    tensors = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": 1 + normal(hidden, scale=0.1)}
    for i in range(layers):
        at, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        tensors |= {
            f"model.layers.{i}.input_layernorm.weight": 1 + normal(hidden, scale=0.1),
            f"model.layers.{i}.post_attention_layernorm.weight": 1 + normal(hidden, scale=0.1),
            at + "q_proj.weight": normal(heads * d, hidden),
            at + "k_proj.weight": normal(kv_heads * d, hidden),
            at + "v_proj.weight": normal(kv_heads * d, hidden),
            at + "o_proj.weight": normal(hidden, heads * d),
            mlp + "gate_proj.weight": normal(intermediate, hidden),
            mlp + "up_proj.weight": normal(intermediate, hidden),
            mlp + "down_proj.weight": normal(hidden, intermediate),
        }
        if qkv_bias:
            for x, rows in (("q", heads * d), ("k", kv_heads * d), ("v", kv_heads * d)):
                tensors[at + f"{x}_proj.bias"] = normal(rows, scale=0.5)
    if not tie_embeddings:
        tensors["lm_head.weight"] = normal(vocab, hidden)

    config: dict[str, object] = {
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": d,
        "vocab_size": vocab,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": tie_embeddings,
        "dtype": "float32",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "initializer_range": std,
        "use_cache": True,
        # no special tokens: a reference's generate must neither stop early nor mask anything
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    if model_type == "qwen2":
        config |= {
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": layers,
            "layer_types": ["full_attention"] * layers,
        }
    out = Path(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # "format": "pt" is what loaders (transformers among them) expect of a PyTorch safetensors file
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(out / SINGLE_FILE), metadata={"format": "pt"})
    return out


@dataclass(frozen=True)
class Greedy:
    tokens: list[list[int]]  # per prompt, the generated token ids
    margins: list[list[float]]  # per prompt and generated token: its logit minus the runner-up's


def greedy(model_dir: str | Path, prompts: Sequence[Sequence[int]], new_tokens: int, block_size: int = 16) -> Greedy:
    """The ``new_tokens`` greedy tokens after each prompt, computed by ``LlamaModel`` at TP=1 in this process, one
    prompt at a time over a pool of its own."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    cfg = read_config(model_dir)
    model = LlamaModel(cfg, load_weights(model_dir, cfg))
    tokens, margins = [], []
    for prompt in prompts:
        need = -(-(len(prompt) + new_tokens - 1) // block_size)
        pool = torch.zeros(model.pool_shape(need, block_size), dtype=model.dtype)
        table = list(range(need))
        logits = model.prefill([list(prompt)], [table], pool)
        out: list[int] = []
        picks: list[float] = []
        while True:
            top = logits[0].topk(2).values
            out.append(int(logits[0].argmax()))
            picks.append(float(top[0] - top[1]))
            if len(out) == new_tokens:
                break
            logits = model.decode([out[-1]], [len(prompt) + len(out) - 1], [table], pool)
        tokens.append(out)
        margins.append(picks)
    return Greedy(tokens, margins)
