"""Llama-family forward (LlamaForCausalLM, Qwen2ForCausalLM) in plain torch, over mpkv's paged KV pool.

The pool is the tensor every mpkv pool exposes (``CacheConfig.pool_shape``, ``mpkv/pool``), one per rank::

    [layers, 2 (K, V), blocks, block_size, kv_heads / tp, head_dim]

so ``pool[layer, 0, block, offset]`` is the K of one token's KV heads on this rank. A request's token at position
``p`` lives at ``(table[p // block_size], p % block_size)``. The model writes exactly the slots of the tokens it
runs (never the rest of a block: another request's tokens may never share a block, but a request's own earlier
tokens do).

One code path serves prefill and decode: a ``Chunk`` is some new tokens of a request whose first ``start``
tokens are already in the pool. Prefill is chunks with ``start = 0``; decode is one token per running request.
Projections and the MLP run on all the batch's tokens at once; attention reads each request's keys through its
block table into a padded batch, with a mask that is causal and hides the padding.

``decode`` has its own path, the same maths with less per-step overhead (it is what runs once per generated
token): the step's indices are built with a few tensor ops, every layer's earlier K/V are gathered from the pool
in one ``index_select`` of whole blocks (the new token's K/V are then written both to the pool and into that
copy), and GQA is read without copying K/V per query head. Any input it does not expect falls back to the
general path, which names what is wrong.

Both run under ``torch.no_grad``: weights that require grad (a trainer's) must not make every step record a
graph. Not ``inference_mode``: its outputs cannot be modified in place outside it, a trap for callers, and the
version-counter work it saves was below the noise here.

Tensor parallel: a rank holds its heads' share of the weights (``mpkv.models.weights``); the products of o_proj
and down_proj are partial sums, which the ``all_reduce`` callable passed in adds up across ranks (the worker will
pass torch.distributed or a shared-memory all-reduce; tests sum in-process). Everything else is replicated, so
every rank ends with the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mpkv.errors import BadBlocks, BadTask
from mpkv.models.hf_config import ModelConfig, RopeConfig
from mpkv.models.weights import LayerWeights, RankWeights

AllReduce = Callable[[torch.Tensor], torch.Tensor]  # sum over the ranks; returns the reduced tensor


@dataclass(frozen=True)
class Chunk:
    """``tokens`` of one request to run, at positions ``start, start + 1, ...``; ``blocks`` is the request's block
    table, long enough for ``start + len(tokens)`` tokens. The first ``start`` tokens' K/V are in the pool."""

    tokens: Sequence[int] | torch.Tensor
    blocks: Sequence[int] | torch.Tensor
    start: int = 0


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """The rotation frequency of each pair of a head's dimensions, [head_dim / 2], float32."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":  # positions divided by the factor: the same as frequencies divided by it
        return inv_freq / rope.factor
    if rope.kind == "llama3":
        return _llama3_inv_freq(rope, inv_freq)
    return inv_freq


def _llama3_inv_freq(rope: RopeConfig, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's scaling: wavelengths shorter than ``original / high_freq_factor`` are kept, those longer than
    ``original / low_freq_factor`` are slowed by ``factor``, and the band between blends the two linearly in
    ``original / wavelength``."""
    wavelen = 2 * math.pi / inv_freq
    ratio = rope.original_max_positions / wavelen  # how many wavelengths fit in the trained context
    blend = ((ratio - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)).clamp(0.0, 1.0)
    # blend is 1 for short wavelengths (kept), 0 for long ones (divided by factor)
    return blend * inv_freq + (1 - blend) * inv_freq / rope.factor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised in float32 whatever the compute dtype (half-precision squares overflow), scaled in x's dtype."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, pairs ``(i, i + head_dim/2)`` (the Hugging Face Llama convention, not interleaved).
    ``x``: [T, heads, head_dim]; ``cos``, ``sin``: [T, 1, head_dim] as ``LlamaModel.rope`` gives them, cos of
    each pair's angle twice and sin with the first half negated, so the rotation is two products and a sum:
    ``x1 * c + x2 * (-s)`` is ``x1 * c - x2 * s`` to the bit (negation is exact)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin


class _Batch:
    """Per forward, shared by every layer: where each new token goes in the pool, where each request's keys are
    read from, the attention mask, and the rotary angles."""

    def __init__(
        self,
        chunks: Sequence[Chunk],
        block_size: int,
        rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> None:
        ids = [torch.as_tensor(c.tokens, dtype=torch.long).reshape(-1) for c in chunks]
        lens = [len(t) for t in ids]
        starts = [c.start for c in chunks]
        totals = [s + n for s, n in zip(starts, lens, strict=True)]
        self.n_chunks, self.max_q, self.max_k = len(chunks), max(lens), max(totals)
        self.ids = torch.cat(ids).to(device)
        # Which chunk each flat token belongs to, and its row in that chunk: scatters q into the padded batch.
        self.chunk_of = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor(lens)).to(device)
        self.row = torch.cat([torch.arange(n) for n in lens]).to(device)
        pos = torch.cat([torch.arange(s, t) for s, t in zip(starts, totals, strict=True)]).to(device)
        self.last = torch.tensor(lens).cumsum(0).to(device) - 1  # flat index of each chunk's last token
        tables = _padded_tables(chunks, device)
        self.write_block, self.write_offset = tables[self.chunk_of, pos // block_size], pos % block_size
        key_pos = torch.arange(self.max_k, device=device)
        # Keys are read by whole blocks (one large copy per block, not one small copy per token): the first
        # ceil(max_k / block_size) blocks of every table, ``span`` positions per chunk, the first max_k used.
        n_blocks = -(-self.max_k // block_size)
        self.span = n_blocks * block_size
        self.read_blocks = tables[:, :n_blocks].reshape(-1)  # padding reads the table's first block, masked
        # Query row i of chunk b is at position start_b + i and sees keys 0..start_b + i (causal). Padding rows
        # see key 0 only: a row with no key at all would be NaN, and padding rows are dropped anyway.
        q_pos = torch.zeros(len(chunks), self.max_q, dtype=torch.long, device=device)
        q_pos[self.chunk_of, self.row] = pos
        self.mask = (key_pos[None, None, :] <= q_pos[:, :, None])[:, None]  # [chunks, 1, max_q, max_k]
        self.cos, self.sin = rope(pos)


class _DecodeStep:
    """One decode step's indices, built with a handful of tensor ops whatever the batch size. Request i's new
    token is at position ``lens[i]``; attention reads positions ``0 .. max_k - 1`` of every request (max_k is the
    longest request's length, new token included) and masks each request's positions past its own token."""

    def __init__(
        self,
        ids: torch.Tensor,
        lens: torch.Tensor,
        tables: torch.Tensor,
        block_size: int,
        rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.n, self.ids, self.max_k = len(ids), ids, int(lens.max()) + 1
        rows = torch.arange(self.n, device=ids.device)
        # slot = block * block_size + offset: an index into the pool viewed as [layers, K/V, slot, ...]
        self.write_slots = tables[rows, lens // block_size] * block_size + lens % block_size
        # Whole blocks are read (a few large copies rather than one small copy per token): the first
        # ceil(max_k / block_size) of every table, ``span`` positions per request, of which the first max_k are
        # attended to.
        n_blocks = -(-self.max_k // block_size)
        self.span = n_blocks * block_size
        self.read_blocks = tables[:, :n_blocks].reshape(-1)
        self.new_rows = rows * self.span + lens  # the new tokens' rows among the gathered positions
        key_pos = torch.arange(self.max_k, device=ids.device)
        # Requests of one length (a batch started together) have no padding to hide: no mask at all
        self.mask = None
        if bool((lens != lens[0]).any()):
            self.mask = (key_pos[None, :] <= lens[:, None])[:, None, None, :]  # [n, 1, 1 (query rows), max_k]
        self.cos, self.sin = rope(lens)


def _padded_tables(chunks: Sequence[Chunk], device: torch.device) -> torch.Tensor:
    """Block tables as one [chunks, longest] tensor; a short table is padded with its own first block (a valid
    index whose reads the mask hides)."""
    tables = [torch.as_tensor(c.blocks, dtype=torch.long).reshape(-1) for c in chunks]
    width = max(len(t) for t in tables)
    return torch.stack([torch.cat([t, t[:1].expand(width - len(t))]) for t in tables]).to(device)


class LlamaModel:
    """One rank's share of a Llama-family model. ``forward`` runs a batch of chunks over this rank's pool."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: RankWeights,
        *,
        rank: int = 0,
        tp: int = 1,
        all_reduce: AllReduce | None = None,
    ) -> None:
        cfg.check_tp(tp)
        if tp > 1 and all_reduce is None:
            raise ValueError(f"tp={tp} needs an all_reduce (rank {rank} holds a partial sum of each projection)")
        self.cfg, self.w, self.rank, self.tp = cfg, weights, rank, tp
        self.all_reduce: AllReduce = all_reduce if all_reduce is not None else (lambda x: x)
        self.heads, self.kv_heads = cfg.heads // tp, cfg.kv_heads // tp
        self.device, self.dtype = weights.embed.device, weights.embed.dtype
        self.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)
        # cos and sin of every position so far, grown on demand: a step looks its positions up instead of
        # computing two transcendental functions per token; laid out as ``rotate`` takes them
        self._cos = self._sin = torch.empty(0, cfg.head_dim, device=self.device, dtype=self.dtype)

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary angles at positions ``pos`` [T] as ``rotate`` takes them: cos [T, 1, head_dim] (each pair's
        twice) and sin [T, 1, head_dim] (the first half negated)."""
        need = int(pos.max()) + 1
        if need > self._cos.shape[0]:
            n = max(need, 2 * self._cos.shape[0], 256)
            angles = torch.arange(n, device=self.device).float()[:, None] * self.inv_freq.to(self.device)[None, :]
            cos, sin = angles.cos(), angles.sin()
            # Computed in float32, applied in the model's dtype (as the reference does): a bf16 or fp16 q/k stays
            # in its dtype through the rotation.
            self._cos = torch.cat([cos, cos], dim=-1).to(self.dtype)
            self._sin = torch.cat([-sin, sin], dim=-1).to(self.dtype)
        return self._cos[pos][:, None], self._sin[pos][:, None]

    def pool_shape(self, blocks: int, block_size: int) -> tuple[int, ...]:
        """What ``CacheConfig(layers, kv_heads, head_dim, tp=...).pool_shape(blocks)`` gives for this model."""
        return (self.cfg.layers, 2, blocks, block_size, self.kv_heads, self.cfg.head_dim)

    def prefill(
        self,
        prompts: Sequence[Sequence[int] | torch.Tensor],
        tables: Sequence[Sequence[int] | torch.Tensor],
        pool: torch.Tensor,
        on_layer_done: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Run whole prompts; logits of each prompt's last token, [len(prompts), vocab] float32."""
        chunks = [Chunk(p, t) for p, t in zip(prompts, tables, strict=True)]
        return self.forward(chunks, pool, on_layer_done)

    def decode(
        self,
        tokens: Sequence[int] | torch.Tensor,
        lengths: Sequence[int],
        tables: Sequence[Sequence[int] | torch.Tensor],
        pool: torch.Tensor,
    ) -> torch.Tensor:
        """One step of running requests: token i goes at position ``lengths[i]`` (the tokens already in the
        pool) of table i; returns the next logits, [len(tokens), vocab] float32."""
        with torch.no_grad():
            step = self._plan_decode(tokens, lengths, tables, pool)
            if step is not None:
                return self._decode(step, pool)
        # Anything the fast path does not take (bad input above all) goes the general way, which checks each
        # request and names what is wrong.
        toks = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        chunks = [Chunk(toks[i : i + 1], t, s) for i, (t, s) in enumerate(zip(tables, lengths, strict=True))]
        return self.forward(chunks, pool)

    def _plan_decode(
        self,
        tokens: Sequence[int] | torch.Tensor,
        lengths: Sequence[int],
        tables: Sequence[Sequence[int] | torch.Tensor],
        pool: torch.Tensor,
    ) -> _DecodeStep | None:
        """The step's indices, or None when the input is not plainly valid (the general path then decides)."""
        n = len(tables)
        toks = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)  # as the general path reads them
        lens = torch.as_tensor(lengths)
        if n == 0 or toks.numel() != n or lens.shape != (n,) or lens.is_floating_point() or lens.dtype == torch.bool:
            return None
        lens = lens.long()
        if pool.dim() != 6 or tuple(pool.shape) != self.pool_shape(pool.shape[2], pool.shape[3]):
            return None
        if not pool.is_contiguous():
            return None  # the fast path views the pool flat
        rows = [torch.as_tensor(t).reshape(-1) for t in tables]
        if any(r.is_floating_point() for r in rows):
            return None
        blocks, block_size = pool.shape[2], pool.shape[3]
        widths = torch.tensor([r.numel() for r in rows])
        # Padding reads block 0, at positions past the request's own tokens only: the mask hides them.
        padded = torch.nn.utils.rnn.pad_sequence([r.long() for r in rows], batch_first=True)
        # A few reductions read back at once, rather than one comparison per bound
        low_tok, high_tok, low_len, low_block, high_block, short = torch.stack(
            [*toks.aminmax(), lens.min(), *padded.aminmax(), (lens // block_size + 1 - widths).max()]
        ).tolist()
        if low_tok < 0 or high_tok >= self.cfg.vocab or low_len < 0 or low_block < 0 or high_block >= blocks:
            return None
        if short > 0:
            return None  # some table lacks the block of the position its new token goes to
        dev = self.device  # checked on the CPU (no device sync per check); indices go where the model is
        step = _DecodeStep(toks.to(dev), lens.to(dev), padded.to(dev), block_size, self.rope)
        if step.write_slots.unique().numel() != n:
            return None  # overlapping tables: the general path's check names them
        return step

    def _decode(self, s: _DecodeStep, pool: torch.Tensor) -> torch.Tensor:
        n, d, heads, kv_heads, eps = s.n, self.cfg.head_dim, self.heads, self.kv_heads, self.cfg.rms_norm_eps
        qk_width = (heads + kv_heads) * d
        layers, blocks = pool.shape[0], pool.shape[2]
        flat = pool.view(layers, 2, -1, kv_heads * d)  # [layers, K/V, slot, this rank's KV heads * d]
        # Every layer's earlier K/V for this step in one gather, [layers, K/V, n * span, kv_heads * d]; the rows
        # of the new tokens are filled below, layer by layer, as their K/V are computed.
        kv = pool.view(layers, 2, blocks, -1).index_select(2, s.read_blocks).view(layers, 2, n * s.span, -1)
        x = F.embedding(s.ids, self.w.embed)
        for i, w in enumerate(self.w.layers):
            qkv = F.linear(rms_norm(x, w.input_norm, eps), w.qkv, w.qkv_bias)
            qk = rotate(qkv[:, :qk_width].view(n, heads + kv_heads, d), s.cos, s.sin)  # q and k in one go
            new = torch.stack((qk[:, heads:].view(n, -1), qkv[:, qk_width:])).to(pool.dtype)  # [K/V, n, ...]
            flat[i].index_copy_(1, s.write_slots, new)
            kv[i].index_copy_(1, s.new_rows, new)  # the pool's dtype, so the same values as read back from it
            k, v = kv[i].view(2, n, s.span, kv_heads, d)[:, :, : s.max_k].transpose(2, 3).to(qkv.dtype)
            # GQA without copying K/V per query head: with one query per request, the query heads that share a
            # KV head (h // group) are the rows of one query sequence against that head's keys.
            q = qk[:, :heads].reshape(n, kv_heads, heads // kv_heads, d)
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=s.mask)  # [n, kv_heads, group, d]
            x = self._rest_of_layer(w, x, attn.reshape(n, heads * d))
        return (rms_norm(x, self.w.norm, eps) @ self.w.lm_head.T).float()

    def forward(
        self, chunks: Sequence[Chunk], pool: torch.Tensor, on_layer_done: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Run every chunk's tokens, writing their K/V into ``pool``; ``on_layer_done(layer)`` is called as soon
        as a layer's K/V are in the pool (so they can be shipped while later layers compute). Returns the
        logits of each chunk's last token, [len(chunks), vocab], float32."""
        self._check(chunks, pool)
        batch = _Batch(chunks, pool.shape[3], self.rope, self.device)
        _check_slots(batch, pool.shape[3])
        with torch.no_grad():
            x = self.w.embed[batch.ids]
            for i, layer in enumerate(self.w.layers):
                x = self._layer(i, layer, x, batch, pool, on_layer_done)
            last = rms_norm(x[batch.last], self.w.norm, self.cfg.rms_norm_eps)
            return (last @ self.w.lm_head.T).float()

    def _layer(
        self,
        i: int,
        w: LayerWeights,
        x: torch.Tensor,
        batch: _Batch,
        pool: torch.Tensor,
        on_layer_done: Callable[[int], None] | None,
    ) -> torch.Tensor:
        d, eps = self.cfg.head_dim, self.cfg.rms_norm_eps
        qkv = F.linear(rms_norm(x, w.input_norm, eps), w.qkv, w.qkv_bias)
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = rotate(q.view(-1, self.heads, d), batch.cos, batch.sin)
        k = rotate(k.view(-1, self.kv_heads, d), batch.cos, batch.sin)
        pool[i, 0, batch.write_block, batch.write_offset] = k.to(pool.dtype)
        pool[i, 1, batch.write_block, batch.write_offset] = v.view(-1, self.kv_heads, d).to(pool.dtype)
        if on_layer_done is not None:
            on_layer_done(i)
        return self._rest_of_layer(w, x, self._attend(q, pool[i, 0], pool[i, 1], batch))

    def _rest_of_layer(self, w: LayerWeights, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """After attention [T, heads * d]: o_proj and the residual, then the MLP and its residual."""
        x = x + self._reduced(F.linear(attn, w.o), w.o_bias)
        gate, up = F.linear(rms_norm(x, w.post_norm, self.cfg.rms_norm_eps), w.gate_up).chunk(2, dim=-1)
        return x + self._reduced(F.linear(F.silu(gate) * up, w.down), None)

    def _reduced(self, partial: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Sum of the ranks' partial products; a replicated bias is added once, after the sum."""
        total = self.all_reduce(partial) if self.tp > 1 else partial
        return total if bias is None else total + bias

    def _attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Attention of the flat queries [T, heads, d] over each chunk's keys in the pool; [T, heads * d]."""
        n, d, group = batch.n_chunks, self.cfg.head_dim, self.heads // self.kv_heads
        q_pad = q.new_zeros(n, batch.max_q, self.heads, d)
        q_pad[batch.chunk_of, batch.row] = q

        def gathered(kv_pool: torch.Tensor) -> torch.Tensor:  # [chunks, kv_heads, max_k, d]
            kv = kv_pool.reshape(kv_pool.shape[0], -1).index_select(0, batch.read_blocks)
            return kv.view(n, batch.span, self.kv_heads, d)[:, : batch.max_k].transpose(1, 2).to(q.dtype)

        # GQA: query head h reads KV head h // group, which enable_gqa does without copying K/V per query head
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), gathered(k_pool), gathered(v_pool), attn_mask=batch.mask, enable_gqa=group > 1
        )  # [chunks, heads, max_q, d]
        return out.transpose(1, 2)[batch.chunk_of, batch.row].reshape(-1, self.heads * d)

    def _check(self, chunks: Sequence[Chunk], pool: torch.Tensor) -> None:
        """Bad input fails here, before the pool is touched."""
        if not chunks:
            raise BadTask("a forward needs at least one request")
        if pool.dim() != 6 or tuple(pool.shape) != self.pool_shape(pool.shape[2], pool.shape[3]):
            raise BadTask(
                f"pool of shape {list(pool.shape)} does not fit the model: expected [layers {self.cfg.layers}, 2, "
                f"blocks, block_size, kv heads per rank {self.kv_heads}, head_dim {self.cfg.head_dim}]"
            )
        blocks, block_size = pool.shape[2], pool.shape[3]
        for i, c in enumerate(chunks):
            _check_chunk(i, c, self.cfg.vocab, blocks, block_size)


def _check_slots(batch: _Batch, block_size: int) -> None:
    """Two tokens of a batch writing one pool slot (block tables that overlap) would leave one's K/V wrong."""
    slots = batch.write_block * block_size + batch.write_offset
    if slots.unique().numel() != slots.numel():
        raise BadBlocks("the requests' block tables overlap: two tokens of the batch would write the same slot")


def _check_chunk(i: int, c: Chunk, vocab: int, blocks: int, block_size: int) -> None:
    toks = torch.as_tensor(c.tokens).reshape(-1)
    table = torch.as_tensor(c.blocks).reshape(-1)
    if toks.numel() == 0:
        raise BadTask(f"request {i}: no tokens to run")
    if toks.is_floating_point() or table.is_floating_point():
        raise BadTask(f"request {i}: token and block ids must be integers")
    if c.start < 0:
        raise BadTask(f"request {i}: start {c.start} is negative")
    low, high = int(toks.min()), int(toks.max())
    if low < 0 or high >= vocab:
        raise BadTask(f"request {i}: token id {low if low < 0 else high} out of range: valid ids are 0..{vocab - 1}")
    need = -(-(c.start + toks.numel()) // block_size)
    if table.numel() < need:
        raise BadBlocks(
            f"request {i}: {c.start + toks.numel()} tokens need {need} blocks of {block_size}, "
            f"the block table has {table.numel()}"
        )
    if int(table.min()) < 0 or int(table.max()) >= blocks:
        raise BadBlocks(f"request {i}: block ids out of range: the pool has blocks 0..{blocks - 1}")
