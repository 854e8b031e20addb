"""The protocol's vocabulary: IntEnums with explicit numbers (they live in shared memory) and task messages.

Nothing here does I/O. The handshake's transition logic is in ``mpkv.handshake``; byte maps in ``mpkv.layout``.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np

from mpkv.codec import Codec


class Role(enum.IntEnum):
    WORKER = 1
    TRANSFER = 2
    MESSAGER = 3


ROLES = (Role.WORKER, Role.TRANSFER, Role.MESSAGER)


class PoolOwner(enum.IntEnum):
    """Which role allocates (and alone frees) the device KV pool of a rank. The others attach to it."""

    WORKER = Role.WORKER
    TRANSFER = Role.TRANSFER


MAX_WEIGHT_VERSION = 2**60 - 1
"""The largest weight version (0 <= v <= MAX_WEIGHT_VERSION). The controller's ledger packs ``version << 3 | cleared``
into one u64 aux word (mpkv.topology.pack_ledger), so 2**61 - 1 is the hard ceiling; one bit is kept in reserve.
Every place that accepts a weight version from outside (config, CLI, Controller.restore) checks against this one
constant."""


class Cmd(enum.IntEnum):
    """What the controller asks for. Written only by the controller, with a fresh epoch each time."""

    NONE = 0  # nothing asked yet: run
    PAUSE = 1
    RESUME = 2
    CLEAR = 3  # aux: ClearFlags
    RESTORE = 4  # aux: the new weight version
    SHUTDOWN = 5


class ClearFlags(enum.IntFlag):
    """The tiers a CLEAR frees: the device and host KV pools, and the workers' model weights (reloaded by the
    next RESTORE from what was published for its weight version)."""

    DEVICE = 1
    HOST = 2
    WEIGHTS = 4


class ActorState(enum.IntEnum):
    """An actor's acknowledged state. Within one epoch the numbers only grow, so waits are monotone:
    "state >= CLEARED at epoch 7" (``Signal.at_least``)."""

    BOOTING = 0
    PAUSED = 21  # ack of PAUSE: every task read before it is finished or failed
    DETACHED = 30  # attacher: holds no view of the device pool any more (the owner waits for this)
    CLEARED = 31  # ack of CLEAR: this actor's share of memory is released
    PUBLISHED = 40  # owner: a new device pool is allocated and its handle published (attachers wait for this)
    RESTORED = 41  # ack of RESTORE: attached to the new pool, weight version adopted
    READY = 45  # serving tasks: ack of RESUME, and of start-up (epoch 0, after PUBLISHED)
    STOPPED = 50  # ack of SHUTDOWN
    FAILED = 99  # terminal; the reason is in the actor's error record


class PdRole(enum.IntEnum):
    """What an instance does in prefill/decode disaggregation (``mpkv launch --role``)."""

    MIXED = 0  # prefill and decode in one instance: nothing is shipped
    PREFILL = 1  # computes prompts' KV; its messagers ship it into a decode instance's pool, layer by layer
    DECODE = 2  # receives KV: its pools accept links from prefill messagers, its blocks are leased to transfers


class Progress(enum.IntEnum):
    """A worker's per-layer progress on the task it runs (object ``progress``, slot = rank; epoch = the task's
    position in the task ring, aux = layers whose K/V are final in the pool). Monotone in (epoch, aux)."""

    IDLE = 0
    RUNNING = 1
    DONE = 2  # every layer is final (also when the task failed: the messager need not wait any longer)


class LeaseState(enum.IntEnum):
    """A lease of destination blocks in a decode instance (object ``leases``; epoch = the lease's generation,
    aux = the decode pool's restore epoch when granted). Written only by the decode instance's allocator."""

    FREE = 0
    GRANTED = 1  # the blocks belong to a transfer: the decode side must not read them
    COMPLETE = 2  # every rank shipped every layer and every prefill worker succeeded: readable
    FAILED = 3  # the transfer failed (reason in the allocator's hands): the blocks hold garbage


class HostTier(enum.IntEnum):
    """A transfer manager's host pool, as it publishes it (object ``usage``, slot = rank; epoch = slots in use)."""

    UNKNOWN = 0
    LIVE = 1
    CLEARED = 2


class WaitKind(enum.IntEnum):
    """What a process is waiting for, published in its wait record (mpkv.instance, object ``waits``) so that
    an inspector can draw the wait-for graph (invariant I2). ``aux`` says on whom: up to four status slots,
    packed by ``pack_slots``."""

    NONE = 0  # running, not waiting
    COMMAND = 1  # idle: waiting for the controller's next command (and for tasks)
    PEERS = 2  # waiting for the actors in aux to reach a state (the handshake)
    ACKS = 3  # the controller, waiting for the actors in aux to acknowledge
    PROGRESS = 4  # a messager, waiting for its worker's next layer (aux: the worker's slot)
    BARRIER = 5  # a messager at the per-batch barrier of its instance's messagers; a worker in the all-reduce


LINK_WAIT_BASE = 0x8000  # in a wait record, LINK_WAIT_BASE + i names link slot i of a decode instance


def pack_slots(slots: list[int]) -> int:
    """Up to four status slots in one u64: (slot + 1) per 16 bits, 0 = none."""
    if len(slots) > 4 or any(not 0 <= s < 0xFFFF for s in slots):
        raise ValueError(f"cannot pack slots {slots}")
    return sum((s + 1) << (16 * i) for i, s in enumerate(slots))


def unpack_slots(word: int) -> list[int]:
    return [(word >> (16 * i) & 0xFFFF) - 1 for i in range(4) if word >> (16 * i) & 0xFFFF]


ACK_OF = {
    Cmd.NONE: ActorState.READY,
    Cmd.PAUSE: ActorState.PAUSED,
    Cmd.RESUME: ActorState.READY,
    Cmd.CLEAR: ActorState.CLEARED,
    Cmd.RESTORE: ActorState.RESTORED,
    Cmd.SHUTDOWN: ActorState.STOPPED,
}


def actor_slot(role: Role, rank: int) -> int:
    """Index of (role, rank) in the instance's status array and error records."""
    return rank * len(ROLES) + (int(role) - 1)


def slot_actor(slot: int) -> tuple[Role, int]:
    """The (role, rank) of a status slot: ``actor_slot``'s inverse."""
    return ROLES[slot % len(ROLES)], slot // len(ROLES)


def actor_name(role: Role, rank: int) -> str:
    return f"{role.name.lower()} r{rank}"


# --- task lanes (msgspec structs, encoded by mpkv.codec) -----------------------------------------------------


class Sampling(msgspec.Struct, frozen=True):
    """How a request picks its next token: greedy (temperature 0), or temperature and top-p with the request's
    seed. The token at position p is drawn from a generator seeded by (seed, p) alone, so it depends neither on
    the batch, nor on the rank (every rank computes the same logits), nor on which instance ran the step."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


GREEDY = Sampling()


class Prefill(msgspec.Struct, tag=True):
    """Worker: run the model on ``tokens``, write their K/V into ``blocks`` (block table, in order), and answer
    with the request's first generated token (``Done.tokens``)."""

    seq: int
    request: str
    tokens: np.ndarray  # int32 token ids
    blocks: np.ndarray  # int32 device block ids, ceil(len(tokens) / block_size) of them
    sampling: Sampling = GREEDY


class PrefillItem(msgspec.Struct):
    """One request of a batched prefill: as ``Prefill``, without the task's sequence number."""

    request: str
    tokens: np.ndarray  # int32 token ids
    blocks: np.ndarray  # int32 device block ids, ceil(len(tokens) / block_size) of them
    sampling: Sampling = GREEDY


class PrefillBatch(msgspec.Struct, tag=True):
    """Worker: prefill several requests in one forward; ``Done.tokens`` holds each one's first token, in order."""

    seq: int
    items: list[PrefillItem]


class DecodeItem(msgspec.Struct):
    """One running request of a decode step: ``token`` goes at ``position`` (the request's tokens whose K/V are
    in the pool already); ``blocks`` is its block table up to and including the block of ``position``."""

    request: str
    token: int
    position: int
    blocks: np.ndarray  # int32, position // block_size + 1 of them
    sampling: Sampling = GREEDY


class Decode(msgspec.Struct, tag=True):
    """Worker: one decode step of a batch of running requests; ``Done.tokens`` holds each item's next token."""

    seq: int
    items: list[DecodeItem]


class SwapOut(msgspec.Struct, tag=True):
    """Transfer: copy device ``blocks`` to newly allocated host slots (returned in the completion)."""

    seq: int
    blocks: np.ndarray


class SwapIn(msgspec.Struct, tag=True):
    """Transfer: copy host ``slots`` (of the current weight version) into device ``blocks``."""

    seq: int
    slots: np.ndarray
    blocks: np.ndarray
    free_slots: bool = True


class Done(msgspec.Struct, tag=True):
    """A completion, from one actor of one rank. ``error`` is empty on success."""

    seq: int
    rank: int
    error: str = ""
    slots: np.ndarray | None = None
    weight_version: int = 0
    layers_done: int = 0
    data: bytes = b""
    busy_s: float = 0.0  # a messager: seconds spent moving bytes (for `mpkv bench pd`)
    tokens: np.ndarray | None = None  # a worker's prefill or decode step: the next token of each request, in order
    pool_epoch: int = 0  # a worker's: the restore epoch of the pool it wrote (a pool cleared since holds none of it)


class ReadBlocks(msgspec.Struct, tag=True):
    """Transfer: return the raw bytes of device ``blocks`` (or host ``slots``), for verification by the client."""

    seq: int
    blocks: np.ndarray
    host: bool = False


class SendItem(msgspec.Struct):
    """One request of a PD batch: prefill ``tokens`` into ``blocks`` here, ship them into ``dest_blocks`` of the
    decode instance, under that instance's lease ``lease`` (slot) of generation ``lease_gen``. ``lease_token`` is
    the lease's secret, shown to a remote decode messager with every write (NOTE [ nixl path ])."""

    request: str
    tokens: np.ndarray
    blocks: np.ndarray
    dest_blocks: np.ndarray
    lease: int
    lease_gen: int
    lease_token: int = 0
    sampling: Sampling = GREEDY


class PrefillSend(msgspec.Struct, tag=True):
    """A batch, as the engine fixed it, for a prefill instance: read by every worker (prefill, publishing
    per-layer progress) and every messager (ship layer l of every item once layer l is done, then meet the
    other ranks at a barrier keyed by ``seq`` and the batch). ``dest`` names the decode instance."""

    seq: int
    dest: str
    items: list[SendItem]
    layerwise: bool = True  # False: ship only after the last layer (the baseline `mpkv bench pd` compares with)


TASK_TYPES = (Prefill, PrefillBatch, Decode, SwapOut, SwapIn, ReadBlocks, PrefillSend)
TASK_CODEC = Codec(*TASK_TYPES)
DONE_CODEC = Codec(Done)
