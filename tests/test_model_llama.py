"""mpkv.models against transformers: the tokens generated through mpkv's paged KV pool equal transformers' own
greedy ``generate`` for a small seeded Llama and Qwen2, at TP=1 and at TP=2 simulated in one process (both ranks
in threads, their partial sums added by an in-process all-reduce). Plus: config.json as transformers 4.x and 5.x
write it, sharded checkpoints, sampling, and every bad input named.

The models are random (seeded: MPKV_TEST_SEED, default 0, printed), float32, and tiny: hidden 64, 2 layers,
4 heads, 2 KV heads, vocab 128. Block size 4, so short prompts already cross block boundaries.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from hf_models import (
    BLOCK,
    NEW_TOKENS,
    POOL_BLOCKS,
    SEED,
    SMALL,
    hf,
    prompts_for,
    reference,
    rewrite_checkpoint,
    save_model,
)

from mpkv.config import CacheConfig
from mpkv.errors import BadBlocks, BadTask, ModelError
from mpkv.models import (
    Chunk,
    LlamaModel,
    ModelConfig,
    load_weights,
    next_tokens,
    parse_config,
    read_config,
)
from mpkv.protocol import Sampling


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_model(root / arch, arch) for arch in ("llama", "qwen2", "llama-variant")}


# --- paged generation, one rank or several in threads ---------------------------------------------------


class InProcessAllReduce:
    """The ranks' threads each hand in a partial sum and get back the total, added in rank order (so every rank
    holds the same bits, as a real all-reduce guarantees)."""

    def __init__(self, tp: int) -> None:
        self.parts: list[torch.Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=60)

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def all_reduce(x: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = x
            self.barrier.wait()
            total = self.parts[0]
            assert total is not None
            for part in self.parts[1:]:
                assert part is not None
                total = total + part
            self.barrier.wait()  # nobody hands in the next partial sum before everyone has read this one
            return total

        return all_reduce


def block_tables(lengths: list[int], new: int) -> list[list[int]]:
    """Disjoint tables from a shuffled pool, so a request's blocks are neither contiguous nor in order."""
    order = torch.randperm(POOL_BLOCKS, generator=torch.Generator().manual_seed(SEED)).tolist()
    tables = []
    for n in lengths:
        need = -(-(n + new) // BLOCK)
        tables.append(order[:need])
        order = order[need:]
    return tables


def garbage_pool(cfg: ModelConfig, tp: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A pool as mpkv allocates it (CacheConfig.pool_shape), full of large finite garbage: a slot the model
    reads without having written it shows in the logits."""
    cache = CacheConfig(
        layers=cfg.layers,
        kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        block_size=BLOCK,
        dtype="float32",
        device_blocks=POOL_BLOCKS,
        tp=tp,
    )
    garbage = torch.randn(cache.pool_shape(POOL_BLOCKS), generator=torch.Generator().manual_seed(SEED)) * 100
    return garbage.to(dtype)


def generate_rank(
    model: LlamaModel,
    pool: torch.Tensor,
    prompts: list[list[int]],
    tables: list[list[int]],
    new: int,
    params: list[Sampling] | None = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill every prompt in one batch, then decode them together; tokens and logits [new, batch, vocab]."""
    params = params or [Sampling()] * len(prompts)
    layers_done: list[int] = []
    logits = [model.prefill(prompts, tables, pool, on_layer_done=layers_done.append)]
    assert layers_done == list(range(model.cfg.layers))
    lengths = [len(p) for p in prompts]
    toks = torch.tensor(next_tokens(logits[-1], params, lengths))
    out = [toks]
    for _ in range(new - 1):
        logits.append(model.decode(toks, lengths, tables, pool))
        lengths = [n + 1 for n in lengths]
        toks = torch.tensor(next_tokens(logits[-1], params, lengths))
        out.append(toks)
    return torch.stack(out, 1).tolist(), torch.stack(logits)


def generate_paged(
    model_dir: Path,
    prompts: list[list[int]],
    new: int,
    tp: int,
    params: list[Sampling] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[list[list[int]], torch.Tensor]:
    """Every rank generates (in its own thread when tp > 1); all ranks must agree on tokens and logits."""
    cfg = read_config(model_dir)
    tables = block_tables([len(p) for p in prompts], new)
    reduce = InProcessAllReduce(tp)

    def rank(r: int) -> tuple[list[list[int]], torch.Tensor]:
        weights = load_weights(model_dir, cfg, rank=r, tp=tp, dtype=dtype)
        model = LlamaModel(cfg, weights, rank=r, tp=tp, all_reduce=reduce.for_rank(r) if tp > 1 else None)
        return generate_rank(model, garbage_pool(cfg, tp, dtype), prompts, tables, new, params)

    with ThreadPoolExecutor(tp) as pool:
        results = list(pool.map(rank, range(tp)))
    for tokens, logits in results[1:]:
        assert tokens == results[0][0] and torch.equal(logits, results[0][1])
    return results[0]


# --- the proofs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama-variant"])
def test_greedy_tokens_equal_transformers_generate(models: dict[str, Path], arch: str, tp: int) -> None:
    prompts = prompts_for(SMALL["vocab_size"])  # type: ignore[arg-type]
    want_tokens, want_logits = reference(models[arch], prompts, NEW_TOKENS)
    tokens, logits = generate_paged(models[arch], prompts, NEW_TOKENS, tp)
    for i, p in enumerate(prompts):
        assert tokens[i] == want_tokens[i], f"prompt of {len(p)} tokens"
        torch.testing.assert_close(logits[:, i], want_logits[i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "rope_theta": 100.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 100.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,  # with theta 100: some bands kept, some scaled, some blended
        },
    ],
    ids=["linear", "llama3"],
)
def test_scaled_rope_equals_transformers(tmp_path: Path, rope: dict[str, Any]) -> None:
    model_dir = save_model(tmp_path / "m", "llama", rope_parameters=rope)
    assert read_config(model_dir).rope.kind == rope["rope_type"]
    prompts = prompts_for(SMALL["vocab_size"])[-2:]  # type: ignore[arg-type]
    want_tokens, want_logits = reference(model_dir, prompts, 4)
    tokens, logits = generate_paged(model_dir, prompts, 4, tp=1)
    assert tokens == want_tokens
    for i in range(len(prompts)):
        torch.testing.assert_close(logits[:, i], want_logits[i], rtol=1e-4, atol=1e-4)


def test_a_prompt_prefilled_in_chunks_and_a_half_precision_pool(models: dict[str, Path]) -> None:
    """Chunks with start > 0 (a prompt continued, or prefilled in pieces) see the earlier tokens through the pool;
    a float16 pool (what mpkv allocates by default) stores K/V rounded, so logits agree only roughly."""
    cfg = read_config(models["llama"])
    model = LlamaModel(cfg, load_weights(models["llama"], cfg))
    prompt = prompts_for(cfg.vocab)[-1]
    table = block_tables([len(prompt)], 0)[0]
    whole = model.prefill([prompt], [table], garbage_pool(cfg, 1))
    pool = garbage_pool(cfg, 1)
    model.forward([Chunk(prompt[:5], table)], pool)
    pieces = model.forward([Chunk(prompt[5:], table, start=5)], pool)
    torch.testing.assert_close(pieces, whole, rtol=1e-5, atol=1e-5)
    half = model.prefill([prompt], [table], garbage_pool(cfg, 1).half())
    torch.testing.assert_close(half, whole, rtol=0, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_fast_path_computes_what_the_general_path_computes(models: dict[str, Path], dtype: torch.dtype) -> None:
    """decode has its own path (one gather of every layer's K/V per step, GQA as query rows, no mask when the
    requests are of one length); it must give the logits and write the pool slots that forward over one-token
    chunks does, over a float32 or float16 pool. A pool it cannot view flat (not contiguous) goes the general
    way."""
    cfg = read_config(models["llama"])
    model = LlamaModel(cfg, load_weights(models["llama"], cfg))
    prompts = prompts_for(cfg.vocab)
    for batch in (prompts, [p[:BLOCK] for p in prompts[2:]]):  # lengths all different, then all alike
        lengths = [len(p) for p in batch]
        tables = block_tables(lengths, 1)
        pool = garbage_pool(cfg, 1).to(dtype)
        model.prefill(batch, tables, pool)
        toks = [p[0] for p in batch]
        assert model._plan_decode(toks, lengths, tables, pool) is not None  # the fast path is the one tested
        fast_pool, general_pool = pool.clone(), pool.clone()
        fast = model.decode(toks, lengths, tables, fast_pool)
        general = model.forward([Chunk([t], b, n) for t, b, n in zip(toks, tables, lengths, strict=True)], general_pool)
        torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast_pool, general_pool, rtol=1e-5, atol=1e-5)
        strided = pool.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, not contiguous
        assert model._plan_decode(toks, lengths, tables, strided) is None
        torch.testing.assert_close(model.decode(toks, lengths, tables, strided), general, rtol=1e-5, atol=1e-5)


def test_weights_that_require_grad_record_no_graph(models: dict[str, Path]) -> None:
    """A trainer's weights require grad; generating with them must not build (and keep) an autograd graph."""
    cfg = read_config(models["llama"])
    weights = load_weights(models["llama"], cfg)
    for layer in weights.layers:
        layer.qkv.requires_grad_()
        layer.gate_up.requires_grad_()
    weights.embed.requires_grad_()
    model = LlamaModel(cfg, weights)
    pool = garbage_pool(cfg, 1)
    first = model.prefill([[1, 2, 3]], [[0]], pool)
    step = model.decode([4], [3], [[0]], pool)
    assert not first.requires_grad and not step.requires_grad and not pool.requires_grad


def test_sharded_checkpoint_loads_the_same_shards(models: dict[str, Path], tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    hf().AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    cfg = read_config(models["llama"])
    for rank in range(2):
        one, many = (load_weights(d, cfg, rank=rank, tp=2) for d in (models["llama"], sharded))
        assert torch.equal(one.embed, many.embed) and torch.equal(one.lm_head, many.lm_head)
        for a, b in zip(one.layers, many.layers, strict=True):
            for field in ("qkv", "o", "gate_up", "down", "input_norm", "post_norm"):
                assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_tp_shards_are_the_heads_of_each_rank(models: dict[str, Path]) -> None:
    cfg = read_config(models["qwen2"])
    full = load_weights(models["qwen2"], cfg, tp=1).layers[0]
    r0, r1 = (load_weights(models["qwen2"], cfg, rank=r, tp=2).layers[0] for r in range(2))
    q, kv = cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    full_q, full_k, full_v = full.qkv.split([q, kv, kv])
    for r, shard in enumerate((r0, r1)):
        sq, sk, sv = shard.qkv.split([q // 2, kv // 2, kv // 2])
        assert torch.equal(sq, full_q.chunk(2)[r]) and torch.equal(sk, full_k.chunk(2)[r])
        assert torch.equal(sv, full_v.chunk(2)[r])
        assert torch.equal(shard.o, full.o.chunk(2, dim=1)[r]) and torch.equal(shard.down, full.down.chunk(2, dim=1)[r])
        assert shard.qkv_bias is not None and full.qkv_bias is not None
    tied = load_weights(models["qwen2"], cfg)
    assert cfg.tie_embeddings and tied.lm_head is tied.embed


def test_sampling_is_seeded_per_request(models: dict[str, Path]) -> None:
    prompts = prompts_for(SMALL["vocab_size"])[:3]  # type: ignore[arg-type]
    greedy, _ = generate_paged(models["llama"], prompts, NEW_TOKENS, tp=1)
    nucleus_of_one = [Sampling(temperature=1.0, top_p=1e-6, seed=i) for i in range(3)]
    assert generate_paged(models["llama"], prompts, NEW_TOKENS, 1, nucleus_of_one)[0] == greedy

    hot = [Sampling(temperature=5.0, seed=s) for s in (1, 2, 3)]
    first, _ = generate_paged(models["llama"], prompts, NEW_TOKENS, 1, hot)
    assert generate_paged(models["llama"], prompts, NEW_TOKENS, 2, hot)[0] == first  # TP=2 ranks agree too
    # A request's tokens depend on its own seed only, not on the batch around it.
    alone, _ = generate_paged(models["llama"], prompts[1:2], NEW_TOKENS, 1, hot[1:2])
    assert alone[0] == first[1]
    reseeded, _ = generate_paged(models["llama"], prompts, NEW_TOKENS, 1, [Sampling(5.0, seed=9)] * 3)
    assert reseeded != first


def test_top_p_keeps_the_nucleus_only() -> None:
    from mpkv.models.sampling import _top_p

    probs = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert _top_p(probs, 0.7).tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])
    assert _top_p(probs, 0.5).tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])
    assert _top_p(probs, 1.0).tolist() == pytest.approx(probs.tolist())


# --- config.json -----------------------------------------------------------------------------------------


def _as_4x(config: dict[str, Any]) -> dict[str, Any]:
    """The same model's config as transformers 4.x writes it."""
    old = {k: v for k, v in config.items() if k not in ("dtype", "rope_parameters", "layer_types")}
    old["torch_dtype"] = config["dtype"]
    rope = dict(config["rope_parameters"])
    old["rope_theta"] = rope.pop("rope_theta")
    old["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    old["transformers_version"] = "4.46.0"
    return old


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_config_4x_and_5x_read_alike(models: dict[str, Path], arch: str) -> None:
    new = json.loads((models[arch] / "config.json").read_text())
    assert "dtype" in new and "rope_parameters" in new  # what transformers 5.x writes
    cfg = parse_config(new)
    assert parse_config(_as_4x(new)) == cfg
    assert (cfg.hidden, cfg.layers, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.vocab) == (64, 2, 4, 2, 16, 128)
    assert cfg.dtype == "float32" and cfg.rope.theta == 10000.0 and cfg.rope.kind == "default"
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.tie_embeddings == (arch == "qwen2") and not cfg.o_bias


def test_config_4x_rope_scaling_and_explicit_head_dim() -> None:
    base = {**SMALL, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 32}
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = {**base, "torch_dtype": "bfloat16", "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **llama3}}
    new = {**base, "dtype": "bfloat16", "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **llama3}}
    cfg = parse_config(old)
    assert parse_config(new) == cfg
    assert cfg.head_dim == 32 and cfg.dtype == "bfloat16"
    assert (cfg.rope.kind, cfg.rope.theta, cfg.rope.factor, cfg.rope.original_max_positions) == (
        "llama3",
        500000.0,
        8.0,
        64,
    )


LLAMA = {**SMALL, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32"}
QWEN2 = {**SMALL, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "dtype": "float32"}


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({**LLAMA, "architectures": ["MistralForCausalLM"]}, "architectures"),
        ({**LLAMA, "model_type": "mistral"}, "model_type"),
        ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type"),
        ({**LLAMA, "rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_type"),
        ({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "low_freq_factor"),
        ({**LLAMA, "rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
        ({**QWEN2, "use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window"),
        ({**QWEN2, "layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
        ({**LLAMA, "mlp_bias": True}, "mlp_bias"),
        ({**LLAMA, "quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ({**LLAMA, "dtype": "float8_e4m3fn"}, "dtype"),
        ({**LLAMA, "torch_dtype": "int8", "dtype": None}, "torch_dtype"),
        ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "hidden_size"),
        ({**LLAMA, "num_key_value_heads": 3}, "num_key_value_heads"),
        ({**LLAMA, "rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        ({**LLAMA, "tie_word_embeddings": 1}, "tie_word_embeddings"),
    ],
)
def test_config_refuses_what_it_does_not_implement_naming_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ModelError, match=key):
        parse_config(config)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not a readable JSON"):
        read_config(tmp_path)
    with pytest.raises(ModelError, match="tp 3|tensor-parallel size 3"):
        parse_config(LLAMA).check_tp(3)


# --- bad checkpoints ---------------------------------------------------------------------------------------


@pytest.fixture
def llama_copy(models: dict[str, Path], tmp_path: Path) -> Iterator[tuple[Path, ModelConfig]]:
    d = tmp_path / "copy"
    shutil.copytree(models["llama"], d)
    yield d, read_config(d)


def test_missing_tensor_is_named(llama_copy: tuple[Path, ModelConfig]) -> None:
    d, cfg = llama_copy
    rewrite_checkpoint(d / "model.safetensors", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    missing = r"no tensor model\.layers\.1\.mlp\.up_proj\.weight \(expected shape \[128, 64\]\)"
    with pytest.raises(ModelError, match=missing):
        load_weights(d, cfg)


def test_tensor_of_the_wrong_shape_is_named_with_both_shapes(llama_copy: tuple[Path, ModelConfig]) -> None:
    d, cfg = llama_copy
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_checkpoint(d / "model.safetensors", lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(ModelError, match=rf"{name} has shape \[16, 64\], expected \[32, 64\]"):
        load_weights(d, cfg)


def test_checkpoint_file_errors(llama_copy: tuple[Path, ModelConfig]) -> None:
    d, cfg = llama_copy
    shutil.copy(d / "model.safetensors", d / "extra.safetensors")
    with pytest.raises(ModelError, match="2 .safetensors files .* but no model.safetensors.index.json"):
        load_weights(d, cfg)
    (d / "extra.safetensors").unlink()
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_weights(d, cfg)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no \*.safetensors file"):
        load_weights(d, cfg)


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ("{oops", "not a readable JSON"),
        (json.dumps({"metadata": {}}), "no 'weight_map'"),
        (json.dumps({"weight_map": ["model.safetensors"]}), "no 'weight_map'"),
        (json.dumps({"weight_map": {"lm_head.weight": "../model.safetensors"}}), "not a shard file name"),
        (json.dumps({"weight_map": {"lm_head.weight": "model-9.safetensors"}}), "model-9.safetensors, which does not"),
        (json.dumps({"weight_map": {"lm_head.weight": "model.safetensors", "x": 3}}), "'x' maps to 3"),
    ],
)
def test_malformed_index_is_refused(llama_copy: tuple[Path, ModelConfig], index: str, match: str) -> None:
    d, cfg = llama_copy
    (d / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelError, match=match):
        load_weights(d, cfg)


def test_index_naming_a_tensor_its_shard_lacks(llama_copy: tuple[Path, ModelConfig]) -> None:
    d, cfg = llama_copy
    from safetensors import safe_open

    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    shutil.copy(d / "model.safetensors", d / "other.safetensors")
    rewrite_checkpoint(d / "other.safetensors", lambda t: t.pop("model.norm.weight"))
    weight_map["model.norm.weight"] = "other.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match=r"malformed index: model\.norm\.weight is not in other\.safetensors"):
        load_weights(d, cfg)


# --- bad forward input: refused before the pool is touched --------------------------------------------------


def test_bad_forward_input_is_refused_and_the_pool_untouched(models: dict[str, Path]) -> None:
    cfg = read_config(models["llama"])
    model = LlamaModel(cfg, load_weights(models["llama"], cfg))
    pool = garbage_pool(cfg, 1)
    before = pool.clone()
    cases: list[tuple[type[Exception], str, Callable[[], object]]] = [
        (BadTask, "token id 128 out of range", lambda: model.prefill([[1, 128]], [[0]], pool)),
        (BadTask, "token id -1 out of range", lambda: model.decode([-1], [3], [[0]], pool)),
        (BadBlocks, "need 2 blocks of 4, the block table has 1", lambda: model.prefill([[1] * 5], [[3]], pool)),
        (BadBlocks, "block ids out of range", lambda: model.prefill([[1]], [[POOL_BLOCKS]], pool)),
        (BadBlocks, "overlap", lambda: model.prefill([[1, 2], [3]], [[7], [7]], pool)),
        (BadTask, "no tokens", lambda: model.prefill([[]], [[0]], pool)),
        (BadTask, "at least one request", lambda: model.prefill([], [], pool)),
        (BadTask, "does not fit the model", lambda: model.prefill([[1]], [[0]], garbage_pool(cfg, 2))),
        # decode's own path hands whatever it does not take to the general one, which names it
        (BadTask, "token id 128 out of range", lambda: model.decode([128], [0], [[0]], pool)),
        (BadTask, "start -1 is negative", lambda: model.decode([1], [-1], [[0]], pool)),
        (BadBlocks, "need 2 blocks of 4, the block table has 1", lambda: model.decode([1], [4], [[3]], pool)),
        (BadBlocks, "block ids out of range", lambda: model.decode([1], [0], [[POOL_BLOCKS]], pool)),
        (BadBlocks, "overlap", lambda: model.decode([1, 2], [1, 1], [[7], [7]], pool)),
        (BadTask, "does not fit the model", lambda: model.decode([1], [0], [[0]], pool[0])),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()
    assert torch.equal(pool, before)
    with pytest.raises(ValueError, match="needs an all_reduce"):
        LlamaModel(cfg, load_weights(models["llama"], cfg, rank=0, tp=2), tp=2)


def test_nothing_under_mpkv_imports_transformers() -> None:
    """transformers is a test and benchmark dependency only: no module imports it when imported, and only the
    programs that check mpkv against it (the demo, the benchmarks) import it, inside a function, when run."""
    import ast

    root = Path(__file__).resolve().parent.parent / "mpkv"
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n.split(".")[0] == "transformers" for n in names):
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                assert id(node) not in top, f"{where} imports transformers at module level"
                checker = path.name == "demo.py" or path.parent.name == "bench"
                assert checker, f"{where} imports transformers outside the demo and the benchmarks"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", ["qwen2", "llama-variant"])
def test_half_precision_tokens_equal_transformers_generate(
    models: dict[str, Path], arch: str, dtype: torch.dtype
) -> None:
    """Real checkpoints are bf16 or fp16: weights, pool and activations in that dtype (rope's angles computed in
    float32, applied in it, as the reference does), against transformers run in the same dtype."""
    prompts = prompts_for(SMALL["vocab_size"])  # type: ignore[arg-type]
    want_tokens, want_logits = reference(models[arch], prompts, NEW_TOKENS, dtype)
    tokens, logits = generate_paged(models[arch], prompts, NEW_TOKENS, 1, dtype=dtype)
    for i, p in enumerate(prompts):
        assert tokens[i] == want_tokens[i], f"prompt of {len(p)} tokens"
        torch.testing.assert_close(logits[:, i].float(), want_logits[i].float(), rtol=2e-2, atol=2e-2)


def test_a_checkpoint_another_user_could_write_is_refused(llama_copy: tuple[Path, ModelConfig]) -> None:
    """I8: weights that anyone could swap under the instance are not loaded (the directory, config.json, a
    shard), each named with what to do."""
    d, cfg = llama_copy
    for path in (d, d / "config.json", d / "model.safetensors"):
        mode = path.stat().st_mode
        path.chmod(mode | 0o002)
        try:
            with pytest.raises(ModelError, match=f"{path} is writable by every user .*chmod o-w"):
                read_config(d)
                load_weights(d, cfg)
        finally:
            path.chmod(mode)
    load_weights(d, cfg)  # as it was: loads


def test_extreme_sampling_values_stay_finite() -> None:
    """A temperature or top_p below float32's range must not turn the distribution into NaN (multinomial would
    raise, and the worker with it): it behaves as greedy."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(SEED))
    want = logits.argmax(-1).tolist()
    for s in (Sampling(1e-300, 1.0, 1), Sampling(1e-40, 1.0, 2), Sampling(1.0, 1e-300, 3)):
        assert next_tokens(logits, [s] * 3, [0, 1, 2]) == want
