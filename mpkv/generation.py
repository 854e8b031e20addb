"""``Client.generate``: prompts in, generated token ids out, through the instance's tasks, in waves of as many
prompts as the pools, a task's record and the lease table hold: one batched prefill per wave (or one PD batch,
shipped into this decode instance), then one decode step per token over the wave's requests. Blocks come from
the client's allocator.

Everything a caller can get wrong is checked before the first task is submitted (``plan``): prompt ids, the
vocabulary, ``max_new_tokens``, sampling values, ``timeout_s``, a prompt that cannot fit the pool at all, a PD
pair that does not match. Blocks are given back once every rank answered; the blocks of a task still in flight
(its wait ended otherwise) stay allocated, as something may still write them, and the exception says so.
"""

from __future__ import annotations

import itertools
import math
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mpkv.blocks import BadTask, check_sampling, check_tokens, int_array
from mpkv.config import MODEL_FIELDS
from mpkv.errors import StaleWeights, TaskFailed, TransferFailed
from mpkv.instance import MAX_LEASES
from mpkv.protocol import DecodeItem, Done, PdRole, PrefillItem, Sampling

if TYPE_CHECKING:
    from mpkv.client import Client, Ticket
    from mpkv.pd.leases import Lease

_calls = itertools.count(1)
MAX_TASK_BYTES = 1 << 18  # a wave's decode step or PD batch stays well inside a task ring's record (~512 KiB)
ITEM_BYTES = 128  # an item's framing in a task, beside its ids (a request's name is at most 256 characters)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class Generated(list[np.ndarray]):
    """What ``Client.generate`` returns: each prompt's tokens (int32), and ``weight_version``, the one weight
    version every token of the call was computed with."""

    def __init__(self, tokens: list[np.ndarray], weight_version: int) -> None:
        super().__init__(tokens)
        self.weight_version = weight_version


@dataclass
class Request:
    name: str
    prompt: np.ndarray  # int32
    sampling: Sampling
    need: int  # blocks for the prompt and every generated token but the last (whose K/V is never written)
    table: np.ndarray = field(default_factory=lambda: np.empty(0, np.int32))
    out: list[int] = field(default_factory=list)
    lease: Lease | None = None


@dataclass
class Generation:
    client: Client
    requests: list[Request]
    max_new_tokens: int
    prefill_on: Client | None
    versions: set[int] = field(default_factory=set)  # the weight versions of every completion
    pools: dict[tuple[str, int], set[int]] = field(default_factory=dict)  # per (instance, rank), this wave's pools
    in_flight: str = ""  # the task whose completions are being waited for ("" when every rank answered)

    def run(self, timeout_s: float) -> Generated:
        waiting = list(self.requests)
        while waiting:
            wave = self._admit(waiting)
            waiting = waiting[len(wave) :]
            self._run_wave(wave, timeout_s)
        (version,) = self.versions  # exactly one: two raised StaleWeights
        return Generated([np.array(r.out, dtype=np.int32) for r in self.requests], version)

    def _admit(self, waiting: list[Request]) -> list[Request]:
        """The longest prefix of ``waiting`` whose blocks are free now, here and on the prefill instance, and whose
        tasks fit a ring's record (at least one request: if even that one does not fit, taking its blocks says
        so)."""
        pre = self.prefill_on
        free, pre_free, wave = self.client.blocks.free, pre.blocks.free if pre else 0, list[Request]()
        task_bytes, leases = 0, (MAX_LEASES - len(self.client.allocator.leases)) if pre else len(waiting)
        for r in waiting:
            prompt_blocks = blocks_for(len(r.prompt), pre.cfg.block_size) if pre else 0
            # A decode step carries every table, a PD batch every prompt and two tables: 4-byte ids, and room
            # for each item's framing.
            task_bytes += 4 * (r.need + len(r.prompt) + 2 * prompt_blocks) + ITEM_BYTES
            if wave and (r.need > free or prompt_blocks > pre_free or task_bytes > MAX_TASK_BYTES or not leases):
                break
            wave.append(r)
            free, pre_free, leases = free - r.need, pre_free - prompt_blocks, leases - 1
        return wave

    def _run_wave(self, wave: list[Request], timeout_s: float) -> None:
        c = self.client
        self.pools.clear()  # waves share no KV: a clear and restore between two is no harm to either
        try:
            if self.prefill_on is None:
                self._prefill_here(wave, timeout_s)
            else:
                self._prefill_there(wave, timeout_s)
            bs = c.cfg.block_size
            for _ in range(self.max_new_tokens - 1):
                items = []
                for r in wave:
                    position = len(r.prompt) + len(r.out) - 1  # the last token's: its K/V go in now
                    items.append(DecodeItem(r.name, r.out[-1], position, r.table[: position // bs + 1], r.sampling))
                tokens = self._wait(c, c.decode(items), timeout_s)
                for r, token in zip(wave, tokens, strict=True):
                    r.out.append(int(token))
        except BaseException as e:
            if self.in_flight:  # a task may still write the wave's blocks: they stay allocated, and we say so
                e.add_note(
                    f"generate: {self.in_flight} did not complete on every rank; the blocks of its requests "
                    f"{[r.name for r in wave]} stay allocated in {c.name}, as something may still write them"
                )
                raise
            for r in wave:
                self._give_back(r)
            raise
        for r in wave:
            self._give_back(r)

    def _wait(self, c: Client, ticket: Ticket, timeout_s: float) -> np.ndarray:
        """The tokens of one task; while its wait runs, the task counts as in flight unless every rank answered
        (a TaskFailed carries every rank's completion)."""
        self.in_flight = ticket.what
        try:
            dones = c.wait(ticket, timeout_s)
        except TaskFailed:
            self.in_flight = ""
            raise
        self.in_flight = ""
        return self._tokens(c, dones)

    def _prefill_here(self, wave: list[Request], timeout_s: float) -> None:
        """The wave's prompts in one batched prefill (one forward over all their tokens)."""
        c, bs = self.client, self.client.cfg.block_size
        for r in wave:
            r.table = c.blocks.take(r.need, f"generate {r.name!r}")
        items = [PrefillItem(r.name, r.prompt, r.table[: blocks_for(len(r.prompt), bs)], r.sampling) for r in wave]
        for r, token in zip(wave, self._wait(c, c.prefill_batch(items), timeout_s), strict=True):
            r.out.append(int(token))

    def _prefill_there(self, wave: list[Request], timeout_s: float) -> None:
        """Prefill on ``prefill_on``, shipped into leases of this (decode) instance; the rest of each table comes
        from this instance's free list. The prefill side's source blocks go back only once the batch settled."""
        c, pre = self.client, self.prefill_on
        assert pre is not None
        sources: list[np.ndarray] = []
        settled = True
        try:
            batch = []
            for r in wave:
                r.lease = c.allocate(r.name, len(r.prompt))
                r.table = np.concatenate([r.lease.blocks, c.blocks.take(r.need - len(r.lease.blocks), r.name)])
                sources.append(pre.blocks.take(len(r.lease.blocks), f"generate {r.name!r} (prefill)"))
                batch.append((r.name, r.prompt, sources[-1], r.lease, r.sampling))
            ticket = pre.send(c, batch)
            self.in_flight, settled = f"the prefill -> decode batch of {len(wave)} prompts", False
            try:
                dones = pre.wait_send(ticket, timeout_s)
            except TransferFailed:
                settled = ticket.seq not in pre._sends  # else: some rank did not report; call wait_send to settle
                raise
            settled, self.in_flight = True, ""
            workers = dones[: pre.cfg.tp]  # the workers' completions come first, in rank order
            for r, token in zip(wave, self._tokens(pre, workers), strict=True):
                r.out.append(int(token))
        finally:
            if settled:
                self.in_flight = ""
                for src in sources:
                    pre.blocks.give_back(src)

    def _tokens(self, c: Client, dones: list[Done]) -> np.ndarray:
        """The completions' tokens, after checking that every task of this call ran on one weight version, and on
        one pool of each instance (I7): a clear and restore in the middle, even to the same version, took the KV
        that the next step reads."""
        self.versions.update(d.weight_version for d in dones)
        if len(self.versions) > 1:
            raise StaleWeights(
                f"generate on {self.client.name}: completions of weight versions {sorted(self.versions)} (a restore "
                "ran in the middle, or the prefill and decode instances serve different weights); its tokens would "
                "mix KV of both: generate again"
            )
        for d in dones:  # per rank: after a retried restore, ranks may serve pools of different epochs
            epochs = self.pools.setdefault((c.name, d.rank), set())
            epochs.add(d.pool_epoch)
            if len(epochs) > 1:
                raise StaleWeights(
                    f"generate on {self.client.name}: the pool of {c.name} rank {d.rank} was cleared and restored in "
                    f"the middle (pool epochs {sorted(epochs)}); the KV its next steps read is gone: generate again"
                )
        return c.tokens_of(dones)

    def _give_back(self, r: Request) -> None:
        c = self.client
        local = r.table[len(r.lease.blocks) :] if r.lease is not None else r.table
        if len(local):
            c.blocks.give_back(local)
        if r.lease is not None and not r.lease.retired:
            if r.lease.state.name == "GRANTED":
                c.allocator.fail(r.lease, "generate stopped before the transfer completed")
            if not r.lease.in_use:
                c.allocator.release(r.lease)
        r.table, r.lease = np.empty(0, np.int32), None


def plan(
    client: Client,
    prompts: object,
    max_new_tokens: object,
    temperature: object,
    top_p: object,
    seed: object,
    prefill_on: object,
    timeout_s: object,
) -> Generation:
    cfg = client.cfg
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise BadTask(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r:.40}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise BadTask(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r:.40}")
    if seed is None:
        seed = secrets.randbits(62) if temperature != 0 else 0
    check_sampling(temperature, top_p, seed, "generate")
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise BadTask(f"prompts must be a non-empty list of token-id sequences, got {type(prompts).__name__}")
    pre = _check_pair(client, prefill_on)
    call = next(_calls)
    requests = []
    for i, p in enumerate(prompts):
        what = f"generate: prompt {i}"
        ids = int_array(p, what)
        toks = check_tokens(ids, cfg.vocab, cfg.block_size, blocks_for(ids.size, cfg.block_size), what)
        need = blocks_for(len(toks) + max_new_tokens - 1, cfg.block_size)
        if need > cfg.device_blocks:
            raise BadTask(
                f"{what}: {len(toks)} tokens and max_new_tokens={max_new_tokens} need {need} blocks of "
                f"{cfg.block_size} tokens; {client.name}'s pool has {cfg.device_blocks}"
            )
        if pre is not None and blocks_for(len(toks), pre.cfg.block_size) > pre.cfg.device_blocks:
            raise BadTask(f"{what}: {len(toks)} tokens do not fit {pre.name}'s pool ({pre.cfg.device_blocks} blocks)")
        sampling = Sampling(float(temperature), float(top_p), (int(seed) + i) % 2**63)  # type: ignore[arg-type,call-overload]
        name = f"gen{call}.{i}"
        requests.append(Request(name, toks, sampling if temperature else Sampling(), need))
    return Generation(client, requests, max_new_tokens, pre)


def _check_pair(client: Client, prefill_on: object) -> Client | None:
    from mpkv.client import Client

    if prefill_on is None:
        return None
    if not isinstance(prefill_on, Client):
        raise BadTask(f"prefill_on must be a Client of a prefill instance, got {type(prefill_on).__name__}")
    if client.cfg.pd_role != PdRole.DECODE or prefill_on.cfg.pd_role != PdRole.PREFILL:
        raise BadTask(
            f"generate with prefill_on runs on a decode instance and prefills on a prefill instance; "
            f"{client.name} is {client.cfg.pd_role.name.lower()}, {prefill_on.name} is "
            f"{prefill_on.cfg.pd_role.name.lower()}"
        )
    fields = (*MODEL_FIELDS, "model", "tp", "block_size", "dtype")
    differ = [f for f in fields if getattr(client.cfg, f) != getattr(prefill_on.cfg, f)]
    if differ:
        pairs = ", ".join(f"{f} {getattr(prefill_on.cfg, f)!r} vs {getattr(client.cfg, f)!r}" for f in differ)
        raise BadTask(f"{prefill_on.name} cannot prefill for {client.name}: they differ in {pairs}")
    return prefill_on
