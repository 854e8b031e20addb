"""`mpkv.Client`: the engine's side of an instance: submit tasks, collect every rank's completion.

Tasks go through one broadcast ring per role, read by every rank in the same order (invariant I4: the task stream
is the only thing that decides what ranks do). A task is complete when every rank reported; it succeeded only if
every rank succeeded: a task that failed on one rank is failed, with each rank's reason. While the instance is
paused or cleared, new tasks are refused here, with the reason; tasks that raced with a pause are finished or
failed explicitly by the actors.

Prefill/decode: the engine holds a request until the decode instance granted its destination blocks
(``decode.allocate``: a lease), then sends it in a batch it fixes (``prefill.send(decode, batch)``): one task
that every prefill worker runs and every prefill messager ships, layer by layer. ``wait_send`` completes the
leases only if every worker and every messager of every rank succeeded; otherwise it fails them with each
rank's reason. Only then may the caller reuse the source blocks, and the decode side read the destination.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import os
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpkv import generation
from mpkv.allocator import BlockAllocator
from mpkv.blocks import (
    BadBlocks,
    BadRequest,
    BadTask,
    check_flag,
    check_ids,
    check_request,
    check_sampling,
    check_tokens,
    checked_decode_step,
    checked_prefill_batch,
)
from mpkv.errors import BadTicket, InstanceNotServing, MpkvError, PeerDied, TaskFailed, TransferFailed, WaitTimeout
from mpkv.generation import Generated
from mpkv.instance import CONTROL_COMMAND, CONTROL_FENCE, TASK_ROLES, Instance
from mpkv.pd.leases import Allocator, Lease, LeaseError
from mpkv.protocol import (
    DONE_CODEC,
    ROLES,
    TASK_CODEC,
    ActorState,
    Cmd,
    Decode,
    DecodeItem,
    Done,
    LeaseState,
    PdRole,
    Prefill,
    PrefillBatch,
    PrefillItem,
    PrefillSend,
    ReadBlocks,
    Role,
    Sampling,
    SendItem,
    SwapIn,
    SwapOut,
    actor_slot,
)
from mpkv.shm.ring import RingReader, RingWriter

SUBMIT_LOCK_S = 120.0  # a put may block 60 s on a full ring: twice that is a submission that hangs


# NOTE [ a swap's wait spins for its expected time ]
# A process asleep on a futex costs ~0.1-0.3 ms to wake on this VM (an inter-processor interrupt; an exit to the
# hypervisor), as much as the copy of a few MiB. So a wait for a swap may first spin (yielding the core) until about
# when the swap should be done, then sleep in the ring's bounded wait as any wait does. The expected time is the
# swap's bytes over this client's swap rate, learned from the swaps it waited for (their latency from submission
# to completion, so it covers the hand-over too); it starts from MPKV_COPY_GBPS. A spin ends as soon as the
# completion is there; it is capped by MPKV_SWAP_SPIN_US, and off (0) by default: measured on the 2-core VM
# shared with other work (2026-12-02; 8 runs, each interleaving swaps of 4 or 16 MiB with and without the spin,
# against a memcpy in the same round), the spinning client took CPU from the transfer manager's copy: swap-in was
# slower with the spin in 7 runs of 8 (16 MiB: 0.65x memcpy against 0.80x), swap-out no better (0.18-0.81x
# against 0.38-0.80x). On a machine with a core to spare it may pay: MPKV_SWAP_SPIN_US=10000 turns it on.
def _knob(name: str, default: str, low: float, high: float, unit: str) -> float:
    """An environment knob: a finite number in [low, high], or an error that says which and why."""
    raw = os.environ.get(name, default)
    try:
        x = float(raw)
    except ValueError:
        x = math.nan
    if not (math.isfinite(x) and low <= x <= high):
        raise ValueError(f"{name}={raw!r}: expected a number of {unit} from {low:g} to {high:g}")
    return x


COPY_RATE_DEFAULT = _knob("MPKV_COPY_GBPS", "2", 0.01, 1000, "GB/s") * 1e9  # bytes/s before any swap was measured
SPIN_MARGIN = 2.0  # spin up to this many expected times: a swap's latency varies with the machine's load
# At most this long (0: never spin). Capped at 0.1 s: a spin checks nobody's liveness, so it never outlasts
# the slice after which every other wait looks (LIVENESS_SLICE_S).
SPIN_CAP_S = _knob("MPKV_SWAP_SPIN_US", "0", 0, 100_000, "microseconds") * 1e-6


@dataclass(frozen=True)
class Ticket:
    role: Role
    seq: int
    what: str
    also: tuple[Role, ...] = ()  # other roles that complete the same task (a PD batch: the messagers)
    dest: Client | None = None  # a PD batch: the decode instance's client, and the leases it granted
    leases: tuple[Lease, ...] = ()
    moved: int = 0  # a swap: bytes each rank copies (NOTE [ a swap's wait spins for its expected time ])
    parts: tuple[int, ...] = ()  # a batch of swap-outs: each request's number of blocks, in order
    submitted: float = 0.0  # time.monotonic() when it was submitted


class Client:
    def __init__(self, name: str) -> None:
        self.inst = Instance.attach(name)
        self.name, self.cfg = name, self.inst.cfg
        self._tasks: dict[Role, RingWriter] = {}
        self._submitting = threading.Lock()
        self._done: dict[tuple[Role, int], RingReader] = {}
        self._early: dict[tuple[Role, int], dict[int, Done]] = {}
        self._allocator: Allocator | None = None
        self._blocks: BlockAllocator | None = None
        self._sends: dict[int, dict[tuple[Role, int], Done]] = {}  # PD batches not settled yet
        try:
            for role in TASK_ROLES:
                self._tasks[role] = RingWriter(self.inst.task_ring(role), label="client")
            for (role, r), ring in self.inst.topology.done_rings().items():  # every actor that answers tasks
                reader = RingReader(self.inst.name_of(ring.obj), 0, label="client")
                while reader.try_get() is not None:  # completions of an earlier client's tasks
                    pass
                self._done[(role, r)] = reader
                self._early[(role, r)] = {}
        except BaseException:
            self.close()
            raise
        # Sequence numbers carry a per-client session in their top 32 bits: a completion of an earlier client's
        # task (still in flight when it closed) can never be taken for one of ours.
        self._session = secrets.randbits(31) + 1
        self._seq = itertools.count((self._session << 32) + 1)
        self._swap_rate = COPY_RATE_DEFAULT  # bytes/s (NOTE [ a swap's wait spins for its expected time ])

    # -- tasks --------------------------------------------------------------------------------------------------
    # Every argument is checked (mpkv.blocks) before anything is written to a ring: a bad one raises a BadTask
    # (a ValueError; BadRequest, a TypeError, for a wrong type) and submits nothing.
    def prefill(
        self,
        request: str,
        tokens: np.ndarray,
        blocks: np.ndarray,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> Ticket:
        """Run the model on ``tokens`` (a whole prompt), writing their K/V into ``blocks`` (ceil(len / block_size)
        of them, in order); ``tokens_of(wait(ticket))`` is the request's first generated token."""
        request = check_request(request)
        ids = self._ids(blocks, self.cfg.device_blocks, "device blocks")
        toks = check_tokens(tokens, self.cfg.vocab, self.cfg.block_size, len(ids), f"prefill {request!r}")
        check_sampling(temperature, top_p, seed, f"prefill {request!r}")
        task = Prefill(next(self._seq), request, toks, ids, Sampling(float(temperature), float(top_p), seed))
        return self._submit(Role.WORKER, task, f"prefill {request!r}")

    def prefill_batch(self, items: Sequence[PrefillItem]) -> Ticket:
        """Prefill several requests in one task (one forward over all their tokens): each item's tokens into its
        blocks (ceil(len / block_size) of them; no block in two items); ``tokens_of(wait(ticket))`` holds each
        request's first generated token, in order."""
        checked = checked_prefill_batch(items, self.cfg.vocab, self.cfg.block_size, self.cfg.device_blocks)
        task = PrefillBatch(next(self._seq), checked)
        return self._submit(Role.WORKER, task, f"prefill of {len(checked)} requests")

    def decode(self, items: Sequence[DecodeItem]) -> Ticket:
        """One decode step of running requests: each item's ``token`` goes at its ``position`` (its tokens already
        in the pool), its K/V written through ``blocks`` (its block table up to that position's block);
        ``tokens_of(wait(ticket))`` holds each item's next token, in order."""
        checked = checked_decode_step(items, self.cfg.vocab, self.cfg.block_size, self.cfg.device_blocks)
        every = np.concatenate([it.blocks for it in checked])
        if self._allocator is not None:
            self._allocator.check_readable(every)
        task = Decode(next(self._seq), checked)
        return self._submit(Role.WORKER, task, f"decode step of {len(checked)} requests")

    @staticmethod
    def tokens_of(dones: list[Done]) -> np.ndarray:
        """The tokens of a prefill's or decode step's completions (int32, one per request): every rank computed
        them from the same logits, so they agree, or something broke rank uniformity and this says so."""
        first = dones[0].tokens
        if first is None:
            raise MpkvError(f"task {dones[0].seq}: its completions carry no tokens (not a prefill or decode step)")
        for d in dones[1:]:
            if d.tokens is None or not np.array_equal(d.tokens, first):
                raise MpkvError(
                    f"task {d.seq}: rank {d.rank} answered tokens {d.tokens}, rank {dones[0].rank} {first}: the "
                    "ranks diverged (their logits differ: ranks holding different weights, or a bug in the model's "
                    "tensor parallelism)"
                )
        return first

    @property
    def blocks(self) -> BlockAllocator:
        """This instance's device blocks as this client allocates them (on a decode instance, the same free list
        its leases come from). One client per instance should allocate: two clients would hand out the same
        blocks."""
        if self.cfg.pd_role == PdRole.DECODE:
            return self.allocator.blocks
        if self._blocks is None:
            self._blocks = BlockAllocator(self.cfg.device_blocks, self.name)
        return self._blocks

    def generate(
        self,
        prompts: Sequence[Sequence[int] | np.ndarray],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        seed: int | None = None,
        prefill_on: Client | None = None,
        top_p: float = 1.0,
        timeout_s: float = 60.0,
    ) -> Generated:
        """The ``max_new_tokens`` tokens generated after each prompt (a prompt: token ids), int32, as a list whose
        ``weight_version`` says which weights computed them. Greedy unless
        ``temperature > 0``; then prompt i draws with seed ``seed + i`` (``seed=None``: a fresh one), the same on
        every rank and instance. Blocks come from ``self.blocks``; prompts run together as far as the pool holds
        them, the rest in later rounds. ``prefill_on=Client(prefill instance)`` on a decode instance: prompts are
        prefilled there and shipped here layer by layer, then decoded here. Every task's completions must carry
        one weight version: a restore in between is an error, never tokens from KV of two versions."""
        gen = generation.plan(self, prompts, max_new_tokens, temperature, top_p, seed, prefill_on, timeout_s)
        return gen.run(float(timeout_s))

    def swap_out(self, blocks: np.ndarray) -> Ticket:
        ids = self._ids(blocks, self.cfg.device_blocks, "device blocks")
        return self._submit(Role.TRANSFER, SwapOut(next(self._seq), ids), "swap-out", moved=len(ids))

    def swap_in(self, slots: np.ndarray, blocks: np.ndarray, free_slots: bool = True) -> Ticket:
        ids = self._ids(blocks, self.cfg.device_blocks, "device blocks")
        host = self._ids(slots, self.cfg.host_blocks, "host slots")
        if len(host) != len(ids):
            raise BadBlocks(f"swap-in: {len(host)} host slots for {len(ids)} device blocks")
        task = SwapIn(next(self._seq), host, ids, check_flag(free_slots, "swap_in's free_slots"))
        return self._submit(Role.TRANSFER, task, "swap-in", moved=len(ids))

    # A batch of swaps is one task: one hand-over to the transfer manager and one completion for all its requests,
    # where separate tasks pay a wake-up each way per request (~0.1-0.3 ms on a VM, as much as copying a few MiB).
    # Every request is checked, and the whole batch (no block or slot in two requests), before anything is submitted.
    def swap_out_batch(self, requests: Sequence[np.ndarray]) -> Ticket:
        """Swap out several requests' device blocks as one task; ``slots_of(ticket, wait(ticket))`` gives each
        request's host slots, in order (as ``swap_out``'s completion gives one request's)."""
        parts = self._batch(requests, "swap-out batch")
        ids = [self._ids(b, self.cfg.device_blocks, f"swap-out batch, request {i}: device blocks") for i, b in parts]
        every = self._whole(ids, self.cfg.device_blocks, "swap-out batch: device blocks")
        task = SwapOut(next(self._seq), every)
        ticket = self._submit(Role.TRANSFER, task, f"swap-out of {len(ids)} requests", moved=len(every))
        return dataclasses.replace(ticket, parts=tuple(len(i) for i in ids))

    def swap_in_batch(self, requests: Sequence[tuple[np.ndarray, np.ndarray]], free_slots: bool = True) -> Ticket:
        """Swap in several requests as one task: each (host slots, device blocks) as ``swap_in`` takes them."""
        parts = self._batch(requests, "swap-in batch")
        slots, blocks = [], []
        for i, item in parts:
            if not isinstance(item, tuple) or len(item) != 2:
                raise BadTask(f"swap-in batch, request {i}: expected (host slots, device blocks), got {item!r:.80}")
            host = self._ids(item[0], self.cfg.host_blocks, f"swap-in batch, request {i}: host slots")
            ids = self._ids(item[1], self.cfg.device_blocks, f"swap-in batch, request {i}: device blocks")
            if len(host) != len(ids):
                raise BadBlocks(f"swap-in batch, request {i}: {len(host)} host slots for {len(ids)} device blocks")
            slots.append(host)
            blocks.append(ids)
        every_slot = self._whole(slots, self.cfg.host_blocks, "swap-in batch: host slots")
        every_block = self._whole(blocks, self.cfg.device_blocks, "swap-in batch: device blocks")
        task = SwapIn(next(self._seq), every_slot, every_block, check_flag(free_slots, "swap_in_batch's free_slots"))
        return self._submit(Role.TRANSFER, task, f"swap-in of {len(slots)} requests", moved=len(every_block))

    @staticmethod
    def _batch(requests: object, what: str) -> list[tuple[int, object]]:
        if not isinstance(requests, (list, tuple)) or not requests:
            raise BadTask(f"a {what} is a non-empty list of requests, got {requests!r:.80}")
        return list(enumerate(requests))

    def _whole(self, parts: list[np.ndarray], limit: int, what: str) -> np.ndarray:
        """The requests' ids as one task's: an id in two requests is refused (two copies into one place)."""
        return self._ids(np.concatenate(parts), limit, f"{what} (of all requests together)")

    @staticmethod
    def slots_of(ticket: Ticket, dones: list[Done]) -> list[np.ndarray]:
        """Each request's host slots from the completions of ``swap_out_batch``'s ``ticket``, in order. Every rank
        allocated the same slots (the same task stream), or something broke rank uniformity and this says so."""
        if not ticket.parts:
            raise BadTicket(f"{ticket.what} (task {ticket.seq}) is not a swap-out batch")
        if not (isinstance(dones, list) and dones and all(isinstance(d, Done) for d in dones)):
            raise BadTicket(
                f"{ticket.what} (task {ticket.seq}): slots_of takes the list of completions wait() returned"
            )
        if sorted(d.rank for d in dones) != list(range(len(dones))) or any(d.seq != ticket.seq for d in dones):
            got = sorted((d.seq, d.rank) for d in dones)
            raise BadTicket(
                f"{ticket.what} (task {ticket.seq}): slots_of takes this ticket's completions, one per rank; got "
                f"(task, rank) {got}"
            )
        first = dones[0].slots
        if first is None or len(first) != sum(ticket.parts):
            carried = "no" if first is None else len(first)
            raise BadTicket(
                f"{ticket.what} (task {ticket.seq}): its completion carries {carried} host slots, the batch asked for "
                f"{sum(ticket.parts)}"
            )
        for d in dones[1:]:
            if d.slots is None or not np.array_equal(d.slots, first):
                raise MpkvError(
                    f"task {d.seq}: rank {d.rank} allocated host slots {d.slots}, rank {dones[0].rank} {first}: the "
                    "ranks' host pools diverged"
                )
        return np.split(first, np.cumsum(ticket.parts)[:-1])

    def read_blocks(self, blocks: np.ndarray, host: bool = False) -> Ticket:
        host = check_flag(host, "read_blocks' host")
        what, limit = ("host slots", self.cfg.host_blocks) if host else ("device blocks", self.cfg.device_blocks)
        ids = self._ids(blocks, limit, what)
        if self._allocator is not None and not host:
            self._allocator.check_readable(ids)
        return self._submit(Role.TRANSFER, ReadBlocks(next(self._seq), ids, host), "read")

    @staticmethod
    def _ids(values: object, limit: int, what: str) -> np.ndarray:
        """Checked ids, as the int32 array the task carries."""
        return check_ids(values, limit, what).astype(np.int32)

    # -- prefill/decode -----------------------------------------------------------------------------------------
    @property
    def allocator(self) -> Allocator:
        """A decode instance's block allocator (this client becomes its one writer of leases)."""
        if self._allocator is None:
            self._allocator = Allocator(self.inst)
        return self._allocator

    def allocate(self, request: str, n_tokens: int) -> Lease:
        """Decode side: lease destination blocks for ``n_tokens`` of ``request``."""
        self.check_serving()
        return self.allocator.grant(request, -(-n_tokens // self.cfg.block_size))

    def send(
        self,
        dest: Client,
        batch: Sequence[
            tuple[str, np.ndarray, np.ndarray, Lease] | tuple[str, np.ndarray, np.ndarray, Lease, Sampling]
        ],
        layerwise: bool = True,
        via: str = "",
    ) -> Ticket:
        """Prefill side: prefill each (request, tokens, source blocks, lease) of ``batch`` here and ship it into
        the lease's blocks of ``dest``, layer by layer. The batch is one task: every rank runs the same.
        ``via="nixl://HOST:PORT"`` ships over NIXL to the decode instance's agents there (NOTE [ nixl path ]);
        by default the messagers map the decode pool on this host."""
        if self.cfg.pd_role != PdRole.PREFILL:
            raise LeaseError(
                f"instance {self.name} is a {self.cfg.pd_role.name.lower()} instance; send from a "
                "prefill instance (mpkv launch --role prefill)"
            )
        layerwise = check_flag(layerwise, "layerwise")
        if not isinstance(dest, Client) or not isinstance(via, str):
            raise BadRequest(f"send takes a decode Client and a str via, got {type(dest).__name__}, {via!r}")
        if not isinstance(batch, (list, tuple)) or not batch:
            raise BadTask(f"a batch is a non-empty list of (request, tokens, source blocks, lease), got {batch!r:.80}")
        for item in batch:
            if (
                not isinstance(item, tuple)
                or len(item) not in (4, 5)
                or not isinstance(item[3], Lease)
                or (len(item) == 5 and not isinstance(item[4], Sampling))
            ):
                raise BadTask(f"a batch item is (request, tokens, source blocks, lease[, Sampling]), got {item!r:.80}")
        if len({id(item[3]) for item in batch}) < len(batch):
            raise BadTask("every item of a batch needs a lease of its own (a lease is written by one transfer)")
        items = []
        dest.allocator.sync()  # a lease of a decode pool cleared since is retired now, and refused below
        for item in batch:
            request, tokens, blocks, lease = item[:4]
            sampling = item[4] if len(item) == 5 else Sampling()
            request = check_request(request)
            assert isinstance(lease, Lease) and isinstance(sampling, Sampling)  # checked above
            ids = self._ids(blocks, self.cfg.device_blocks, f"send {request!r}: source blocks")
            tokens = check_tokens(tokens, self.cfg.vocab, self.cfg.block_size, len(ids), f"send {request!r}")
            if dest.allocator.leases.get(lease.slot) is not lease or lease.state != LeaseState.GRANTED:
                raise LeaseError(
                    f"send {request!r}: lease {lease.slot} is not a lease in flight granted by {dest.name} "
                    f"({lease.retired or lease.state.name}); allocate a new one"
                )
            if len(lease.blocks) != len(ids):
                raise LeaseError(
                    f"send {request!r}: {len(ids)} source blocks for a lease of {len(lease.blocks)} blocks"
                )
            check_sampling(sampling.temperature, sampling.top_p, sampling.seed, f"send {request!r}")
            items.append(SendItem(request, tokens, ids, lease.blocks, lease.slot, lease.gen, lease.token, sampling))
        dest.check_serving()
        target = f"{via}/{dest.name}" if via else dest.name
        task = PrefillSend(next(self._seq), target, items, layerwise)
        ticket = self._submit(Role.WORKER, task, f"send of {len(items)} requests to {dest.name}")
        return Ticket(
            Role.WORKER, task.seq, ticket.what, also=(Role.MESSAGER,), dest=dest, leases=tuple(b[3] for b in batch)
        )

    def wait_send(self, ticket: Ticket, timeout_s: float = 60.0) -> list[Done]:
        """Every worker's and then every messager's completion of a PD batch, in rank order. Completes its
        leases in the decode instance only if all succeeded, with KV of the decode instance's weight version,
        into a pool still served; otherwise fails them with the reasons and raises TransferFailed.

        The messagers are waited for first: once each reported (or died), nothing writes the destination blocks
        any more. If one has not reported by the deadline, the leases fail but stay *in use* (release refuses)
        and the batch is not settled: the source blocks are still in use too. Call wait_send again to settle.
        ``timeout_s`` bounds the whole call: every rank is waited for to the same deadline."""
        timeout_s = self._check_wait(ticket, timeout_s, send=True)
        assert ticket.dest is not None, "wait_send takes the ticket of a send"
        deadline = time.monotonic() + timeout_s
        got = self._sends.setdefault(ticket.seq, {})  # (role, rank) -> its completion, or None: it died
        late: list[str] = []
        for role in (*ticket.also, ticket.role):
            for r in range(self.cfg.tp):
                if (role, r) in got:
                    continue
                try:  # past the deadline, a rank that reported is still collected; one that did not is late
                    self._collect(ticket, role, r, deadline, timeout_s)
                    got[(role, r)] = self._early[(role, r)].pop(ticket.seq)
                except PeerDied as e:  # a dead process writes nothing any more: settled, and failed
                    got[(role, r)] = Done(ticket.seq, r, error=str(e))
                except MpkvError as e:
                    late.append(f"{role.name.lower()} r{r}: {e}")
        dones = [got[(role, r)] for role in (ticket.role, *ticket.also) for r in range(self.cfg.tp) if (role, r) in got]
        reasons = [f"{role.name.lower()} r{r}: {d.error}" for (role, r), d in sorted(got.items()) if d.error]
        if not reasons and not late:
            wrong = {d.weight_version for (role, _), d in got.items() if role == ticket.role}
            for lease in ticket.leases:
                if wrong != {lease.weight_version}:
                    reasons.append(
                        f"the prefill workers produced KV of weight version {sorted(wrong)}, the decode instance "
                        f"serves weight version {lease.weight_version}: refusing stale KV"
                    )
                    break
        unsettled = [
            f"{role.name.lower()} r{r}"
            for role in (*ticket.also, ticket.role)
            for r in range(self.cfg.tp)
            if (role, r) not in got
        ]
        in_use = f"{', '.join(unsettled)} not settled (call wait_send again)" if unsettled else ""
        assert ticket.dest is not None  # a send's ticket (checked above)
        allocator = ticket.dest.allocator
        try:
            # The allocator settles each lease once: all complete, or all fail (a lease it retired when its pool
            # was cleared and restored stays as it is, and says why).
            if not reasons and not late:
                why = allocator.complete(list(ticket.leases))
                if not why:
                    return dones
                reasons.append(f"shipped, but {why}")
            writers = in_use if any(u.startswith("messager") for u in unsettled) else ""
            for lease in ticket.leases:
                allocator.fail(lease, "; ".join(reasons + late), in_use=writers)
        finally:
            if not unsettled:  # every rank reported: nothing more to collect, whatever happened above
                self._sends.pop(ticket.seq, None)
        extra = f"; its blocks are still in use: {in_use}" if in_use else ""
        raise TransferFailed(f"{ticket.what} (task {ticket.seq}) failed: {'; '.join(reasons + late)}{extra}", dones)

    def _submit(
        self,
        role: Role,
        task: Prefill | PrefillBatch | Decode | SwapOut | SwapIn | ReadBlocks | PrefillSend,
        what: str,
        moved: int = 0,
    ) -> Ticket:
        """``moved``: the blocks a swap copies on each rank, so that its wait can spin for its expected time."""
        ring = self._tasks[role]
        # The check and the put, as one step for a PAUSE or SHUTDOWN (NOTE [ submission gate ]); the gate is a flag,
        # so one thread at a time passes it.
        if not self._submitting.acquire(timeout=SUBMIT_LOCK_S):
            raise MpkvError(f"client of {self.name}: another thread's submission did not end in {SUBMIT_LOCK_S:g} s")
        try:
            with ring.gated():
                self.check_serving()
                ring.put(TASK_CODEC.encode(task), timeout_s=60)
        finally:
            self._submitting.release()
        return Ticket(role, task.seq, what, moved=moved * self.cfg.block_bytes, submitted=time.monotonic())

    def check_serving(self) -> None:
        """Refuse early when the instance is paused, cleared or broken, or a pause or shutdown is being issued."""
        cmd = self.inst.control.read(CONTROL_COMMAND)
        if cmd.value not in (Cmd.NONE, Cmd.RESUME):
            raise InstanceNotServing(
                f"instance {self.name} is not serving: the controller's last command is {cmd.value.name} "
                f"(epoch {cmd.epoch}); tasks are refused until resume"
            )
        for slot in CONTROL_FENCE.values():
            fence = self.inst.control.read_or_dead(slot)
            # A controller that died while closing the rings left its fence: it issues nothing any more (judged by
            # the fence's own writer: a later controller's claim does not revive it).
            if fence.value != Cmd.NONE and fence.epoch > cmd.epoch and fence.writer.alive():
                raise InstanceNotServing(
                    f"instance {self.name} is not serving: the controller is issuing {fence.value.name} "
                    f"(epoch {fence.epoch}); tasks are refused until resume"
                )
        for rank in range(self.cfg.tp):
            for role in ROLES:
                sig = self.inst.status.read(actor_slot(role, rank))
                if sig.value in (ActorState.FAILED, ActorState.STOPPED):
                    raise InstanceNotServing(f"instance {self.name}: {role.name.lower()} r{rank} has {sig.value.name}")
                if cmd.value == Cmd.NONE and sig.value != ActorState.READY:
                    # Still starting: a rank without its pool (or weights) yet would refuse a task that the
                    # others run, and ranks must run the same tasks (I4: a model's collectives pair them up).
                    raise InstanceNotServing(
                        f"instance {self.name} is starting: {role.name.lower()} r{rank} is {sig.value.name}; "
                        "tasks are taken once every actor is READY (mpkv.launch and `mpkv launch` wait for that)"
                    )

    # -- completions ---------------------------------------------------------------------------------------------
    def wait(self, ticket: Ticket, timeout_s: float = 60.0) -> list[Done]:
        """Every rank's completion of ``ticket``, in rank order; raises TaskFailed if any rank failed.

        A wait that times out loses nothing: the completions it read stay in ``_early`` (per rank ring, keyed by
        task), and are taken out only once every rank's is there. Wait again to collect the rest."""
        timeout_s = self._check_wait(ticket, timeout_s, send=False)
        deadline = time.monotonic() + timeout_s
        spin_until = self._spin_until(ticket)
        waited = False
        for r in range(self.cfg.tp):
            waited |= self._collect(ticket, ticket.role, r, deadline, timeout_s, spin_until)
        if waited and ticket.moved:
            self._learn_rate(ticket.moved, time.monotonic() - ticket.submitted)
        dones = [self._early[(ticket.role, r)].pop(ticket.seq) for r in range(self.cfg.tp)]
        bad = [d for d in dones if d.error]
        if bad:
            reasons = "; ".join(f"rank {d.rank}: {d.error}" for d in bad)
            raise TaskFailed(
                f"{ticket.what} (task {ticket.seq}) failed on {len(bad)} of {len(dones)} ranks: {reasons}", dones
            )
        return dones

    def _spin_until(self, ticket: Ticket) -> float:
        """When a wait for ``ticket`` stops spinning and may sleep (NOTE [ a swap's wait spins for its expected
        time ]); 0 for a task that is no swap."""
        if not ticket.moved or not SPIN_CAP_S:
            return 0.0
        return ticket.submitted + min(SPIN_MARGIN * ticket.moved / self._swap_rate, SPIN_CAP_S)

    def _learn_rate(self, moved: int, latency_s: float) -> None:
        """Fold one swap's bytes over its latency into the rate (a moving average: one slow swap, preempted,
        moves it a quarter of the way)."""
        if latency_s > 0:
            self._swap_rate = 0.75 * self._swap_rate + 0.25 * moved / latency_s

    def _collect(
        self, ticket: Ticket, role: Role, rank: int, deadline: float, timeout_s: float, spin_until: float = 0.0
    ) -> bool:
        """Read (role, rank)'s completion ring until ``ticket``'s completion is in ``_early``. Every completion
        read is kept there, ours or another ticket's (the caller may wait for its tickets in any order), until
        the caller takes it out; a timeout leaves it all in place. Spins up to ``spin_until`` (time.monotonic())
        before it may sleep. Returns whether it had to wait (the completion was not there yet)."""
        key = (role, rank)
        early, ring = self._early[key], self._done[key]
        waited = False
        while ticket.seq not in early:
            raw = ring.try_get()
            if raw is None:
                waited = True
                spin = min(spin_until, deadline) - time.monotonic()
                if spin > 0:  # yielding, and short (SPIN_CAP_S); then the bounded wait below, asleep if need be
                    ring.spin_for(spin)
                raw = self._get(ticket, role, rank, ring, deadline, timeout_s)
            done = DONE_CODEC.decode(raw)
            if done.seq >> 32 == self._session:  # else: an earlier client's, dropped
                early[done.seq] = done
        return waited

    def _get(self, ticket: Ticket, role: Role, rank: int, ring: RingReader, deadline: float, timeout_s: float) -> bytes:
        """The next completion on (role, rank)'s ring, waited for up to ``deadline``."""
        left = deadline - time.monotonic()
        try:
            # Past the deadline (one for all the ranks of the caller's wait, which an earlier rank may have used
            # up), only a glance: what is in the ring is still read, and a writer that died still named.
            return ring.get(timeout_s=max(left, 1e-6))
        except PeerDied as e:
            raise PeerDied(f"{ticket.what} (task {ticket.seq}) lost: {self.inst.culprits()}. ({e})") from None
        except WaitTimeout as e:
            why = "its completion ring was still empty, past the one deadline of this wait" if left <= 0 else e
            raise WaitTimeout(
                f"{ticket.what} (task {ticket.seq}): no completion from {role.name.lower()} r{rank} within "
                f"{timeout_s:g} s ({why}); the completions read so far are kept: wait again to collect them"
            ) from None

    def _check_wait(self, ticket: object, timeout_s: object, send: bool) -> float:
        """Refuse what is not a ticket this client issued (waiting for it could only time out), a send's ticket
        to ``wait`` or another to ``wait_send``, and a timeout that is not a positive finite number of seconds
        (every wait is bounded). Nothing is read before this passed."""
        if not isinstance(ticket, Ticket):
            raise BadTicket(f"expected a Ticket returned by this client's prefill/swap/read/send, got {ticket!r:.80}")
        ours = isinstance(ticket.role, Role) and isinstance(ticket.seq, int) and ticket.seq >> 32 == self._session
        if not ours or (ticket.role, 0) not in self._done:
            raise BadTicket(
                f"{ticket.what!r:.80} (task {ticket.seq!r:.40}) was not submitted by this client of {self.name}: "
                "wait on the client that submitted it"
            )
        if send != (ticket.dest is not None):
            raise BadTicket(f"{ticket.what} (task {ticket.seq}): use {'wait' if send else 'wait_send'} for it")
        seconds = float(timeout_s) if isinstance(timeout_s, numbers.Real) and not isinstance(timeout_s, bool) else 0
        if not 0 < seconds < math.inf:
            raise BadTask(f"timeout_s must be a positive, finite number of seconds, got {timeout_s!r:.40}")
        return seconds

    def close(self) -> None:
        # Not while another thread is between its check and its put (closing ungates the ring).
        if not self._submitting.acquire(timeout=SUBMIT_LOCK_S):
            raise MpkvError(f"client of {self.name}: a submission in another thread did not end in {SUBMIT_LOCK_S:g} s")
        try:
            for port in [*self._tasks.values(), *self._done.values()]:
                port.close()
            self.inst.close()
        finally:
            self._submitting.release()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
