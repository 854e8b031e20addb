"""`mpkv demo`: the main job on the embedded default (cpu backend).

Launches a prefill instance and a decode instance, TP=2 each (mpkv.launch: `mpkv launch` in child processes),
then runs cycles of:
  - on the prefill instance: prefills of random lengths, a read-back of every request's KV from every rank
    compared byte for byte with the synthetic model's recomputation in this process, swaps out and back in to
    other device blocks (verified again);
  - prefill -> decode: a stream of requests of varied prompt lengths, leased on the decode side, batched by
    this engine, prefilled and shipped layer by layer; every byte verified on the decode side;
  - an RL transaction on both instances with a new weight version: pause, clear device and host, restore,
    resume. After each restore the host entries of the old version must be refused (stale KV is never served)
    and new KV must match the new weights.

And the real architecture: a seeded Llama checkpoint written at start to a temporary directory (mpkv.models.tiny,
no transformers), served by a prefill and a decode instance of its own (``model=DIR``, the same TP): prompts are
prefilled on the one, shipped and decoded on the other (``Client.generate(prefill_on=)``), and every generated
token must equal the single-process reference (``LlamaModel`` at TP=1 in this process, greedy) and, when
``transformers`` is importable, its greedy ``generate``. Then RL cycles on those two instances: sleep (the KV tiers and
the workers' weights freed) and wake_up (identical tokens); one ``weight_update`` pushing new weights (a second
checkpoint, another seed) must give the new reference's tokens, and one back to the first weights the first's.
Ends with a summary; exits non-zero on any error.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mpkv.client import Client, TaskFailed
from mpkv.controller import Controller
from mpkv.launched import LaunchedInstance, launch_args
from mpkv.launcher import ready_line
from mpkv.models.tiny import Greedy, greedy, write_checkpoint
from mpkv.verify import verify_kv


@dataclass
class Tally:
    prefills: int = 0
    transfers: int = 0
    transfer_batches: int = 0
    transferred_bytes: int = 0
    transfer_ms: list[float] = field(default_factory=list)
    kv_bytes_written: int = 0
    swapped_bytes: int = 0
    verified_bytes: int = 0
    stale_refusals: int = 0
    clear_ms: list[float] = field(default_factory=list)
    restore_ms: list[float] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    model_generates: int = 0
    model_tokens: int = 0  # generated tokens compared with the reference(s)
    model_cycles: int = 0
    model_references: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def checked_bytes(client: Client, tokens: np.ndarray, ids: np.ndarray, wv: int, what: str, host: bool = False) -> int:
    """Check ``ids`` against the recomputation on every rank (mpkv.verify); the bytes of KV compared."""
    cfg = client.cfg
    ranks = verify_kv(client, tokens, ids, wv, host=host, what=what)
    return ranks * cfg.layers * 2 * len(tokens) * cfg.heads_per_rank * cfg.head_dim * cfg.itemsize


def ship(client: Client, decode: Client, rng: random.Random, n: int, wv: int, t: Tally) -> None:
    """Prefill -> decode: ``n`` requests of varied lengths, in batches of 1-4 fixed here, each batch sent only
    once its destination blocks are leased; every byte checked on the decode side, then the blocks given back."""
    cfg = client.cfg
    free = list(range(cfg.device_blocks))
    rng.shuffle(free)
    sent = 0
    while sent < n:
        batch = []
        for j in range(min(rng.randint(1, 4), n - sent)):
            n_tokens = rng.randint(1, 16 * cfg.block_size)
            tokens = np.array([rng.randrange(cfg.vocab) for _ in range(n_tokens)], dtype=np.int32)
            lease = decode.allocate(f"pd{t.transfers + j}", n_tokens)
            src = np.array([free.pop() for _ in lease.blocks], dtype=np.int32)
            batch.append((lease.request, tokens, src, lease))
        t0 = time.perf_counter()
        client.wait_send(client.send(decode, batch))
        t.transfer_ms.append((time.perf_counter() - t0) * 1e3)
        t.transfer_batches += 1
        for request, tokens, src, lease in batch:
            t.verified_bytes += checked_bytes(decode, tokens, lease.blocks, wv, f"decode copy of {request}")
            t.transferred_bytes += len(src) * cfg.block_bytes * cfg.tp
            decode.allocator.release(lease)
            free.extend(src.tolist())
            t.transfers += 1
        sent += len(batch)


def run(cycles: int, tp: int, requests_per_cycle: int, seed: int, quick: bool = False) -> Tally:
    pid = os.getpid()
    name, dname = f"demo-{pid}-p", f"demo-{pid}-d"  # the synthetic model's pair
    mname, mdname = f"demo-{pid}-mp", f"demo-{pid}-md"  # the checkpoint's pair
    t = Tally()
    with tempfile.TemporaryDirectory(prefix="mpkv-demo-") as tmp:
        plan = ModelPlan.write(Path(tmp), seed, tp, quick)
        model, bs = str(plan.dir), plan.block_size
        insts = [
            LaunchedInstance(dname, launch_args(dname, tp=tp, role="decode")),
            LaunchedInstance(name, launch_args(name, tp=tp, role="prefill")),
            LaunchedInstance(mdname, launch_args(mdname, tp=tp, role="decode", model=model, block_size=bs)),
            LaunchedInstance(mname, launch_args(mname, tp=tp, role="prefill", model=model, block_size=bs)),
        ]
        try:
            for inst in insts:  # all four start together; the references are computed here meanwhile
                inst.start()
            refs = plan.references()
            t.model_references = refs.names
            print(f"references: {'; '.join(refs.names)}", flush=True)
            for inst in insts:
                inst.wait_ready()
                print(ready_line(inst.ready), flush=True)
            try:
                _cycles(name, dname, cycles, requests_per_cycle, random.Random(seed), t)
                _model_cycles(mname, mdname, plan, refs, t)
                for inst in insts:  # shut down by their controllers: each exits 0 on its own
                    code = inst.wait_exit()
                    if code != 0:
                        t.errors.append(
                            f"the launcher of {inst.name} exited with {code}; its actors' logs: {inst.log_dir}"
                        )
            except BaseException as e:
                t.errors.append(f"{type(e).__name__}: {e}")
                raise
        finally:
            for inst in reversed(insts):
                inst.stop()
    return t


@dataclass
class ModelPlan:
    """The checkpoints (the served one and the one an RL update brings), the prompts and how many tokens."""

    dir: Path
    new_dir: Path
    seed: int
    prompts: list[list[int]]
    new_tokens: int
    block_size: int
    same_weight_cycles: int

    @staticmethod
    def write(root: Path, seed: int, tp: int, quick: bool) -> ModelPlan:
        # Heads and KV heads split by rank: a multiple of tp (2 query heads per KV head: GQA), 16 dims each
        kv_heads, heads, hidden, layers, head_dim, vocab = tp * -(-2 // tp), 2 * tp * -(-2 // tp), 64, 2, 16, 256
        seed %= 2**62
        t0 = time.perf_counter()

        def checkpoint(where: Path, seed: int) -> Path:
            return write_checkpoint(
                where,
                seed,
                hidden=hidden,
                layers=layers,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                intermediate=tp * -(-128 // tp),
                vocab=vocab,
            )

        served, update = checkpoint(root / "model", seed), checkpoint(root / "model-update", seed + 1)
        bs = 4  # small blocks: prompts and decoding cross block boundaries
        rng = random.Random(seed)
        lengths = [1, bs - 1, bs, bs + 1, 3 * bs + 2] + ([] if quick else [10 * bs + 3, 2 * bs])
        prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
        print(
            f"model: LlamaForCausalLM, {layers} layers, hidden {hidden}, {heads} heads ({kv_heads} KV) of "
            f"{head_dim}, vocab {vocab}, seeded {seed} (update: {seed + 1}), written "
            f"without transformers in {(time.perf_counter() - t0) * 1e3:.0f} ms to {served}",
            flush=True,
        )
        return ModelPlan(served, update, seed, prompts, 8 if quick else 16, bs, 1 if quick else 3)

    def references(self) -> References:
        return _references(self)


@dataclass
class References:
    """What each checkpoint must generate: mpkv.models at TP=1 in this process, and transformers' generate when
    it is importable (None otherwise)."""

    names: list[str]
    served: Greedy
    update: Greedy
    hf_served: list[list[int]] | None
    hf_update: list[list[int]] | None


def _references(plan: ModelPlan) -> References:
    served = greedy(plan.dir, plan.prompts, plan.new_tokens, plan.block_size)
    update = greedy(plan.new_dir, plan.prompts, plan.new_tokens, plan.block_size)
    names = ["mpkv.models.LlamaModel in this process (TP=1, one prompt at a time, greedy)"]
    try:
        import transformers
    except Exception as e:  # not installed (it is a test dependency only), or an install that is broken
        names.append(f"not transformers: it is not importable here ({type(e).__name__}: {e})")
        return References(names, served, update, None, None)
    names.append(f"transformers {transformers.__version__} generate (greedy)")
    return References(
        names,
        served,
        update,
        _hf_greedy(plan.dir, plan.prompts, plan.new_tokens),
        _hf_greedy(plan.new_dir, plan.prompts, plan.new_tokens),
    )


def _hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    import transformers

    transformers.logging.set_verbosity_error()  # no progress bars nor notes on generation settings
    transformers.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # float32, as config.json says
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
        out.append(seq[0, len(p) :].tolist())
    return out


def _cycles(name: str, dname: str, cycles: int, requests_per_cycle: int, rng: random.Random, t: Tally) -> None:
    """The RL cycles on the prefill instance ``name`` and the decode instance ``dname``; then shuts both down."""
    client, ctl = Client(name), Controller(name)
    decode, dctl = Client(dname), Controller(dname)
    cfg = client.cfg
    free = list(range(cfg.device_blocks))
    wv = ctl.weight_version
    for cycle in range(1, cycles + 1):
        t0 = time.perf_counter()
        rng.shuffle(free)
        live: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(requests_per_cycle):
            n_tokens = rng.randint(1, 12 * cfg.block_size)
            need = -(-n_tokens // cfg.block_size)
            if len(free) < need:
                break
            blocks = np.array([free.pop() for _ in range(need)], dtype=np.int32)
            tokens = np.array([rng.randrange(cfg.vocab) for _ in range(n_tokens)], dtype=np.int32)
            client.wait(client.prefill(f"c{cycle}-r{i}", tokens, blocks))
            t.prefills += 1
            t.kv_bytes_written += need * cfg.block_bytes * cfg.tp
            t.verified_bytes += checked_bytes(client, tokens, blocks, wv, f"prefill c{cycle}-r{i}")
            live.append((tokens, blocks))
        # Swap half of the requests out, reuse their device blocks elsewhere, swap them back in.
        parked: list[tuple[np.ndarray, np.ndarray]] = []
        for tokens, blocks in live[: len(live) // 2]:
            dones = client.wait(client.swap_out(blocks))
            slots = dones[0].slots
            assert slots is not None, "a swap-out completion without its host slots"
            assert all(np.array_equal(np.asarray(d.slots), slots) for d in dones), "ranks chose different slots"
            t.verified_bytes += checked_bytes(client, tokens, slots, wv, "host copy", host=True)
            parked.append((tokens, slots))
            free.extend(blocks.tolist())
            t.swapped_bytes += len(blocks) * cfg.block_bytes * cfg.tp
        rng.shuffle(free)
        stale: list[np.ndarray] = []
        for tokens, slots in parked:
            blocks = np.array([free.pop() for _ in range(len(slots))], dtype=np.int32)
            client.wait(client.swap_in(slots, blocks, free_slots=False))
            t.verified_bytes += checked_bytes(client, tokens, blocks, wv, "swapped-in copy")
            t.swapped_bytes += len(blocks) * cfg.block_bytes * cfg.tp
            free.extend(blocks.tolist())
            stale.append(slots)
        for _, blocks in live[len(live) // 2 :]:
            free.extend(blocks.tolist())
        ship(client, decode, rng, 2 * requests_per_cycle, wv, t)
        # The RL transaction on both instances: new weights; nothing of the old version may be served after.
        for c in (ctl, dctl):
            c.pause()
            res = c.clear()
            t.clear_ms.append(res.latency_s * 1e3)
            t.released.append(sum(res.released_bytes.values()))
        wv += 1
        for c in (ctl, dctl):
            res = c.restore(wv)
            t.restore_ms.append(res.latency_s * 1e3)
            c.resume()
        for slots in stale:
            try:
                client.wait(client.swap_in(slots, np.arange(len(slots), dtype=np.int32)))
                t.errors.append(f"cycle {cycle}: host KV of weight version {wv - 1} was served after restore")
            except TaskFailed as e:
                assert "hold nothing" in str(e) or "weight version" in str(e), e
                t.stale_refusals += 1
        t.cycle_ms.append((time.perf_counter() - t0) * 1e3)
        print(
            f"cycle {cycle:3}/{cycles}: {len(live)} prefills, {len(parked)} swapped out and in, "
            f"{t.transfers} shipped to decode so far, clear "
            f"{t.clear_ms[-1]:.1f} ms (released {t.released[-1] / 2**20:.1f} MiB), "
            f"restore {t.restore_ms[-1]:.1f} ms, "
            f"now weight version {wv}, {t.verified_bytes / 2**20:.1f} MiB verified so far",
            flush=True,
        )
    _shut_down((client, decode), (ctl, dctl))


def _model_cycles(name: str, dname: str, plan: ModelPlan, refs: References, t: Tally) -> None:
    """Generate on the checkpoint's pair (prefill on ``name``, decode on ``dname``) and compare with the
    references; then the RL cycles on both; then shut both down."""
    pre, ctl = Client(name), Controller(name)
    dec, dctl = Client(dname), Controller(dname)
    print(
        f"\nmodel: {len(plan.prompts)} prompts, {plan.new_tokens} tokens each, prefilled on {name} and decoded on "
        f"{dname} (tp={dec.cfg.tp} each, block size {dec.cfg.block_size})",
        flush=True,
    )
    got = _generate(pre, dec, plan, t)
    for i, (prompt, tokens) in enumerate(zip(plan.prompts, got, strict=True)):
        checks = [f"equal to the single-process reference: {_yes(tokens == refs.served.tokens[i])}"]
        if refs.hf_served is not None:
            checks.append(f"to transformers: {_yes(tokens == refs.hf_served[i])}")
        print(f"  prompt {i} ({len(prompt):2} tokens) -> {tokens}  {', '.join(checks)}", flush=True)
    _check("first generate", got, refs.served, refs.hf_served, t)
    wv = ctl.weight_version
    steps: list[tuple[str, Path | None, Greedy, list[list[int]] | None]] = [
        ("same weights", None, refs.served, refs.hf_served)
    ] * plan.same_weight_cycles
    if refs.update.tokens == refs.served.tokens:  # else the check of the update could not fail
        t.errors.append(f"model: the update checkpoint (seed {plan.seed + 1}) generates the served one's tokens")
    steps.append(
        (f"new weights of {plan.new_dir.name} (seed {plan.seed + 1})", plan.new_dir, refs.update, refs.hf_update)
    )
    steps.append((f"first weights again (seed {plan.seed})", plan.dir, refs.served, refs.hf_served))
    for what, source, want, hf in steps:
        if source is None:  # the weights tier: freed and loaded again
            released = sum(sum(c.sleep().released_bytes.values()) for c in (ctl, dctl))
            for c in (ctl, dctl):
                c.wake_up()
            did = f"sleep (KV and weights freed: {released} B), wake_up at weight version {wv}"
        else:  # the trainer pushes a checkpoint directory through a publication
            wv += 1
            for c in (ctl, dctl):
                with c.weight_update(wv) as push:
                    push(str(source))
            did = f"weight_update to version {wv} with the {what}"
        t.model_cycles += 1
        got = _generate(pre, dec, plan, t)
        ok = _check(f"RL cycle {t.model_cycles} ({what})", got, want, hf, t)
        print(
            f"model RL cycle {t.model_cycles}: {did} (both instances): tokens equal to the "
            f"reference{'s' if hf is not None else ''}: {_yes(ok)}",
            flush=True,
        )
    _shut_down((pre, dec), (ctl, dctl))


def _shut_down(clients: tuple[Client, ...], controllers: tuple[Controller, ...]) -> None:
    """Close a pair's clients, then shut both instances down through their controllers."""
    for client in clients:
        client.close()
    for c in controllers:
        c.shutdown()
        c.close()


def _generate(pre: Client, dec: Client, plan: ModelPlan, t: Tally) -> list[list[int]]:
    out = dec.generate(plan.prompts, plan.new_tokens, prefill_on=pre)
    t.model_generates += 1
    for c in (pre, dec):
        if c.blocks.free != c.cfg.device_blocks:
            t.errors.append(f"model: generate left {c.cfg.device_blocks - c.blocks.free} blocks of {c.name} taken")
    return [o.tolist() for o in out]


def _check(what: str, got: list[list[int]], want: Greedy, hf: list[list[int]] | None, t: Tally) -> bool:
    """Whether ``got`` equals every reference; each difference is an error naming the prompt, the references that
    disagree with the instances (together when they agree with each other), the first position that differs, and
    how far the reference's pick there was from its runner-up."""
    ok = True
    for i, tokens in enumerate(got):
        t.model_tokens += len(tokens)
        refs: dict[tuple[int, ...], list[str]] = {}
        for ref, name in ((want.tokens[i], "mpkv.models at TP=1"), (hf[i] if hf is not None else None, "transformers")):
            if ref is not None and tokens != ref:
                refs.setdefault(tuple(ref), []).append(name)
        for differs, names in refs.items():
            ok = False
            j = next((j for j, (a, b) in enumerate(zip(tokens, differs, strict=False)) if a != b), len(tokens))
            margin = want.margins[i][j] if j < len(want.margins[i]) else float("nan")
            tie = " (a near-tie: TP sums in another order can flip it)" if margin < 1e-4 else ""
            t.errors.append(
                f"model {what}: prompt {i}: the instances generated {tokens}, {' and '.join(names)} {list(differs)}: "
                f"they differ first at token {j}, where the reference's pick led its runner-up by {margin:.3g} "
                f"logits{tie}"
            )
    return ok


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    cycles = 3 if args.quick else args.cycles
    seed = int(os.environ.get("MPKV_DEMO_SEED", random.randrange(2**31)))
    print(
        f"mpkv demo: a prefill and a decode instance, tp={args.tp} each, {cycles} RL cycles, seed {seed} "
        f"(replay with MPKV_DEMO_SEED={seed})"
    )
    t = run(cycles, args.tp, requests_per_cycle=4 if args.quick else 8, seed=seed, quick=args.quick)
    mib = 2**20
    print("\nsummary")
    print(f"  prefills                {t.prefills} ({t.kv_bytes_written / mib:.1f} MiB of KV written)")
    print(f"  swapped                 {t.swapped_bytes / mib:.1f} MiB out and in")
    print(
        f"  prefill -> decode       {t.transfers} requests in {t.transfer_batches} batches, "
        f"{t.transferred_bytes / mib:.1f} MiB shipped layer by layer; batch p50 {_pct(t.transfer_ms, 50):.1f} ms"
    )
    print(f"  verified                {t.verified_bytes / mib:.1f} MiB, byte for byte against the recomputation")
    print(f"  RL cycles               {len(t.clear_ms) // 2} (on both instances)")
    print(f"  clear latency           p50 {_pct(t.clear_ms, 50):.1f} ms, p99 {_pct(t.clear_ms, 99):.1f} ms")
    print(f"  restore latency         p50 {_pct(t.restore_ms, 50):.1f} ms, p99 {_pct(t.restore_ms, 99):.1f} ms")
    print(f"  released per clear      {_pct([float(x) for x in t.released], 50) / mib:.1f} MiB (median, measured)")
    print(f"  stale KV refused        {t.stale_refusals} swap-ins of an old weight version")
    print(
        f"  model (a real Llama)    {t.model_generates} generates, {t.model_tokens} tokens compared, "
        f"{t.model_cycles} RL cycles (on both instances)"
    )
    for ref in t.model_references:
        print(f"    checked against {ref}" if not ref.startswith("not ") else f"    {ref}")
    print(f"  errors                  {len(t.errors)}")
    for e in t.errors:
        print(f"    {e}")
    return 0 if not t.errors else 1
