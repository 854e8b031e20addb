"""Choosing the next token from logits: greedy, or temperature and top-p with a seeded generator per request.

A request's generator is seeded once (``generator(seed)``) and used for that request only, so its tokens do not
depend on what else is in the batch. Every tensor-parallel rank computes the same logits (mpkv.models.llama), so
ranks with the same seeds sample the same tokens without talking. So under tensor parallelism a sampled request
needs an explicit seed, the same on every rank: ``seed=None`` draws a fresh seed in each process, and the ranks
would diverge (the caller, e.g. the client, should pick the seed once and send it with the request).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mpkv.errors import BadTask


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    seed: int | None = None  # None: a random seed (temperature > 0 only)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise BadTask(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise BadTask(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The request's own generator (None for greedy requests: they draw nothing)."""
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of ``logits`` [batch, vocab]; int64 [batch]."""
    out = logits.argmax(dim=-1)
    for i, (p, g) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            out[i] = sample(logits[i], p, g)
    return out


def sample(logits: torch.Tensor, params: SamplingParams, g: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = _top_p(probs, params.top_p)
    return torch.multinomial(probs, 1, generator=g)[0]


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the nucleus: a token stays if the tokens more likely than it hold less than
    ``top_p`` (so the most likely one always stays)."""
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered
    ordered = torch.where(before < top_p, ordered, torch.zeros_like(ordered))
    return torch.zeros_like(probs).scatter(-1, order, ordered)
