"""A real model through running instances: the tokens of ``Client.generate`` equal ``transformers``' own greedy
``generate`` on the same checkpoint, at TP=1 and TP=2, for Llama and Qwen2, monolithic and prefill -> decode; a
request swapped out and back in to other blocks keeps decoding the same tokens; a clear/restore with the same
weights changes nothing, with new weights the tokens are those of the new weights; bad input is refused by name
and changes nothing. The checkpoints are tiny seeded models written by ``transformers`` (tests/hf_models.py)."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import BLOCK, NEW_TOKENS, SMALL, perturbed_copy, prompts_for, reference, rewrite_checkpoint, save_model

import mpkv
from mpkv import Client, Controller, DecodeItem
from mpkv.config import resolve_model
from mpkv.errors import BadTask, CommandRefused, ModelError, PeerDied, StaleWeights, StepFailed, TaskFailed
from mpkv.generation import Generation, blocks_for
from mpkv.model import expected_tokens
from mpkv.models import read_config
from mpkv.protocol import Done
from mpkv.publication import expected_tensors
from mpkv.verify import verify_kv

POOL = dict(block_size=BLOCK, device_blocks=32, host_blocks=16)
VOCAB = int(SMALL["vocab_size"])  # type: ignore[call-overload]
PROMPTS = prompts_for(VOCAB)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: save_model(root / arch, arch) for arch in ("llama", "qwen2")}


@pytest.fixture(scope="module")
def want(models: dict[str, Path]) -> dict[str, list[list[int]]]:
    """transformers' greedy tokens for PROMPTS, per architecture."""
    return {arch: reference(path, PROMPTS, NEW_TOKENS)[0] for arch, path in models.items()}


def _as_lists(out: list[np.ndarray]) -> list[list[int]]:
    assert all(o.dtype == np.int32 and o.shape == (NEW_TOKENS,) for o in out)
    return [o.tolist() for o in out]


@pytest.mark.parametrize(("arch", "tp"), [("qwen2", 1), ("llama", 2), ("qwen2", 2)])
def test_generate_equals_transformers(
    models: dict[str, Path], want: dict[str, list[list[int]]], instance: str, arch: str, tp: int
) -> None:
    with mpkv.launch(instance, tp=tp, model=str(models[arch]), **POOL) as inst, Client(instance) as client:
        assert (inst.config.layers, inst.config.kv_heads, inst.config.vocab) == (2, 2, VOCAB)  # from config.json
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == want[arch]
        # Sampled: a request's draws depend on its seed and positions only (not on the batch, nor on the rank:
        # tokens_of checks that the ranks agree).
        hot = client.generate(PROMPTS[:3], NEW_TOKENS, temperature=5.0, seed=11)
        alone = client.generate(PROMPTS[1:2], NEW_TOKENS, temperature=5.0, seed=12)  # prompt 1 drew with 11 + 1
        assert alone[0].tolist() == hot[1].tolist()
        assert client.blocks.free == POOL["device_blocks"]  # every block given back


def test_llama_generate_swap_restore_and_bad_input(
    models: dict[str, Path], want: dict[str, list[list[int]]], instance: str, tmp_path: Path
) -> None:
    """One TP=1 instance through a request's whole life: generate, swap out and in mid-decode, bad input,
    clear/restore with the same weights, then with new weights from another directory."""
    with (
        mpkv.launch(instance, tp=1, model=str(models["llama"]), **POOL) as inst,
        Client(instance) as client,
        Controller(instance) as ctl,
    ):
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == want["llama"]
        _swap_mid_decode(client, PROMPTS[-1], want["llama"][-1])
        record = ctl.inst.read_weights()
        with pytest.raises(CommandRefused, match="cannot restore a running instance"):  # before publishing
            ctl.restore(weight_version=2, weights_from=str(models["llama"]))
        assert ctl.inst.read_weights() == record
        with pytest.raises(CommandRefused, match=r"weight version 1 is not newer than the one served \(1\)"):
            ctl.update_weights(str(models["llama"]), 1)

        # Bad input: each refused by name before anything is submitted; every block stays free.
        pool_tokens = POOL["device_blocks"] * BLOCK
        with pytest.raises(BadTask, match=r"prompt 1: .* need \d+ blocks"):
            client.generate([[1], [1] * (pool_tokens + 1)], 1)  # a prompt longer than the pool
        with pytest.raises(BadTask, match=r"max_new_tokens=\d+ need"):
            client.generate([[1]], pool_tokens + 1)  # cannot fit
        with pytest.raises(BadTask, match=f"token id {VOCAB} out of range: valid ids are 0..{VOCAB - 1}"):
            client.generate([[1, VOCAB]], 2)
        with pytest.raises(BadTask, match="max_new_tokens must be an integer >= 1"):
            client.generate([[1]], 0)
        with pytest.raises(BadTask, match="timeout_s must be a positive, finite number"):
            client.generate([[1]], 2, timeout_s=0)
        assert client.blocks.free == POOL["device_blocks"]

        # A version nobody published is refused; the version served comes back with the same weights. The weights
        # tier: sleep frees the worker's weights (measured), wake_up loads them again.
        ctl.pause(), ctl.clear()
        with pytest.raises(CommandRefused, match="weight version 2 was never published; publish it first"):
            ctl.restore(weight_version=2)
        ctl.restore(), ctl.resume()
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == want["llama"]
        slept = ctl.sleep()
        weight_bytes = sum(math.prod(s) * 4 for s in expected_tensors(read_config(models["llama"])).values())
        assert slept.released_bytes["worker r0"] >= weight_bytes, (slept.released_bytes, weight_bytes)
        with pytest.raises(CommandRefused, match="cannot resume: the KV cache is cleared"):
            ctl.resume()  # the weights are gone too: nothing may serve
        ctl.wake_up()
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == want["llama"]

        # New weights from another directory: bad ones are refused before anything changes, good ones are used.
        new = perturbed_copy(models["llama"], tmp_path / "new", seed=7)
        new_want = reference(new, PROMPTS, NEW_TOKENS)[0]
        assert new_want != want["llama"]
        missing = perturbed_copy(models["llama"], tmp_path / "missing", seed=8)
        rewrite_checkpoint(missing, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
        misshapen = perturbed_copy(models["llama"], tmp_path / "misshapen", seed=9)
        rewrite_checkpoint(misshapen, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
        ctl.pause(), ctl.clear()
        with pytest.raises(ModelError, match="no tensor model.layers.1.self_attn.k_proj.weight"):
            ctl.restore(weight_version=3, weights_from=str(missing))
        with pytest.raises(ModelError, match=r"model.norm.weight has shape \[3\], expected \[64\]"):
            ctl.restore(weight_version=3, weights_from=str(misshapen))
        assert ctl.weight_version == 1 and ctl.status().cleared  # nothing changed: still cleared, version 1
        ctl.restore(weight_version=3, weights_from=str(new))
        ctl.resume()
        out = client.generate(PROMPTS, NEW_TOKENS)
        assert _as_lists(out) == new_want and out.weight_version == 3

        # A trainer that saves every update into one directory: what it holds at publication is what is loaded.
        perturbed_copy(models["llama"], tmp_path / "newer", seed=17)
        for f in (tmp_path / "newer").glob("*.safetensors"):
            f.replace(new / f.name)
        newer_want = reference(new, PROMPTS, NEW_TOKENS)[0]
        assert newer_want != new_want
        ctl.pause(), ctl.clear(), ctl.restore(weight_version=4, weights_from=str(new)), ctl.resume()
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == newer_want

        # A restore that timed out (the transfer manager stopped) after the worker loaded version 5: nothing may be
        # published while it is pending; after a clear, version 5 published again with other weights is what the
        # worker serves (it compares publications, not version numbers).
        transfer, first = inst.pids["transfer:r0"], str(models["llama"])
        ctl.pause(), ctl.clear()
        os.kill(transfer, signal.SIGSTOP)
        try:
            with pytest.raises(StepFailed, match="transfer r0"):
                ctl.restore(weight_version=5, weights_from=str(new), timeout_s=2)
            with pytest.raises(CommandRefused, match="RESTORE@.* is not acknowledged by every actor"):
                ctl.update_weights(first, 5)
            with pytest.raises(StepFailed, match="transfer r0"):  # issued: the stopped actor will see a CLEAR
                ctl.clear(timeout_s=2)
        finally:
            os.kill(transfer, signal.SIGCONT)
        ctl.clear()
        ctl.restore(weight_version=5, weights_from=first)
        assert ctl.restore(weight_version=5).already  # a repeat: done already, not refused
        ctl.resume()
        assert _as_lists(client.generate(PROMPTS, NEW_TOKENS)) == want["llama"]  # the first weights, again


def _swap_mid_decode(client: Client, prompt: list[int], want: list[int]) -> None:
    """Prefill and decode two tokens by hand, swap the request's KV out to host, back in to other device blocks,
    decode on from there: the same tokens as without the swap."""
    bs, new = BLOCK, NEW_TOKENS
    table = client.blocks.take(blocks_for(len(prompt) + new - 1, bs), "swap test")
    out = [
        int(
            client.tokens_of(client.wait(client.prefill("s", np.array(prompt), table[: blocks_for(len(prompt), bs)])))[
                0
            ]
        )
    ]

    def step() -> None:
        position = len(prompt) + len(out) - 1
        item = DecodeItem("s", out[-1], position, table[: position // bs + 1])
        out.append(int(client.tokens_of(client.wait(client.decode([item])))[0]))

    step(), step()
    used = blocks_for(len(prompt) + len(out) - 1, bs)  # blocks holding K/V now
    slots = client.wait(client.swap_out(table[:used]))[0].slots
    assert slots is not None
    old, table = table, client.blocks.take(len(table), "swap test (after)")
    assert not set(old.tolist()) & set(table.tolist())
    client.blocks.give_back(old)
    client.wait(client.swap_in(slots, table[:used]))
    while len(out) < new:
        step()
    client.blocks.give_back(table)
    assert out == want


def test_prefill_here_decode_there_equals_the_monolithic_tokens(
    models: dict[str, Path], want: dict[str, list[list[int]]], instance: str
) -> None:
    model = str(models["llama"])
    with (
        mpkv.launch(instance + "d", tp=1, role="decode", model=model, **POOL),
        mpkv.launch(instance + "p", tp=1, role="prefill", model=model, **POOL),
        Client(instance + "d") as dec,
        Client(instance + "p") as pre,
    ):
        assert _as_lists(dec.generate(PROMPTS, NEW_TOKENS, prefill_on=pre)) == want["llama"]
        assert dec.blocks.free == POOL["device_blocks"] and pre.blocks.free == POOL["device_blocks"]
        with pytest.raises(BadTask, match="runs on a decode instance and prefills on a prefill instance"):
            pre.generate(PROMPTS[:1], 2, prefill_on=dec)


def test_a_rank_that_dies_before_the_collective_is_named(models: dict[str, Path], instance: str) -> None:
    """Worker r1 crashes at its first task; worker r0 reaches the layer's all-reduce alone and waits for r1: the
    client's wait names r1, and nothing hangs."""
    env = {"MPKV_FAULT": "worker:1:task:crash", "MPKV_PEER_TIMEOUT_S": "30"}
    with mpkv.launch(instance, tp=2, model=str(models["qwen2"]), env=env, **POOL), Client(instance) as client:
        with pytest.raises((PeerDied, TaskFailed)) as e:
            client.generate(PROMPTS[:1], 2, timeout_s=30)
        assert "worker r1" in str(e.value)
    # ... and the launcher, which saw r1 die, stopped every actor, r0 too (waiting in the collective or failed by
    # it, naming rank 1): leaving the `with` returned, and the leak check finds no process left.


def test_a_checkpoint_that_does_not_fit_is_refused_before_launch(
    models: dict[str, Path], tmp_path: Path, instance: str
) -> None:
    broken = perturbed_copy(models["qwen2"], tmp_path / "broken", seed=1)
    rewrite_checkpoint(broken, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match="--model: .*no tensor model.layers.0.mlp.down_proj.weight"):
        resolve_model({"model": str(broken)}, lambda f: "--" + f.replace("_", "-"))
    with pytest.raises(ValueError, match="--layers .3. contradicts the model: .* num_hidden_layers = 2"):
        resolve_model({"model": str(models["qwen2"]), "layers": 3}, lambda f: "--" + f.replace("_", "-"))
    odd = perturbed_copy(models["qwen2"], tmp_path / "odd", seed=2)
    config = (odd / "config.json").read_text().replace("Qwen2ForCausalLM", "MistralForCausalLM")
    (odd / "config.json").write_text(config)
    with pytest.raises(ValueError, match="architectures names 'MistralForCausalLM'"):
        resolve_model({"model": str(odd)})
    # Through the command line: one line, exit 2, nothing started.
    with (
        pytest.raises(mpkv.LaunchError, match="no tensor model.layers.0.mlp.down_proj.weight"),
        mpkv.launch(instance, model=str(broken)),
    ):
        pass


def test_a_runner_named_module_class_decodes_byte_exactly(instance: str) -> None:
    """``model="module:Class"``: the worker builds that class. With the synthetic model's class, every token and
    every K/V byte written by prefill and by the decode steps is recomputed here."""
    with mpkv.launch(instance, tp=2, model="mpkv.model:SyntheticModel", **POOL) as inst, Client(instance) as client:
        cfg = inst.config
        prompts = [np.arange(1, 1 + n, dtype=np.int32) * 7 % cfg.vocab for n in (1, BLOCK, BLOCK + 2)]
        out = client.generate(prompts, NEW_TOKENS)
        for p, o in zip(prompts, out, strict=True):
            assert o.tolist() == expected_tokens(cfg, cfg.weight_version, p, NEW_TOKENS)
        # The K/V of the prompt and of every generated token but the last, through one request's table.
        p, o = prompts[-1], out[-1]
        table = client.blocks.take(blocks_for(len(p) + NEW_TOKENS - 1, BLOCK), "check")
        client.wait(client.prefill("check", p, table[: blocks_for(len(p), BLOCK)]))
        for i, token in enumerate(o[:-1]):
            position = len(p) + i
            client.wait(client.decode([DecodeItem("check", int(token), position, table[: position // BLOCK + 1])]))
        verify_kv(client, np.concatenate([p, o[:-1]]).astype(np.int32), table, cfg.weight_version, prefilled=len(p))
        client.blocks.give_back(table)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ("mpkv.nowhere:Runner", "cannot import Runner from mpkv.nowhere"),
        ("mpkv.model:expected_kv", "is not a class with load, holds, release, prefill and decode"),
    ],
)
def test_a_runner_that_cannot_be_built_is_refused_before_launch(model: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"--model: .*{match}"):
        resolve_model({"model": model}, lambda f: "--" + f)


def test_completions_of_two_pools_or_versions_are_refused() -> None:
    """generate's I7 check on what each completion says it read: one weight version, one pool per instance."""

    class Named:
        name = "inst"

        @staticmethod
        def tokens_of(dones: list[Done]) -> np.ndarray:
            return np.zeros(1, np.int32)

    def done(version: int, epoch: int, rank: int = 0) -> Done:
        return Done(1, rank, weight_version=version, tokens=np.zeros(1, np.int32), pool_epoch=epoch)

    gen = Generation(Named(), [], 2, None)  # type: ignore[arg-type]
    gen._tokens(Named(), [done(1, 3), done(1, 4, rank=1)])  # type: ignore[arg-type]  # ranks of a retried restore
    with pytest.raises(StaleWeights, match=r"the pool of inst rank 0 was cleared and restored in the middle"):
        gen._tokens(Named(), [done(1, 5), done(1, 4, rank=1)])  # type: ignore[arg-type]
    gen = Generation(Named(), [], 2, None)  # type: ignore[arg-type]
    gen._tokens(Named(), [done(1, 3)])  # type: ignore[arg-type]
    with pytest.raises(StaleWeights, match=r"weight versions \[1, 2\]"):
        gen._tokens(Named(), [done(2, 3)])  # type: ignore[arg-type]
