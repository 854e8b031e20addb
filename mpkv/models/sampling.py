"""Choosing the next token from logits: greedy, or temperature and top-p with the request's seed.

The token a request draws at position ``p`` comes from a generator seeded by ``(seed, p)`` alone (``draw_seed``):
no generator state lives between steps, so a request's tokens depend on neither the batch around it, nor the
rank (every tensor-parallel rank computes the same logits, mpkv.models.llama), nor which instance ran the step
(a request prefilled on one instance and decoded on another, or swapped out and back in, draws the same).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mpkv.protocol import Sampling


def draw_seed(seed: int, position: int) -> int:
    """The seed of the draw at ``position``: an odd multiplier keeps (seed, position) pairs apart."""
    return (seed * 0x9E3779B97F4A7C15 + position) % 2**63


def next_tokens(logits: torch.Tensor, samplings: Sequence[Sampling], positions: Sequence[int]) -> list[int]:
    """One token per row of ``logits`` [batch, vocab]: row i is the request whose new token lands at
    ``positions[i]``."""
    out = logits.argmax(dim=-1).tolist()
    for i, (s, position) in enumerate(zip(samplings, positions, strict=True)):
        if s.temperature > 0:
            g = torch.Generator(device=logits.device).manual_seed(draw_seed(s.seed, position))
            out[i] = int(sample(logits[i], s, g))
    return [int(t) for t in out]


def sample(logits: torch.Tensor, s: Sampling, g: torch.Generator) -> torch.Tensor:
    logits = logits.float()
    # Shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf (probability 0),
    # never the largest to inf (softmax of inf is NaN, and multinomial refuses it); and no smaller than 1e-30,
    # which float32 still holds (a temperature of 1e-300 would be 0 there: 0 / 0).
    probs = torch.softmax((logits - logits.max()) / max(s.temperature, 1e-30), dim=-1)
    if s.top_p < 1:
        probs = _top_p(probs, s.top_p)
    return torch.multinomial(probs, 1, generator=g)[0]


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: a token stays if the tokens more likely than it hold less than
    ``top_p`` (so the most likely one always stays)."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered
    keep = before < top_p
    keep[..., 0] = True  # explicitly: a top_p below float32's range compares as 0 < 0
    ordered = torch.where(keep, ordered, torch.zeros_like(ordered))
    return torch.zeros_like(probs).scatter(-1, order, ordered)
