"""The demo's model part, in-process (no instances): the checkpoints ``mpkv.models.tiny.write_checkpoint`` writes
without transformers load with ``mpkv.models`` and, when transformers is importable, mean the same network to it
(its greedy ``generate`` gives the tokens of ``mpkv.models.tiny.greedy``); the demo's sizes fit every TP it may
run at; the demo's token check fails on a difference and names it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hf_models import reference

from mpkv import demo
from mpkv.models import load_weights, read_config
from mpkv.models.tiny import Greedy, greedy, write_checkpoint

SIZES = dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, vocab=96)
PROMPTS = [[5], [1, 2, 3], [7, 8, 9, 10, 11], list(range(20, 33))]  # around and across blocks of 4
NEW = 6


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread, as the workers and the demo run (on a busy machine more threads only contend)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("arch", "tie"), [("LlamaForCausalLM", False), ("Qwen2ForCausalLM", True), ("Qwen2ForCausalLM", False)]
)
def test_checkpoint_loads_with_mpkv_models(tmp_path: Path, arch: str, tie: bool) -> None:
    path = write_checkpoint(tmp_path / "m", 3, arch=arch, tie_embeddings=tie, **SIZES)
    cfg = read_config(path)
    assert (cfg.architecture, cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab) == (
        arch,
        32,
        2,
        4,
        2,
        8,
        96,
    )
    assert (cfg.intermediate, cfg.tie_embeddings, cfg.dtype) == (64, tie, "float32")
    assert cfg.qkv_bias == (arch == "Qwen2ForCausalLM") and not cfg.o_bias
    whole = load_weights(path, cfg)
    halves = [load_weights(path, cfg, rank=r, tp=2) for r in range(2)]
    layer = whole.layers[1]
    # weights drawn at the std asked for, norms around 1, Qwen2's biases present and not zero
    assert 0.08 < float(layer.qkv.std()) < 0.12 and abs(float(whole.norm.mean()) - 1) < 0.1
    if cfg.qkv_bias:
        assert layer.qkv_bias is not None and float(layer.qkv_bias.abs().mean()) > 0.1
    assert (whole.lm_head is whole.embed) == tie
    # the TP=2 shards are the halves of the whole (by output rows for qkv, input columns for o_proj)
    assert torch.equal(torch.cat([h.layers[1].o for h in halves], dim=1), layer.o)
    assert greedy(path, PROMPTS, NEW, block_size=4).tokens == greedy(path, PROMPTS, NEW, block_size=16).tokens


def test_checkpoint_is_seeded(tmp_path: Path) -> None:
    a, b = write_checkpoint(tmp_path / "a", 5, **SIZES), write_checkpoint(tmp_path / "b", 5, **SIZES)
    c = write_checkpoint(tmp_path / "c", 6, **SIZES)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "config.json").read_text() == (c / "config.json").read_text()
    assert greedy(a, PROMPTS, NEW).tokens != greedy(c, PROMPTS, NEW).tokens


@pytest.mark.parametrize(("arch", "tie"), [("LlamaForCausalLM", False), ("Qwen2ForCausalLM", False)])
def test_transformers_generates_the_tokens_of_mpkv_models(tmp_path: Path, arch: str, tie: bool) -> None:
    path = write_checkpoint(tmp_path / "m", 4, arch=arch, tie_embeddings=tie, **SIZES)
    want = greedy(path, PROMPTS, NEW, block_size=4)
    assert reference(path, PROMPTS, NEW)[0] == want.tokens  # skips when transformers is not importable
    assert min(min(m) for m in want.margins) > 1e-4  # no near-tie: the comparison above means something


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_demo_model_fits_its_tp(tmp_path: Path, tp: int) -> None:
    plan = demo.ModelPlan.write(tmp_path, seed=1, tp=tp, quick=True)
    for path in (plan.dir, plan.new_dir):
        read_config(path).check_tp(tp)
    assert read_config(plan.dir) == read_config(plan.new_dir)  # same network, other weights: a weights_from update
    assert max(len(p) for p in plan.prompts) > 3 * plan.block_size  # the prompts cross blocks


def test_demo_check_fails_on_a_difference_and_names_it() -> None:
    want = Greedy(tokens=[[1, 2, 3], [4, 5, 6]], margins=[[0.5, 0.5, 0.5], [0.5, 0.00001, 0.5]])
    t = demo.Tally()
    assert demo._check("same", [[1, 2, 3], [4, 5, 6]], want, [[1, 2, 3], [4, 5, 6]], t) and not t.errors
    assert not demo._check("one off", [[1, 2, 3], [4, 9, 6]], want, [[1, 2, 3], [4, 5, 6]], t)
    assert t.errors == [
        "model one off: prompt 1: the instances generated [4, 9, 6], mpkv.models at TP=1 and transformers "
        "[4, 5, 6]: they differ first at token 1, where the reference's pick led its runner-up by 1e-05 logits "
        "(a near-tie: TP sums in another order can flip it)"
    ]
    t.errors.clear()
    assert not demo._check("hf", [[1, 2, 3], [4, 5, 6]], want, [[1, 2, 7], [4, 5, 6]], t)
    assert t.errors == [
        "model hf: prompt 0: the instances generated [1, 2, 3], transformers [1, 2, 7]: they differ first at token "
        "2, where the reference's pick led its runner-up by 0.5 logits"
    ]
    t.errors.clear()
    assert not demo._check("no hf", [[1, 2]], Greedy([[1, 2, 3]], [[0.5, 0.5, 0.5]]), None, t)  # one token short
    assert len(t.errors) == 1 and "first at token 2" in t.errors[0] and "mpkv.models at TP=1 [1, 2, 3]" in t.errors[0]
