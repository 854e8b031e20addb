"""Tiny seeded Llama-family checkpoints written with ``transformers`` itself, and its greedy ``generate`` as the
reference: what the model tests (in-process and through running instances) compare against."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


def hf() -> Any:
    """transformers, the reference; the tests that need no reference run without it."""
    return pytest.importorskip("transformers")


SEED = int(os.environ.get("MPKV_TEST_SEED", "0"))
BLOCK = 4
LENGTHS = [1, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 2]  # one, around a block boundary, several blocks
NEW_TOKENS = 6
POOL_BLOCKS = 48
SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=256,
    initializer_range=0.1,  # wider than the default 0.02: logits far apart, so greedy picks are no near-ties
    bos_token_id=None,
    eos_token_id=None,  # generate must not stop early, nor mask anything
    pad_token_id=None,
)


def model_seed(name: str) -> int:
    seed = SEED * 1000 + sum(map(ord, name))
    print(f"[seed] {name}: MPKV_TEST_SEED={SEED} (model seed {seed})")
    return seed


def save_model(path: Path, arch: str, **overrides: Any) -> Path:
    torch.manual_seed(model_seed(f"{arch}{sorted(overrides.items())}"))
    if arch == "llama-variant":
        # attention_bias: q/k/v biases split by rank, o_proj's added once; head_dim explicit and not
        # hidden / heads (q_proj is wider than hidden); tied embeddings, as Llama 3.2 1B has
        variant = {"attention_bias": True, "head_dim": 32, "tie_word_embeddings": True}
        arch, overrides = "llama", {**variant, **overrides}
    if arch == "llama":
        cfg = hf().LlamaConfig(**{**SMALL, **overrides})
        model = hf().LlamaForCausalLM(cfg)
    else:
        cfg = hf().Qwen2Config(**{**SMALL, "tie_word_embeddings": True, **overrides})
        model = hf().Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises biases to zero: a wrong bias path would go unseen
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return path


def reference(
    model_dir: Path, prompts: list[list[int]], new: int, dtype: torch.dtype = torch.float32
) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy generate, one prompt at a time (no padding): tokens and per-step logits."""
    model = hf().AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tokens, logits = [], []
    for p in prompts:
        ids = torch.tensor([p])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
        )
        tokens.append(out.sequences[0, len(p) :].tolist())
        logits.append(torch.cat(out.logits))  # [new, vocab]
    return tokens, logits


def prompts_for(vocab: int) -> list[list[int]]:
    """One prompt per length of LENGTHS, seeded."""
    g = torch.Generator().manual_seed(SEED)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def perturbed_copy(src: Path, dst: Path, seed: int) -> Path:
    """A copy of the checkpoint in ``src`` with every tensor moved by seeded noise: the same model, new weights."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(path)
        save_file({k: t + 0.05 * torch.randn(t.shape, generator=g, dtype=t.dtype) for k, t in tensors.items()}, path)
    return dst


def rewrite_checkpoint(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Apply ``change`` to the tensors of the one .safetensors file in ``path`` (a directory) or ``path`` itself."""
    from safetensors.torch import load_file, save_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    tensors = load_file(files[0])
    change(tensors)
    save_file(tensors, files[0])
