"""Validation of a task's inputs, before anything is written or copied: block and slot ids (range, duplicates,
count), token ids, request names. The client checks them before a task enters a ring; the actors check them
again before they use them (another writer of the ring may be buggy), and fail that task, never themselves.
Errors name the bad values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mpkv.errors import BadBlocks, BadRequest, BadTask, MpkvError  # noqa: F401 (re-exported)
from mpkv.protocol import DecodeItem, PrefillItem

MAX_REQUEST_CHARS = 256  # a request's name travels in every task and completion, and shows in errors and logs
TOKEN_ID_LIMIT = 2**31  # token ids travel as int32


def int_array(values: object, what: str, error: type[BadTask] = BadTask) -> np.ndarray:
    """``values`` as a 1-D int64 array, refusing anything that is not integers already: a float, even a whole
    one, a bool or a string would otherwise be truncated or reinterpreted without a word."""
    try:
        arr = np.asarray(values)
    except Exception as e:  # ragged lists, objects that refuse conversion
        raise error(f"{what} must be a 1-D array of integers; {type(values).__name__} does not convert: {e}") from None
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or (arr.size == 0 and arr.dtype != object)):
        hint = "; cast whole numbers with .astype(np.int32)" if np.issubdtype(arr.dtype, np.floating) else ""
        raise error(f"{what} must be a 1-D array of integers, got shape {arr.shape} of {arr.dtype}{hint}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        raise error(f"{what} {int(arr.max())} out of range")
    return arr.astype(np.int64)


def check_ids(ids: object, limit: int, what: str) -> np.ndarray:
    """``ids`` as an int64 array, after checking 0 <= id < limit and no duplicates."""
    arr = int_array(ids, what, BadBlocks)
    if arr.size == 0:
        return arr
    ordered = np.sort(arr)  # on the hot path of every task: a sort, not np.unique (ten times slower here)
    if ordered[0] < 0 or ordered[-1] >= limit:
        bad = ordered[(ordered < 0) | (ordered >= limit)]
        raise BadBlocks(f"{what} {sorted(set(bad.tolist()))[:8]} out of range: valid ids are 0..{limit - 1}")
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if repeated.size:
        raise BadBlocks(f"{what} {sorted(set(repeated.tolist()))[:8]} appear more than once")
    return arr


def check_tokens(tokens: object, vocab: int, block_size: int, n_blocks: int, what: str) -> np.ndarray:
    """``tokens`` as an int32 array of 1 or more ids in 0..vocab-1, exactly filling ``n_blocks`` blocks (the
    last one partly)."""
    arr = int_array(tokens, f"{what}: tokens")
    if arr.size == 0:
        raise BadTask(f"{what}: no tokens; a prefill needs at least one")
    low, high = int(arr.min()), int(arr.max())
    if low < 0 or high >= min(vocab, TOKEN_ID_LIMIT):
        raise BadTask(f"{what}: token id {low if low < 0 else high} out of range: valid ids are 0..{vocab - 1}")
    need = -(-arr.size // block_size)
    if n_blocks != need:
        raise BadTask(f"{what}: {arr.size} tokens need {need} blocks of {block_size}, got {n_blocks}")
    return arr.astype(np.int32)


def check_request(request: object) -> str:
    """A request's name: a non-empty printable str of at most MAX_REQUEST_CHARS characters."""
    if not isinstance(request, str):
        raise BadRequest(f"a request's name must be a str, got {type(request).__name__} {request!r:.80}")
    if not 0 < len(request) <= MAX_REQUEST_CHARS or not request.isprintable():
        raise BadTask(
            f"a request's name must be 1..{MAX_REQUEST_CHARS} printable characters, got {len(request)} "
            f"characters: {request!r:.80}"
        )
    return str(request)


def check_flag(value: object, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise BadRequest(f"{what} must be True or False, got {type(value).__name__} {value!r:.80}")
    return bool(value)


def check_sampling(temperature: object, top_p: object, seed: object, what: str) -> None:
    """Sampling values a model can use: temperature >= 0 (0: greedy), 0 < top_p <= 1, 0 <= seed < 2**63."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadTask(f"{what}: {name} must be a finite number, got {value!r:.40}")
    if not float(temperature) >= 0:  # type: ignore[arg-type]
        raise BadTask(f"{what}: temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < float(top_p) <= 1:  # type: ignore[arg-type]
        raise BadTask(f"{what}: top_p must be in (0, 1], got {top_p}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise BadTask(f"{what}: seed must be an integer in 0..2**63-1, got {seed!r:.40}")


def check_decode_item(
    request: object, token: object, position: object, blocks: object, vocab: int, block_size: int, n_blocks: int
) -> tuple[str, int, int, np.ndarray]:
    """One request of a decode step: its name, a token id in the vocabulary, a position >= 0 (the tokens whose K/V
    are in the pool already) and the block table up to the block of that position, exactly."""
    request = check_request(request)
    what = f"decode {request!r:.80}"
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= int(token) < vocab:
        raise BadTask(f"{what}: token id {token!r:.40} out of range: valid ids are 0..{vocab - 1}")
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)) or int(position) < 0:
        raise BadTask(f"{what}: position must be an integer >= 0 (the tokens already in the pool), got {position!r}")
    ids = check_ids(blocks, n_blocks, f"{what}: device blocks")
    need = int(position) // block_size + 1
    if len(ids) != need:
        raise BadTask(
            f"{what}: the token at position {position} needs a block table of {need} blocks of {block_size}, "
            f"got {len(ids)}"
        )
    return request, int(token), int(position), ids


def checked_decode_step(items: Sequence[DecodeItem], vocab: int, block_size: int, n_blocks: int) -> list[DecodeItem]:
    """A decode step's items, each checked (``check_decode_item``, ``check_sampling``), with no block in two of them;
    blocks as int32 (as the task carries them)."""
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, DecodeItem) for i in items):
        raise BadTask(f"a decode step is a non-empty list of mpkv.DecodeItem, got {items!r:.80}")
    checked = []
    for it in items:
        request, token, position, ids = check_decode_item(
            it.request, it.token, it.position, it.blocks, vocab, block_size, n_blocks
        )
        check_sampling(it.sampling.temperature, it.sampling.top_p, it.sampling.seed, f"decode {request!r}")
        checked.append(DecodeItem(request, token, position, ids.astype(np.int32), it.sampling))
    check_ids(np.concatenate([it.blocks for it in checked]), n_blocks, "decode step: device blocks")
    return checked


def checked_prefill_batch(
    items: Sequence[PrefillItem], vocab: int, block_size: int, n_blocks: int
) -> list[PrefillItem]:
    """A batched prefill's items, each checked (request, blocks, tokens filling them, sampling), with no block in
    two of them."""
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(i, PrefillItem) for i in items):
        raise BadTask(f"a batched prefill is a non-empty list of mpkv.PrefillItem, got {items!r:.80}")
    checked = []
    for it in items:
        request = check_request(it.request)
        ids = check_ids(it.blocks, n_blocks, f"prefill {request!r}: device blocks").astype(np.int32)
        toks = check_tokens(it.tokens, vocab, block_size, len(ids), f"prefill {request!r}")
        check_sampling(it.sampling.temperature, it.sampling.top_p, it.sampling.seed, f"prefill {request!r}")
        checked.append(PrefillItem(request, toks, ids, it.sampling))
    check_ids(np.concatenate([it.blocks for it in checked]), n_blocks, "prefill batch: device blocks")
    return checked
