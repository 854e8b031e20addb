"""The shape of an instance, as data: every shared object, its size, the one writer of each of its words and its
readers. Pure (no I/O), like ``mpkv.handshake``: ``Instance.create`` makes exactly what ``Topology.of`` lists, the
processes find their slots and reader indexes here, and ``tests/test_topology.py`` checks the table itself for
every role and tensor-parallel degree: one writer per word (invariant I1), dense and distinct reader indexes.

Writers and readers are named as ``mpkv-top`` and the errors name them: ``worker r0``, ``transfer r1``,
``messager r0``, ``launcher``, ``controller``, ``client`` (the engine's ``mpkv.Client``, the one writer of the
task rings), ``allocator`` (a decode instance's ``mpkv.Client``, the one writer of its leases), ``link j rR`` (the
prefill messager of rank R that holds link slot j of this decode instance).
"""

from __future__ import annotations

from dataclasses import dataclass

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.layout import SegmentKind
from mpkv.protocol import ROLES, ClearFlags, PdRole, Role, actor_name, actor_slot

ERROR_RECORD_BYTES = 4096
HANDLE_RECORD_BYTES = 1048  # a handle of up to 1024 bytes after the 24-byte header of a synchronised record
CONFIG_BYTES = 4096
WEIGHTS_RECORD_BYTES = 2048  # mpkv.publication.Publications: two slots of a few short names each
ALLREDUCE_PIECE_BYTES = 1 << 20  # the workers' all-reduce sums tensors in pieces of this size (mpkv.shm.allreduce)
TASK_RING_BYTES = 1 << 20
DONE_RING_BYTES = 1 << 23  # a ReadBlocks completion carries a request's KV
TASK_ROLES = (Role.WORKER, Role.TRANSFER)
MAX_LINKS = 4  # prefill instances that may ship into one decode instance at once
MAX_LEASES = 1024  # transfers in flight into one decode instance
CONTROL_COMMAND, CONTROL_LEDGER = 0, 1
CONTROL_FENCE = {Role.WORKER: 2, Role.TRANSFER: 3}  # per task ring: where a PAUSE or SHUTDOWN drains up to


@dataclass(frozen=True)
class SharedObject:
    """One named object of an instance. ``writers[i]`` is the one writer of slot (signals), record (blob) or, for
    a ring, the ring (one entry); ``readers[i]`` is ring reader i. ``record_bytes``: a blob's record size, a ring's
    capacity, 0 for signals and barriers."""

    obj: str
    kind: SegmentKind
    writers: tuple[str, ...]
    readers: tuple[str, ...] = ()
    record_bytes: int = 0  # a blob's record size, a ring's capacity, an all-reduce's piece size; else 0

    @property
    def count(self) -> int:
        """Slots (signals), records (blob) or ranks (barrier); a ring's readers."""
        return len(self.readers) if self.kind == SegmentKind.RING else len(self.writers)


# -- the ledger (control slot CONTROL_LEDGER): its aux word packs the weight version and the cleared tiers ----------


def pack_ledger(weight_version: int, cleared: ClearFlags) -> int:
    """``weight_version << 3 | cleared`` (protocol.MAX_WEIGHT_VERSION keeps it inside a u64)."""
    return weight_version << 3 | int(cleared)


def unpack_ledger(aux: int) -> tuple[ClearFlags, int]:
    """The tiers cleared since the last restore, and the weight version the KV in the pools belongs to."""
    return ClearFlags(aux & 7), aux >> 3


# -- slot arithmetic -------------------------------------------------------------------------------------------


def status_slot_count(tp: int) -> int:
    """Every actor's status slot, then the launcher's."""
    return len(ROLES) * tp + 1


def launcher_slot(tp: int) -> int:
    return len(ROLES) * tp


def controller_wait_slot(tp: int) -> int:
    """The controller's record in ``waits`` (it has no status slot: its state is the command word)."""
    return len(ROLES) * tp + 1


def link_slot(tp: int, link: int, rank: int) -> int:
    """Link ``link`` into rank ``rank``'s pool of a decode instance."""
    return link * tp + rank


def task_ring_of(role: Role) -> Role:
    """The task ring an actor reads: its own role's; a prefill messager reads the workers' (one task stream)."""
    return Role.WORKER if role == Role.MESSAGER else role


def task_reader(tp: int, role: Role, rank: int) -> int:
    """The reader index of (role, rank) in the task ring it reads: the messagers after the workers."""
    return tp + rank if role == Role.MESSAGER else rank


def reads_tasks(cfg: CacheConfig, role: Role) -> bool:
    """Whether actors of ``role`` read a task ring (a messager only on a prefill instance)."""
    return role in TASK_ROLES or (role == Role.MESSAGER and cfg.pd_role == PdRole.PREFILL)


def pool_owner(cfg: CacheConfig) -> Role:
    return Role(int(cfg.pool_owner))


def pool_attachers(cfg: CacheConfig) -> tuple[Role, ...]:
    owner = pool_owner(cfg)
    return tuple(r for r in ROLES if r != owner)


@dataclass(frozen=True)
class Endpoints:
    """Where one actor sits in its instance's objects, read off the table:
    - ``slot``: its slot in ``status``, ``waits`` and ``errors``;
    - ``tasks``, ``reader``, ``fence``, ``done``: the task ring it reads, its reader index there, the ``control``
      slot of that ring's drain fence, the completion ring it writes (None, -1, -1, None: it reads no tasks);
    - ``peers``: the status slots its handshake waits on (a pool owner's attachers, an attacher's owner);
    - ``links``: for a decode instance's pool owner, the link slots into its pool."""

    name: str
    slot: int
    tasks: str | None
    reader: int
    fence: int
    done: str | None
    peers: tuple[int, ...]
    links: tuple[int, ...]


# -- the table ---------------------------------------------------------------------------------------------------


class Topology:
    """Every shared object of an instance of configuration ``cfg``, in creation order."""

    def __init__(self, cfg: CacheConfig, objects: tuple[SharedObject, ...]) -> None:
        self.cfg, self.objects = cfg, objects
        self._by_name = {o.obj: o for o in objects}

    def __getitem__(self, obj: str) -> SharedObject:
        return self._by_name[obj]

    def __contains__(self, obj: str) -> bool:
        return obj in self._by_name

    def rings(self) -> tuple[SharedObject, ...]:
        return tuple(o for o in self.objects if o.kind == SegmentKind.RING)

    def task_ring(self, role: Role) -> SharedObject:
        """The ring the client writes ``role``'s tasks to."""
        return self[naming.task_ring(role.name.lower())]

    def done_rings(self) -> dict[tuple[Role, int], SharedObject]:
        """The completion ring of every actor that answers tasks, by (role, rank): what the client reads."""
        return {
            (role, rank): self[naming.done_ring(role.name.lower(), rank)]
            for role in ROLES
            if reads_tasks(self.cfg, role)
            for rank in range(self.cfg.tp)
        }

    def actor(self, role: Role, rank: int) -> Endpoints:
        me, tp = actor_name(role, rank), self.cfg.tp
        tasks = next((o for o in self.rings() if me in o.readers), None)
        done = next((o for o in self.rings() if o.writers == (me,)), None)
        owner = pool_owner(self.cfg)
        if role == owner:
            peers = tuple(actor_slot(r, rank) for r in pool_attachers(self.cfg))
            links = tuple(link_slot(tp, j, rank) for j in range(MAX_LINKS)) if naming.LINKS in self else ()
        else:
            peers, links = (actor_slot(owner, rank),), ()
        return Endpoints(
            name=me,
            slot=actor_slot(role, rank),
            tasks=tasks.obj if tasks else None,
            reader=tasks.readers.index(me) if tasks else -1,
            fence=CONTROL_FENCE[task_ring_of(role)] if tasks else -1,
            done=done.obj if done else None,
            peers=peers,
            links=links,
        )

    @classmethod
    def of(cls, cfg: CacheConfig) -> Topology:
        tp = cfg.tp
        actors = tuple(actor_name(role, rank) for rank in range(tp) for role in ROLES)
        assert all(actors[actor_slot(role, rank)] == actor_name(role, rank) for rank in range(tp) for role in ROLES)
        objects = [
            SharedObject(naming.CONFIG, SegmentKind.BLOB, ("launcher",), record_bytes=CONFIG_BYTES),
            SharedObject(naming.CONTROL, SegmentKind.SIGNALS, ("controller",) * (2 + len(CONTROL_FENCE))),
            SharedObject(naming.STATUS, SegmentKind.SIGNALS, (*actors, "launcher")),
            SharedObject(naming.WAITS, SegmentKind.SIGNALS, (*actors, "launcher", "controller")),
            SharedObject(naming.USAGE, SegmentKind.SIGNALS, tuple(actor_name(Role.TRANSFER, r) for r in range(tp))),
            SharedObject(naming.ERRORS, SegmentKind.BLOB, (*actors, "launcher"), record_bytes=ERROR_RECORD_BYTES),
            SharedObject(
                naming.HANDLES,
                SegmentKind.BLOB,
                tuple(actor_name(pool_owner(cfg), r) for r in range(tp)),
                record_bytes=HANDLE_RECORD_BYTES,
            ),
        ]
        objects.append(
            SharedObject(naming.WEIGHTS, SegmentKind.BLOB, ("controller",), record_bytes=WEIGHTS_RECORD_BYTES)
        )
        if tp > 1 and cfg.model != "synthetic":  # a real model's ranks sum partial products after each layer
            workers = tuple(actor_name(Role.WORKER, r) for r in range(tp))
            objects.append(
                SharedObject(naming.ALLREDUCE, SegmentKind.BARRIER, workers, record_bytes=ALLREDUCE_PIECE_BYTES)
            )
        for ring_role in TASK_ROLES:
            readers = [
                (task_reader(tp, role, rank), actor_name(role, rank))
                for role in ROLES
                if reads_tasks(cfg, role) and task_ring_of(role) == ring_role
                for rank in range(tp)
            ]
            objects.append(
                SharedObject(
                    naming.task_ring(ring_role.name.lower()),
                    SegmentKind.RING,
                    ("client",),
                    tuple(name for _, name in sorted(readers)),
                    TASK_RING_BYTES,
                )
            )
        for role in ROLES:
            if reads_tasks(cfg, role):
                for rank in range(tp):
                    objects.append(
                        SharedObject(
                            naming.done_ring(role.name.lower(), rank),
                            SegmentKind.RING,
                            (actor_name(role, rank),),
                            ("client",),
                            DONE_RING_BYTES,
                        )
                    )
        if cfg.pd_role == PdRole.PREFILL:
            workers, messagers = (
                tuple(actor_name(role, r) for r in range(tp)) for role in (Role.WORKER, Role.MESSAGER)
            )
            objects.append(SharedObject(naming.PROGRESS, SegmentKind.SIGNALS, workers))
            objects.append(SharedObject(naming.SENDBAR, SegmentKind.BARRIER, messagers))
        if cfg.pd_role == PdRole.DECODE:
            links = tuple(f"link {j} r{r}" for j in range(MAX_LINKS) for r in range(tp))
            assert all(links[link_slot(tp, j, r)] == f"link {j} r{r}" for j in range(MAX_LINKS) for r in range(tp))
            objects.append(SharedObject(naming.LINKS, SegmentKind.SIGNALS, links))
            objects.append(SharedObject(naming.LEASES, SegmentKind.SIGNALS, ("allocator",) * MAX_LEASES))
        return cls(cfg, tuple(objects))
