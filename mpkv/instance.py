"""One instance's shared objects, by name: who creates them (the launcher), who writes what.

    object              kind      written by                         read by
    config              blob      launcher (once, before ready)      everyone
    control             signals   the controller: slot 0 = command (Cmd, epoch, aux),
                                  slot 1 = ledger (last completed CLEAR/RESTORE; aux = weight version << 3
                                  | ClearFlags cleared since the last restore),
                                  slots 2, 3 = the drain fences of tasks.worker, tasks.transfer (the PAUSE or
                                  SHUTDOWN, its epoch; aux = the ring position every reader drains up to;
                                  FENCE_CLOSING while it is being found: NOTE [ submission gate ], shm.ring)
    status              signals   slot actor_slot(role, rank): that actor only;    controller, peers, mpkv-top
                                  last slot: the launcher
    waits               signals   slot actor_slot(...): what that actor waits for (WaitKind; epoch = since,
                                  monotonic ns; aux = protocol.pack_slots of whom); last slot: the controller
    usage               signals   slot r: transfer r's host pool (HostTier; epoch = slots in use)
    errors              blob      record actor_slot(...): that actor only (before it publishes FAILED)
    handles             blob      record r: rank r's pool owner (before it publishes PUBLISHED)
    weights             blob      the controller: two slots of weights published for a weight version
                                  (mpkv.publication.Publications); the workers read it when they load
    wts.<id>.b<k>.<random>  weights   a trainer's published weights: buckets and manifest (mpkv.publication),
    wts.<id>.m.<random>               made by the publishing controller, reclaimed by the launcher once
                                      unreferenced and their maker dead
    tasks.<role>        ring      the client (one writer); reader r = that role's rank r. On a prefill
                                  instance, tasks.worker also has readers tp + r: messager r (one task stream)
    done.<role>.r<r>    ring      that actor; the client reads (done.messager.r<r>: prefill instances)
  prefill instances only:
    progress            signals   slot r: worker r's per-layer progress (protocol.Progress)
    sendbar             barrier   the messagers, once per PrefillSend batch, keyed by (seq, batch)
  a checkpoint model at tp > 1 only:
    allreduce           barrier   the workers' sum of partial products (mpkv.shm.allreduce): rank r's buffers
                                  written by worker r only
  decode instances only:
    links               signals   slot j * tp + r: link j of rank r, written by the prefill messager r that
                                  holds it (an attacher of this instance's rank-r pool from outside)
    leases              signals   slot i: lease i (protocol.LeaseState), written by this instance's allocator
    pool.dev.r<r>.e<E>.<random>   pool   rank r's pool owner, per restore epoch E (the random part: nobody
                                         can guess the next name; PoolHandle carries it to the attachers)
    pool.host.r<r>.e<E>.<random>  pool   rank r's transfer manager

The command block (control) is documented for other languages in docs/control-block.md.
"""

from __future__ import annotations

import struct
import time

import msgspec

from mpkv import naming
from mpkv.config import CacheConfig
from mpkv.errors import AttachError, MpkvError
from mpkv.layout import SegmentKind
from mpkv.pool import PoolHandle
from mpkv.protocol import (
    LINK_WAIT_BASE,
    ROLES,
    ActorState,
    Cmd,
    HostTier,
    LeaseState,
    Progress,
    Role,
    WaitKind,
    actor_slot,
    unpack_slots,
)
from mpkv.publication import Publications
from mpkv.report import NO_WAIT, Wait, actor_map, culprits, wait_chain
from mpkv.shm.barrier import create_barrier
from mpkv.shm.records import read_sync_record, write_sync_record
from mpkv.shm.registry import Registry
from mpkv.shm.ring import create_ring
from mpkv.shm.segment import Segment
from mpkv.shm.signals import SignalArray, create_signals
from mpkv.topology import (  # noqa: F401 (the instance's shape, re-exported for its users)
    CONFIG_BYTES,
    CONTROL_COMMAND,
    CONTROL_FENCE,
    CONTROL_LEDGER,
    DONE_RING_BYTES,
    ERROR_RECORD_BYTES,
    HANDLE_RECORD_BYTES,
    MAX_LEASES,
    MAX_LINKS,
    TASK_RING_BYTES,
    TASK_ROLES,
    WEIGHTS_RECORD_BYTES,
    Topology,
    controller_wait_slot,
    launcher_slot,
    link_slot,
    status_slot_count,
)

_LEN = struct.Struct("<I")
FENCE_CLOSING = 2**64 - 1  # a fence's aux while the controller waits for the ring's writer to finish a put


class Instance:
    """A view of a running instance's objects. ``create`` (the launcher) makes them; ``attach`` maps them."""

    def __init__(self, registry: Registry, owned: list[Segment] | None = None) -> None:
        self.registry = registry
        self.name = registry.instance
        self._owned = owned or []
        self._blobs: dict[str, Segment] = {}
        self.cfg = self._read_config()
        self.topology = Topology.of(self.cfg)
        self.control: SignalArray[Cmd] = SignalArray(self.name_of(naming.CONTROL), Cmd, labels=_control_label)
        self.status: SignalArray[ActorState] = SignalArray(
            self.name_of(naming.STATUS), ActorState, labels=lambda i: _actor_label(i, self.cfg.tp)
        )
        self.waits: SignalArray[WaitKind] = SignalArray(self.name_of(naming.WAITS), WaitKind)
        self._blob(naming.ERRORS)  # mapped now: failure reports must work after the launcher unlinked the names
        self._progress: SignalArray[Progress] | None = None
        self._links: SignalArray[ActorState] | None = None
        self._leases: SignalArray[LeaseState] | None = None
        self.usage: SignalArray[HostTier] = SignalArray(
            self.name_of(naming.USAGE), HostTier, labels=lambda r: f"host r{r}"
        )

    @classmethod
    def create(cls, name: str, cfg: CacheConfig) -> Instance:
        """Make every object ``Topology.of(cfg)`` lists (the launcher); all or nothing."""
        reg = Registry.create(name)
        owned: list[Segment] = []
        try:
            for o in Topology.of(cfg).objects:
                if o.kind == SegmentKind.SIGNALS:
                    owned.append(create_signals(reg, o.obj, o.count))
                elif o.kind == SegmentKind.RING:
                    owned.append(create_ring(reg, o.obj, o.record_bytes, nreaders=o.count))
                elif o.kind == SegmentKind.BARRIER and o.record_bytes:
                    from mpkv.shm.allreduce import create_allreduce  # imports torch: only where an instance has one

                    owned.append(create_allreduce(reg, o.obj, o.count, o.record_bytes))
                elif o.kind == SegmentKind.BARRIER:
                    owned.append(create_barrier(reg, o.obj, o.count))
                else:
                    seg = reg.create_segment(o.obj, SegmentKind.BLOB, o.record_bytes * o.count)
                    owned.append(seg)
                    if o.obj == naming.CONFIG:
                        _write_record(seg, 0, CONFIG_BYTES, cfg.to_json().encode())
                    seg.mark_ready()
            return cls(reg, owned)
        except BaseException:
            for seg in owned:
                reg.release(seg)
            reg.destroy()
            raise

    @classmethod
    def attach(cls, name: str) -> Instance:
        reg = Registry.attach(name)
        try:
            return cls(reg)
        except BaseException:
            reg.close()  # a refused attach keeps nothing mapped
            raise

    def _read_config(self) -> CacheConfig:
        raw = self._read_record(naming.CONFIG, 0, CONFIG_BYTES)
        try:
            return CacheConfig.from_json(raw.decode())
        except (UnicodeDecodeError, ValueError, TypeError) as e:
            raise AttachError(
                f"instance {self.name!r}: its config {self.name_of(naming.CONFIG)} is not a config mpkv wrote "
                f"({type(e).__name__}: {e}); the instance is corrupt: stop it and run `mpkv cleanup`"
            ) from None

    # -- names ---------------------------------------------------------------------------------------------------
    def name_of(self, obj: str) -> str:
        return self.registry.name_of(obj)

    def task_ring(self, role: Role) -> str:
        return self.name_of(self.topology.task_ring(role).obj)

    def link_slot(self, link: int, rank: int) -> int:
        return link_slot(self.cfg.tp, link, rank)

    # -- the PD objects, mapped on first use ------------------------------------------------------------------------
    @property
    def progress(self) -> SignalArray[Progress]:
        if self._progress is None:
            self._progress = SignalArray(
                self.name_of(naming.PROGRESS), Progress, labels=lambda r: f"progress of worker r{r}"
            )
        return self._progress

    @property
    def links(self) -> SignalArray[ActorState]:
        if self._links is None:
            tp = self.cfg.tp
            self._links = SignalArray(
                self.name_of(naming.LINKS), ActorState, labels=lambda i: f"link {i // tp} into rank {i % tp}"
            )
        return self._links

    @property
    def leases(self) -> SignalArray[LeaseState]:
        if self._leases is None:
            self._leases = SignalArray(self.name_of(naming.LEASES), LeaseState, labels=lambda i: f"lease {i}")
        return self._leases

    # -- records -------------------------------------------------------------------------------------------------
    def _blob(self, obj: str) -> Segment:
        if obj not in self._blobs:
            self._blobs[obj] = Segment.attach(self.name_of(obj), SegmentKind.BLOB)
        return self._blobs[obj]

    def _read_record(self, obj: str, index: int, size: int) -> bytes:
        seg = self._blob(obj)
        off = index * size
        (n,) = _LEN.unpack_from(seg.payload, off)
        if n > size - _LEN.size:
            raise MpkvError(f"record {index} of {seg.name} claims {n} bytes; it holds at most {size - _LEN.size}")
        return bytes(seg.payload[off + _LEN.size : off + _LEN.size + n])

    def write_error(self, role: Role, rank: int, text: str) -> None:
        raw = text.encode(errors="replace")[: ERROR_RECORD_BYTES - _LEN.size]
        _write_record(self._blob(naming.ERRORS), actor_slot(role, rank), ERROR_RECORD_BYTES, raw)

    def read_error(self, slot: int) -> str:
        return self._read_record(naming.ERRORS, slot, ERROR_RECORD_BYTES).decode(errors="replace")

    def write_handle(self, rank: int, handle: PoolHandle) -> None:
        write_sync_record(self._blob(naming.HANDLES), rank, HANDLE_RECORD_BYTES, msgspec.msgpack.encode(handle))

    def read_handle(self, rank: int) -> PoolHandle:
        """The handle of one write (NOTE [ synchronised record ] in mpkv.shm.records): a read during a restore
        never pairs fields of the new handle with the old one's, e.g. the new epoch with the old weight version."""
        return msgspec.msgpack.decode(
            read_sync_record(self._blob(naming.HANDLES), rank, HANDLE_RECORD_BYTES), type=PoolHandle
        )

    def write_weights(self, record: Publications) -> None:
        """The controller that holds the command block (mpkv.publication.Publisher)."""
        write_sync_record(self._blob(naming.WEIGHTS), 0, WEIGHTS_RECORD_BYTES, msgspec.msgpack.encode(record))

    def read_weights(self) -> Publications:
        """The two publication slots (NOTE [ weight publications ] in mpkv.publication); both empty until a trainer
        published anything."""
        raw = read_sync_record(self._blob(naming.WEIGHTS), 0, WEIGHTS_RECORD_BYTES)
        if not raw:
            return Publications()
        try:
            return msgspec.msgpack.decode(raw, type=Publications)
        except msgspec.DecodeError as e:
            raise MpkvError(f"{self.name_of(naming.WEIGHTS)}: not a weights record mpkv wrote ({e})") from None

    def launcher_gone(self) -> str:
        """Why the launcher no longer supervises this instance ("launcher pid N died (...)"), or "" while it does.
        Its actors die with it (parent-death signals), so a failure it caused must name it first, not them."""
        sig = self.status.read_or_dead(launcher_slot(self.cfg.tp))
        if sig.value in (ActorState.STOPPED, ActorState.FAILED):
            what = "stopped the instance" if sig.value == ActorState.STOPPED else "failed"
            return f"launcher pid {sig.writer.pid} {what}"
        if sig.seq and not sig.writer.alive():
            return f"launcher pid {sig.writer.pid} died ({sig.writer.state()}); its actors exited with it"
        return ""

    def culprits(self) -> str:
        """Who broke the instance: a launcher that died (its actors die with it), else ``report.culprits`` of the
        status as it is now (actors that FAILED or died, then those the launcher stopped)."""
        launcher = self.launcher_gone()
        if launcher.endswith("exited with it"):
            return launcher
        from mpkv import status  # it reads through this class: imported on use, not at the top (a cycle)

        return culprits(status.read_status(self))

    def waiting_for(self, slot: int) -> Wait:
        """What the process of a status slot (or the controller's wait slot) is waiting for, and since when."""
        sig = self.waits.read_or_dead(slot)  # a report: a slot torn by a dead writer reads as no wait of it
        if sig.seq == 0 or sig.value == WaitKind.NONE:
            return NO_WAIT
        on = tuple(self._wait_label(i) for i in unpack_slots(sig.aux))
        return Wait(sig.value.name, on, round((time.monotonic_ns() - sig.epoch) / 1e9, 3))

    def _wait_label(self, code: int) -> str:
        if code >= LINK_WAIT_BASE:
            return self.links.label(code - LINK_WAIT_BASE)
        return _actor_label(code, self.cfg.tp).removeprefix("status of ")

    def wait_chain(self, slot: int) -> str:
        """Follow the published waits from one actor (``report.wait_chain``, on the status as it is now)."""
        from mpkv import status  # it reads through this class: imported on use, not at the top (a cycle)

        st = status.read_status(self)
        return wait_chain(_actor_label(slot, self.cfg.tp).removeprefix("status of "), actor_map(st))[0]

    # -- teardown ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        for seg in self._blobs.values():
            seg.close()
        self._blobs.clear()
        self.control.close()
        self.status.close()
        self.waits.close()
        self.usage.close()
        for arr in (self._progress, self._links, self._leases):
            if arr is not None:
                arr.close()
        self._progress = self._links = self._leases = None
        if not self._owned:
            self.registry.close()

    def destroy(self) -> list[str]:
        """Creator only: close and unlink every name of the instance (also those its actors created)."""
        self.close()
        for seg in self._owned:
            self.registry.release(seg)
        return self.registry.destroy()


def _write_record(seg: Segment, index: int, size: int, raw: bytes) -> None:
    if len(raw) > size - _LEN.size:
        raise MpkvError(f"record of {len(raw)} bytes does not fit {seg.name}'s {size - _LEN.size}-byte records")
    off = index * size
    seg.payload[off + _LEN.size : off + _LEN.size + len(raw)] = raw
    _LEN.pack_into(seg.payload, off, len(raw))


def _control_label(i: int) -> str:
    fences = {slot: f"the drain fence of tasks.{role.name.lower()}" for role, slot in CONTROL_FENCE.items()}
    labels = {CONTROL_COMMAND: "the command word", CONTROL_LEDGER: "the controller's ledger", **fences}
    return labels.get(i, f"slot {i}")


def _actor_label(i: int, tp: int) -> str:
    if i == launcher_slot(tp):
        return "the launcher's status"
    rank, role = divmod(i, len(ROLES))
    return f"status of {ROLES[role].name.lower()} r{rank}"
