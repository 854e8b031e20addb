"""A shared-memory sum all-reduce among the tensor-parallel ranks of one instance (one process per rank).

The model takes its all-reduce as a callable ``all_reduce(tensor) -> None`` (in place, sum over ranks);
``AllReduce`` is one. On the cpu backend it replaces torch.distributed's gloo, whose loopback sockets cost far
more than a decode step's tensors are worth moving (``python -m mpkv.bench.allreduce`` measures both).

Protocol, per generation g (one per call, or per piece of a tensor larger than ``max_bytes``):

1. rank r copies its partial into its own buffer of parity g % 2 (nobody else writes it: invariant I1);
2. it arrives at the barrier with the key (elements, dtype) and waits until every rank arrived at g. The
   barrier's wait is bounded, checks the liveness of the ranks it still waits for and names the late or dead
   one (invariant I2); ranks that reduce different sizes or dtypes get a ProtocolError naming both ranks and
   both keys, not a sum of unrelated bytes (invariant I4);
3. it sums the buffers of parity g % 2 of ranks 0, 1, ..., tp - 1, in that order, into the caller's tensor:
   every rank adds the same bytes in the same order, so every rank gets the same bits.

Why two buffers per rank are enough (no second arrival phase): a rank writes the buffer of parity g % 2 again
only at generation g + 2, after it passed the barrier of g + 1; every rank arrived at g + 1 only after it had
finished summing generation g. So no rank overwrites a buffer another rank may still read. The barrier's
release store of its generation, after the copy, and the waiter's acquire load of it, before the sum, order
the data.

A failed generation (a dead, late or disagreeing rank, or an interruption) leaves the ranks at different
generations: this side of the all-reduce is unusable from then on, and every later call says so, quoting the
first failure. The instance that uses it must be torn down, as after any dead actor.

Byte map: NOTE [ allreduce layout ] below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch

from mpkv import _native, layout
from mpkv.errors import AttachError, PeerDied, ProtocolError, WaitTimeout
from mpkv.layout import SegmentKind
from mpkv.shm.barrier import Barrier, BarrierKey
from mpkv.shm.registry import Registry
from mpkv.shm.segment import Segment
from mpkv.shm.waiting import DEFAULT_TIMEOUT_S, check_timeout

# NOTE [ allreduce layout ]
# A barrier segment (NOTE [ barrier layout ] in mpkv.layout) with two fields of its own in the barrier's
# parameter line and a data area after its rank lines. The creator writes line 0 once, before ``mark_ready``;
# everything after it is written per rank, by that rank only::
#
#     line 0            nranks u64 @0 (the barrier's) | max_bytes u64 @8 | magic u64 @16 (ALLREDUCE_MAGIC)
#     lines 1 ...       the barrier's line pair of each rank (arrived generation, key, claim)
#     data (DATA_OFF)   buffer (rank r, parity p) at data_off + (2 r + p) * stride, stride = max_bytes rounded
#                       up to a line; written only by rank r, at generations g with g % 2 == p
#
# The magic tells an all-reduce from a plain barrier (the messagers' ``sendbar`` has 0 there), so that neither
# is attached as the other by mistake.
_BASE = layout.SEGMENT_HEADER_BYTES
_MAX_BYTES = _BASE + 8
_MAGIC = _BASE + 16
ALLREDUCE_MAGIC = int.from_bytes(b"MPKVALLR", "little")
PARITIES = 2
MAX_RANKS = 256  # the barrier's own limit
MAX_PLANS = 64  # (dtype, shape) plans kept per rank


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def data_offset(nranks: int) -> int:
    """Where the data area starts in the payload: after the parameter line and the barrier's rank lines."""
    return layout.LINE_BYTES + nranks * layout.BARRIER_RANK_BYTES


def buffer_stride(max_bytes: int) -> int:
    return _round_up(max_bytes, layout.LINE_BYTES)


def payload_bytes(nranks: int, max_bytes: int) -> int:
    return data_offset(nranks) + nranks * PARITIES * buffer_stride(max_bytes)


def create_allreduce(registry: Registry, obj: str, nranks: int, max_bytes: int) -> Segment:
    """Create the all-reduce of ``nranks`` ranks (the launcher, one per instance). ``max_bytes``: the largest
    piece reduced in one generation (hidden * max tokens * element size is one generation per layer's
    reduction); a larger tensor is reduced in pieces."""
    if not 1 <= nranks <= MAX_RANKS:
        raise ValueError(f"an all-reduce has 1 to {MAX_RANKS} ranks, got {nranks}")
    if max_bytes < 16 or max_bytes % 16:
        raise ValueError(f"max_bytes must be a positive multiple of 16 (any float element size), got {max_bytes}")
    seg = registry.create_segment(obj, SegmentKind.BARRIER, payload_bytes(nranks, max_bytes))
    _native.store_u64(seg.buf, _BASE, nranks)
    _native.store_u64(seg.buf, _MAX_BYTES, max_bytes)
    _native.store_u64(seg.buf, _MAGIC, ALLREDUCE_MAGIC)
    seg.mark_ready()
    return seg


@dataclass(frozen=True)
class _Plan:
    """What one (dtype, shape) needs per generation, made once: a view costs more than summing a decode step's
    tensor, and a decode step reduces the same few shapes every layer."""

    key: BarrierKey  # (elements, dtype): ranks that reduce different things disagree here, by name (I4)
    views: tuple[tuple[torch.Tensor, ...], ...]  # [parity][rank]: the buffers, typed and shaped as the tensor


class AllReduce:
    """Rank ``rank``'s side of the all-reduce ``name``; ``all_reduce(tensor)`` sums ``tensor`` over the ranks, in
    place. One process per rank (the barrier's claim refuses a second live one). ``between`` runs between
    liveness slices of a wait longer than a slice: a caller's duties that must not wait for the collective (the
    worker's heartbeat, its published wait record)."""

    def __init__(
        self,
        name: str,
        rank: int,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        between: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.rank = rank
        self.timeout_s = check_timeout(timeout_s)
        self._between = between
        self._barrier = Barrier(name, rank, label=f"allreduce:r{rank}")
        try:
            self.nranks = self._barrier.nranks
            self.max_bytes = self._read_params()
            self._raw = self._map_buffers()
        except BaseException:
            self._barrier.close()
            raise
        self._plans: dict[tuple[torch.dtype, torch.Size], _Plan] = {}
        self._broken: str | None = None

    def _read_params(self) -> int:
        buf = self._barrier.seg.buf
        if _native.load_u64(buf, _MAGIC) != ALLREDUCE_MAGIC:
            raise AttachError(f"{self.name} is a barrier but not an all-reduce (no all-reduce magic)")
        max_bytes = int(_native.load_u64(buf, _MAX_BYTES))
        want = payload_bytes(self.nranks, max_bytes)
        have = len(self._barrier.seg.payload)
        if max_bytes <= 0 or have != want:
            raise AttachError(
                f"all-reduce {self.name}: {have} payload bytes, but {self.nranks} ranks of {max_bytes} B need {want}"
            )
        return max_bytes

    def _map_buffers(self) -> list[list[torch.Tensor]]:
        """Byte views of every (parity, rank) buffer. Through numpy on purpose (as the cpu pool does): its buffer
        export keeps the mapping from being closed under a live view (``close`` drops them first)."""
        whole = torch.from_numpy(np.frombuffer(self._barrier.seg.payload, dtype=np.uint8))
        stride, base = buffer_stride(self.max_bytes), data_offset(self.nranks)
        return [
            [whole[base + (2 * r + p) * stride :][: self.max_bytes] for r in range(self.nranks)]
            for p in range(PARITIES)
        ]

    def _plan(self, tensor: torch.Tensor) -> _Plan:
        """The plan of a contiguous tensor of at most ``max_bytes``. Bounded: a prefill of many lengths makes as
        many shapes, and the plans are cheap to make again."""
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        nbytes = tensor.numel() * tensor.element_size()
        views = tuple(
            tuple(raw[:nbytes].view(tensor.dtype).view(tensor.shape) for raw in parity) for parity in self._raw
        )
        plan = _Plan(BarrierKey(tensor.numel(), str(tensor.dtype).removeprefix("torch.")), views)
        self._plans[(tensor.dtype, tensor.shape)] = plan
        return plan

    @property
    def generation(self) -> int:
        """Generations completed (or failed) so far by this rank."""
        return self._barrier.generation

    def __call__(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the ranks, in place. Every rank must call it with the same number of elements and
        dtype, in the same order (invariant I4); the result has the same bits on every rank."""
        if self._broken is not None:
            raise self._unusable()
        plan = self._plans.get((tensor.dtype, tensor.shape))
        if plan is not None and tensor.is_cpu and tensor.is_contiguous():
            self._reduce(plan, tensor)  # the decode path: a shape seen before, one generation
        else:
            self._reduce_any(tensor)

    def _reduce_any(self, tensor: torch.Tensor) -> None:
        """Check the tensor; reduce it whole if it fits a buffer, else a contiguous copy in pieces (a generation
        each: every rank cuts the same pieces, I4)."""
        if not tensor.is_floating_point():
            raise ValueError(f"all-reduce sums floating-point tensors, got {tensor.dtype}")
        if not tensor.is_cpu:
            raise ValueError(f"the shared-memory all-reduce works on cpu tensors, got {tensor.device} (use NCCL)")
        if self.nranks == 1 or tensor.numel() == 0:
            return  # every rank has the same size (I4): none of them enters a generation
        if tensor.is_contiguous() and tensor.numel() * tensor.element_size() <= self.max_bytes:
            self._reduce(self._plan(tensor), tensor)
            return
        strided = not tensor.is_contiguous()
        flat = tensor.contiguous().view(-1)
        per_piece = self.max_bytes // tensor.element_size()
        for start in range(0, flat.numel(), per_piece):
            piece = flat[start : start + per_piece]
            self._reduce(self._plans.get((piece.dtype, piece.shape)) or self._plan(piece), piece)
        if strided:  # the sum went into a contiguous copy: write it back
            tensor.copy_(flat.view(tensor.shape))

    def _reduce(self, plan: _Plan, tensor: torch.Tensor) -> None:
        """One generation: publish our partial, meet the others, sum every rank's in rank order."""
        views = plan.views[(self._barrier.generation + 1) % PARITIES]
        views[self.rank].copy_(tensor)
        try:
            self._barrier.wait(plan.key, timeout_s=self.timeout_s, between=self._between)
        except BaseException as e:
            self._fail(e, plan.key)
        torch.add(views[0], views[1], out=tensor)
        for view in views[2:]:
            tensor.add_(view)

    def _fail(self, e: BaseException, key: BarrierKey) -> NoReturn:
        """Mark this side unusable (the barrier counted our arrival) and re-raise, saying which reduction."""
        what = f"generation {self._barrier.generation} ({key.seq} x {key.tag})"
        self._broken = f"{what} failed: {type(e).__name__}: {e}"
        if isinstance(e, (PeerDied, WaitTimeout, ProtocolError)):
            raise type(e)(f"all-reduce rank {self.rank}, {what}: {e}") from None
        raise e

    def _unusable(self) -> ProtocolError:
        return ProtocolError(
            f"all-reduce {self.name} rank {self.rank} is unusable since {self._broken}; the ranks are no longer at "
            "the same generation (tear the instance down)"
        )

    @property
    def waiting_for(self) -> list[int]:
        """During a wait (from ``between``): the ranks that have not arrived yet."""
        return list(self._barrier.pending)

    def close(self) -> None:
        """Drop the views, then unmap. Idempotent. The creator (the launcher's registry) unlinks the name."""
        self._plans.clear()
        self._raw = []
        try:
            self._barrier.close()
        except BufferError:
            # The views never leave this object, so only the traceback of a failed call (its frames) can still
            # hold one: the mapping then goes with the last of them. Raising here would hide that call's error
            # behind this one in the caller's ``finally``.
            pass

    def __enter__(self) -> AllReduce:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
