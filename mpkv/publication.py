"""Weights a trainer publishes for an instance (``Controller.update_weights``); the workers load them at the restore
that adopts their weight version.

NOTE [ weight publications ]
A publication is the full (unsharded) tensors of one weight version, laid out in buckets, each tensor at an
aligned byte offset:
  cpu   one shared-memory segment per bucket (``wts.<buffers>.b<k>.<random>``, 0600, O_EXCL), made by the
        publishing process; each worker maps them and copies its rank's shard out.
  cuda  one device allocation per bucket on the publisher's GPU (``mpkv.pool.cuda_driver.Allocation``, outside
        torch's allocator), with one CUDA IPC handle in the manifest that every worker opens for a load and closes
        after it (NOTE [ CUDA IPC without torch's reductions ]). The memory is the publisher's: a publication of a
        trainer that exited cannot be loaded any more (its ``close`` marks the slots incomplete, and the
        controller refuses to restore a version whose publisher is gone).
The manifest (every tensor's name, dtype, shape, bucket and offset, and the buckets) is a segment of its own
(``wts.<buffers>.m.<random>``), msgpack. The instance's ``weights`` record (one writer: the controller that holds
the command block) has two slots: double buffering. A publication goes into the slot that does not hold the
weight version served, so a trainer publishes N+1 while the instance serves (and may reload, after a weights
clear) N. A slot is written in three steps: marked incomplete (its old segments are then referenced by nothing),
the buckets and the manifest written, marked complete with a fresh publication id (workers compare ids, not
versions, to know whether they hold a publication already). A publisher killed at any point leaves an incomplete
slot and segments no complete slot refers to: ``reclaim`` (run by the launcher) unlinks those once their creator is
dead, and the next publication overwrites the slot. A publisher reuses its own buffers when it publishes the same
layout again (a re-publish is a copy into memory already mapped, without page faults).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from mpkv import naming
from mpkv.errors import ModelError, MpkvError
from mpkv.layout import EntryState, SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import Registry, unlink_if_exists

if TYPE_CHECKING:
    import torch

    from mpkv.instance import Instance
    from mpkv.pool.cuda_driver import Allocation, Imported
    from mpkv.shm.segment import Segment

BUCKET_BYTES = 256 << 20  # the smallest bucket of a big model: one segment per 256 MiB
MAX_BUCKETS = 24  # per publication: two publications and the instance's own objects fit the registry
ALIGN_BYTES = 256
MANIFEST_MAX_BYTES = 64 << 20
DTYPES = ("float32", "bfloat16", "float16")  # what a manifest may name (and the model may run in)


class TensorSpec(msgspec.Struct, frozen=True, array_like=True):
    name: str
    dtype: str
    shape: tuple[int, ...]
    bucket: int
    offset: int  # bytes from the start of the bucket

    @property
    def nbytes(self) -> int:
        n = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        for d in self.shape:
            n *= d
        return n


class Manifest(msgspec.Struct, frozen=True):
    weight_version: int
    publication: str  # the publication id (Publication.id)
    backend: str  # "cpu" or "cuda"
    bucket_bytes: list[int]
    tensors: list[TensorSpec]
    buckets: list[str] = []  # cpu: each bucket's full segment name
    cuda: list[bytes] = []  # cuda: each bucket's CUDA IPC handle (every rank opens the same ones)


class Publication(msgspec.Struct, frozen=True):
    """One slot of the ``weights`` record."""

    weight_version: int = -1
    id: str = ""  # fresh for every publication
    buffers: str = ""  # the id in the names of its segments (kept when a publisher reuses its buffers)
    writer: int = 0  # the publishing process: pid and start time (mpkv.shm.proc.ProcId)
    writer_start: int = 0
    backend: str = "cpu"
    manifest: str = ""  # the manifest segment's full name
    complete: bool = False


class Publications(msgspec.Struct, frozen=True):
    slots: tuple[Publication, Publication] = (Publication(), Publication())

    def find(self, weight_version: int) -> Publication | None:
        """The complete publication of ``weight_version``, if there is one."""
        return next((p for p in self.slots if p.complete and p.weight_version == weight_version), None)

    def named(self, weight_version: int) -> Publication | None:
        """The publication of ``weight_version``: the complete one, else an incomplete one (a reader must refuse
        it rather than fall back on what it holds), else None."""
        found = [p for p in self.slots if p.weight_version == weight_version and p.id]
        return next((p for p in found if p.complete), found[0] if found else None)

    def referenced(self) -> set[str]:
        """The buffer ids of complete publications: their segments must stay."""
        return {p.buffers for p in self.slots if p.complete}

    def with_slot(self, i: int, pub: Publication) -> Publications:
        slots = list(self.slots)
        slots[i] = pub
        return Publications((slots[0], slots[1]))


def expected_tensors(model_cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama-family model of ``model_cfg`` has, by its Hugging Face name, with its full shape."""
    from mpkv.models.weights import _parts

    return {p.name: p.shape for p in _parts(model_cfg, 0, 1)}


def layout(
    expected: Mapping[str, tuple[int, ...]], dtype: str, bucket_bytes: int
) -> tuple[list[TensorSpec], list[int]]:
    """Where each tensor goes: in order, at aligned offsets, a new bucket when the next one does not fit (a tensor
    larger than a bucket gets a bucket of its own). Returns the specs and every bucket's size (its bytes used)."""
    specs: list[TensorSpec] = []
    sizes: list[int] = []
    for name, shape in expected.items():
        nbytes = TensorSpec(name, dtype, tuple(shape), 0, 0).nbytes
        off = -(-sizes[-1] // ALIGN_BYTES) * ALIGN_BYTES if sizes else 0
        if not sizes or off + nbytes > bucket_bytes:
            sizes.append(0)
            off = 0
        specs.append(TensorSpec(name, dtype, tuple(shape), len(sizes) - 1, off))
        sizes[-1] = off + nbytes
    return specs, sizes


def check_tensor(name: str, tensor: object, shape: tuple[int, ...] | None, dtype: torch.dtype) -> None:
    """One pushed tensor against the model: known name, full shape, the instance's dtype. A ModelError names it."""
    import torch

    if shape is None:
        raise ModelError(f"tensor {name!r} is not a parameter of this model (an extra tensor: nothing was published)")
    if not isinstance(tensor, torch.Tensor):
        raise ModelError(f"tensor {name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ModelError(
            f"tensor {name} has shape {list(tensor.shape)}; the model's is {list(shape)} (full, unsharded)"
        )
    if tensor.dtype != dtype:
        raise ModelError(
            f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; the instance runs "
            f"{str(dtype).removeprefix('torch.')}: cast it before publishing"
        )


# -- the publisher's side --------------------------------------------------------------------------------------------


@dataclass
class _Buffers:
    """Buckets (and a manifest segment) one publisher made, reusable for the same layout."""

    id: str
    sizes: list[int]
    segments: list[Segment] = field(default_factory=list)  # cpu
    device: list[Allocation] = field(default_factory=list)  # cuda
    tensors: list[torch.Tensor] = field(default_factory=list)  # views of the segments or the allocations
    manifest: Segment | None = None


class Draft:
    """A publication being written: ``put`` each tensor (checked, then copied into its place), then ``finish``."""

    def __init__(
        self, publisher: Publisher, slot: int, pub: Publication, specs: list[TensorSpec], bufs: _Buffers, reused: bool
    ) -> None:
        self.publisher, self.slot, self.pub, self.bufs, self.reused = publisher, slot, pub, bufs, reused
        self.specs = {s.name: s for s in specs}
        self.missing = set(self.specs)
        self.bytes = 0

    def put(self, name: str, tensor: torch.Tensor) -> None:
        spec = self.specs.get(name)
        check_tensor(name, tensor, spec.shape if spec else None, self.publisher.dtype)
        assert spec is not None
        if name not in self.missing:
            raise ModelError(f"tensor {name} was pushed twice for weight version {self.pub.weight_version}")
        dst = self.bufs.tensors[spec.bucket][spec.offset : spec.offset + spec.nbytes]
        src = tensor.detach()
        if src.device != dst.device:
            src = src.to(dst.device)
        dst.view(tensor.dtype).view(spec.shape).copy_(src)
        self.missing.discard(name)
        self.bytes += spec.nbytes

    def finish(self) -> Publication:
        """Every tensor is there: the manifest is written and the slot marked complete. Until then no worker can
        load anything of this publication."""
        missing = sorted(self.missing)
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ModelError(
                f"weight version {self.pub.weight_version}: tensor {', '.join(missing[:3])}{more} missing "
                "(push every parameter of the model; nothing was published)"
            )
        return self.publisher._finish(self)


class Publisher:
    """A controller's writer of publications (it holds the command block: one writer of the ``weights`` record)."""

    def __init__(self, inst: Instance, model_cfg: Any, dtype: torch.dtype, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.inst, self.model_cfg, self.dtype, self.bucket_bytes = inst, model_cfg, dtype, bucket_bytes
        self.backend = inst.cfg.backend
        self.expected = expected_tensors(model_cfg)
        self._mine: dict[int, _Buffers] = {}  # slot -> the buffers this publisher wrote there

    def begin(self, weight_version: int, served: int) -> Draft:
        """Start publishing ``weight_version`` into the slot that does not hold ``served``'s weights."""
        record = self.inst.read_weights()
        slot = self._slot_for(record, weight_version, served)
        dtype = str(self.dtype).removeprefix("torch.")
        specs, sizes = layout(self.expected, dtype, self.bucket_bytes)
        if len(sizes) > MAX_BUCKETS:  # a big model: bigger buckets, not more of them
            total = sum(s.nbytes for s in specs)
            specs, sizes = layout(self.expected, dtype, max(self.bucket_bytes, -(-total // (MAX_BUCKETS - 1))))
        bufs = self._mine.get(slot)
        reused = bufs is not None and bufs.sizes == sizes
        if not reused:  # fresh buffers first: a failure here changes nothing
            bufs = self._make(naming.weights_buffers(), sizes)
        assert bufs is not None
        me = ProcId.me()
        fresh = Publication(weight_version, secrets.token_hex(8), bufs.id, me.pid, me.start_ticks, self.backend)
        # From here the slot's old publication is referenced by nothing (and no worker reads it: it is not the
        # version served, and the last step is acknowledged by every actor; the controller checked both).
        self.inst.write_weights(record.with_slot(slot, fresh))
        old = record.slots[slot].buffers
        if not reused:
            self._drop(slot)
            self._mine[slot] = bufs
        if old and old != bufs.id and all(b.id != old for b in self._mine.values()):
            retire(self.inst.registry, old)  # another publisher's (an earlier controller of ours, or a dead one)
        return Draft(self, slot, fresh, specs, bufs, reused)

    def _slot_for(self, record: Publications, weight_version: int, served: int) -> int:
        same = [i for i, p in enumerate(record.slots) if p.weight_version == weight_version]
        if same:
            return same[0]
        free = [i for i, p in enumerate(record.slots) if not (p.complete and p.weight_version == served)]

        def rank(i: int) -> tuple[bool, int]:  # the older of the free ones (an incomplete slot counts as oldest) ...
            p = record.slots[i]  # ... but not the served version's, even incomplete: its workers may still name it
            return p.weight_version == served, p.weight_version if p.complete else -2

        return min(free, key=rank)

    def _make(self, buffers: str, sizes: list[int]) -> _Buffers:
        import torch

        bufs = _Buffers(buffers, sizes)
        try:
            for k, size in enumerate(sizes):
                if self.backend == "cuda":
                    from mpkv.pool.cuda_driver import Allocation

                    bufs.device.append(Allocation(size, torch.device("cuda", torch.cuda.current_device())))
                    bufs.tensors.append(bufs.device[-1].tensor)
                    continue
                seg = self.inst.registry.create_unique_segment(
                    naming.weights_bucket(buffers, k), SegmentKind.WEIGHTS, size
                )
                seg.disown()  # a publication outlives its publisher; the launcher reclaims it once unreferenced
                bufs.segments.append(seg)
                _allocate_pages(seg, size)
                seg.mark_ready()  # its bytes are complete once the manifest says so
                bufs.tensors.append(_bytes_of(seg))
        except BaseException:
            self._release(bufs)
            raise
        return bufs

    def _finish(self, draft: Draft) -> Publication:
        bufs, pub = draft.bufs, draft.pub
        if self.backend == "cuda":
            import torch

            torch.cuda.synchronize()  # the receivers read on other streams, in other processes
        specs = list(draft.specs.values())
        handles = [mem.ipc_handle() for mem in bufs.device]
        done = self._write_manifest(
            draft.slot,
            pub,
            Manifest(
                pub.weight_version,
                pub.id,
                self.backend,
                bufs.sizes,
                specs,
                buckets=[s.name for s in bufs.segments],
                cuda=handles,
            ),
        )
        record = self.inst.read_weights()
        for k, b in list(self._mine.items()):  # buffers of ours that another slot's newer publication replaced
            if k != draft.slot and record.slots[k].buffers != b.id:
                self._drop(k)
        return done

    def _write_manifest(self, slot: int, pub: Publication, manifest: Manifest) -> Publication:
        """A new manifest segment (its size may differ from the old one's), then the slot pointing at it."""
        bufs = self._mine[slot]
        raw = msgspec.msgpack.encode(manifest)
        if len(raw) > MANIFEST_MAX_BYTES:
            raise MpkvError(f"the manifest of weight version {pub.weight_version} is {len(raw)} bytes")
        seg = self.inst.registry.create_unique_segment(
            naming.weights_manifest(bufs.id), SegmentKind.WEIGHTS, 8 + len(raw)
        )
        seg.disown()
        seg.payload[:8] = len(raw).to_bytes(8, "little")
        seg.payload[8 : 8 + len(raw)] = raw
        seg.mark_ready()
        old, bufs.manifest = bufs.manifest, seg
        done = msgspec.structs.replace(pub, manifest=seg.name, complete=True)
        self.inst.write_weights(self.inst.read_weights().with_slot(slot, done))
        if old is not None:  # referenced by nothing now
            self.inst.registry.remove(old)
        return done

    def _loads_in_flight(self) -> bool:
        from mpkv.handshake import step_done
        from mpkv.status import settled

        cmd, statuses, _, _ = settled(self.inst)
        return not step_done(cmd, statuses)

    def _drop(self, slot: int) -> None:
        bufs = self._mine.pop(slot, None)
        if bufs is not None:
            self._release(bufs)

    def _release(self, bufs: _Buffers) -> None:
        bufs.tensors.clear()
        for mem in bufs.device:  # after the slots stopped naming it (``close``, ``_drop``): no worker loads it now
            mem.free()
        bufs.device.clear()
        for seg in [*bufs.segments, *([bufs.manifest] if bufs.manifest else [])]:
            self.inst.registry.remove(seg)
        bufs.segments.clear()
        bufs.manifest = None

    def close(self) -> None:
        """Keep every complete publication (the instance may reload it); let go of our buffers otherwise. A cuda
        publication cannot outlive us: its memory is ours. While a step is unacknowledged a worker may still be
        copying out of it (a restore that timed out): then its memory stays allocated until this process exits,
        rather than being freed under a live import (which the driver leaves undefined)."""
        record = self.inst.read_weights()
        if self.backend == "cuda" and self._loads_in_flight():
            for bufs in self._mine.values():
                bufs.device.clear()  # not freed: dropped with this process
                bufs.tensors.clear()
        if self.backend == "cuda":  # our memory: the slots must not name it once we are gone
            gone = [k for k, b in self._mine.items() if record.slots[k].buffers == b.id]
            for k in gone:
                record = record.with_slot(k, msgspec.structs.replace(record.slots[k], complete=False))
            if gone:
                self.inst.write_weights(record)
        for slot in list(self._mine):
            if self.backend == "cuda" or not record.slots[slot].complete:
                self._drop(slot)
            else:
                bufs = self._mine.pop(slot)
                bufs.tensors.clear()
                for seg in [*bufs.segments, *([bufs.manifest] if bufs.manifest else [])]:
                    seg.close()  # the instance may load them after we are gone: the launcher unlinks them


def _allocate_pages(seg: Segment, size: int) -> None:
    """Reserve the bucket's memory now (a segment is only truncated to its size: writing past what tmpfs has left
    would kill the writer with SIGBUS half-way through a copy)."""
    import os

    fd = os.open(naming.shm_path(seg.name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.posix_fallocate(fd, 0, seg.total_bytes)
    except OSError as e:
        raise MpkvError(
            f"cannot publish weights: {naming.SHM_DIR} has no room for a bucket of {size} bytes ({e.strerror}); "
            f"free space there (df {naming.SHM_DIR}) or make it larger"
        ) from None
    finally:
        os.close(fd)


def _bytes_of(seg: Segment) -> torch.Tensor:
    import numpy as np
    import torch

    # Through numpy, as the KV pool's views: an export of the mapping, so an unmap with a view alive fails loudly.
    return torch.from_numpy(np.frombuffer(seg.payload, dtype=np.uint8))


# -- the reader's side (a worker) ------------------------------------------------------------------------------------


class OpenPublication:
    """A complete publication, mapped for reading: ``tensor(name)`` is a view of the full tensor (on the
    publisher's device for cuda). Every field of the manifest is checked before it is used: a manifest another
    writer could have made can neither point outside a bucket nor name a dtype we do not know."""

    def __init__(
        self,
        pub: Publication,
        rank: int,
        expected: Mapping[str, tuple[int, ...]],
        maps: BucketMaps | None = None,
        prefix: str = "",
    ) -> None:
        from mpkv.shm.segment import Segment

        # The run's prefix: the caller's (the worker knows its instance), else the manifest's own.
        prefix = prefix or pub.manifest[: pub.manifest.find(f".{naming.WEIGHTS_STEM}.") + 1]
        self.pub, self._segments, self._buckets, self._maps, self._prefix = pub, [], [], maps, prefix
        self._imported: list[Imported] = []  # cuda
        where = f"the publication of weight version {pub.weight_version}"
        try:
            self._own(pub.manifest, where)
            seg = Segment.attach(pub.manifest, SegmentKind.WEIGHTS)
            self._segments.append(seg)
            n = int.from_bytes(seg.payload[:8], "little")
            if not 0 < n <= len(seg.payload) - 8:
                raise ModelError(f"{where}: manifest {pub.manifest} claims {n} bytes")
            m = msgspec.msgpack.decode(bytes(seg.payload[8 : 8 + n]), type=Manifest)
            if (m.weight_version, m.publication) != (pub.weight_version, pub.id):
                raise ModelError(f"{where}: manifest {pub.manifest} describes another publication")
            self.manifest = m
            self._buckets = self._open_buckets(m, rank, where)
            self.specs = {s.name: s for s in m.tensors}
            if len(self.specs) != len(m.tensors) or set(self.specs) != set(expected):
                odd = sorted(set(self.specs) ^ set(expected))[:3] or ["a name given twice"]
                raise ModelError(f"{where}: its tensors are not the model's ({', '.join(odd)})")
            for s in m.tensors:
                self._check(s, expected, where)
        except msgspec.DecodeError as e:
            self.close()
            raise ModelError(f"{where}: manifest {pub.manifest} is not one mpkv wrote ({e})") from None
        except BaseException:
            self.close()
            raise

    def _open_buckets(self, m: Manifest, rank: int, where: str) -> list[torch.Tensor]:
        from mpkv.shm.segment import Segment

        if m.backend == "cuda":
            import torch

            from mpkv.pool.cuda_driver import Imported

            if len(m.cuda) != len(m.bucket_bytes):
                raise ModelError(f"{where}: {len(m.cuda)} CUDA IPC handles for {len(m.bucket_bytes)} buckets")
            here = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (peer access if need be)
            for handle, size in zip(m.cuda, m.bucket_bytes, strict=True):
                self._imported.append(Imported(handle, size, here))
            return [mem.tensor for mem in self._imported]
        if len(m.buckets) != len(m.bucket_bytes):
            raise ModelError(f"{where}: {len(m.buckets)} buckets named, {len(m.bucket_bytes)} sized")
        out = []
        for name, size in zip(m.buckets, m.bucket_bytes, strict=True):
            if naming.weights_buffers_of(name) != self.pub.buffers:
                raise ModelError(f"{where}: bucket {name!r} is not one of its own segments")
            self._own(name, where)
            if self._maps is not None:
                out.append(self._maps.get(name, size))
                continue
            seg = Segment.attach(name, SegmentKind.WEIGHTS, size)
            self._segments.append(seg)
            out.append(_bytes_of(seg))
        if self._maps is not None:
            self._maps.opened(m.buckets)
        return out

    def _own(self, name: str, where: str) -> None:
        """A name the record or manifest gives must be one of this instance's run (I8: not another's segment)."""
        if not name.startswith(self._prefix) or naming.weights_buffers_of(name) != self.pub.buffers:
            raise ModelError(f"{where}: {name!r} is not a segment of this instance's publication")

    def _check(self, s: TensorSpec, expected: Mapping[str, tuple[int, ...]], where: str) -> None:
        if s.dtype not in DTYPES:
            raise ModelError(f"{where}: tensor {s.name} has dtype {s.dtype!r}")
        if expected.get(s.name) != tuple(s.shape):
            raise ModelError(f"{where}: tensor {s.name} has shape {list(s.shape)}, expected {expected.get(s.name)}")
        if not 0 <= s.bucket < len(self._buckets) or s.offset < 0 or s.offset % ALIGN_BYTES:
            raise ModelError(f"{where}: tensor {s.name} is placed at bucket {s.bucket}, offset {s.offset}")
        if s.offset + s.nbytes > self._buckets[s.bucket].numel():
            raise ModelError(f"{where}: tensor {s.name} ends past its bucket")

    def tensor(self, name: str) -> torch.Tensor:
        import torch

        s = self.specs.get(name)
        if s is None:
            raise ModelError(f"the publication of weight version {self.pub.weight_version} has no tensor {name}")
        raw = self._buckets[s.bucket][s.offset : s.offset + s.nbytes]
        return raw.view(getattr(torch, s.dtype)).view(s.shape)

    def close(self, check_views: bool = True) -> None:
        """Unmap everything, every mapping even if one fails (the first failure is raised after). ``check_views``:
        refuse to unmap cuda memory a view of which this process still holds (off while an error propagates: its
        traceback may hold views nobody will use again)."""
        self._buckets = []
        imported, self._imported = self._imported, []
        failed: BaseException | None = None
        for mem in imported:
            try:
                mem.close(check_views)
            except BaseException as e:
                failed = failed or e
                self._imported.append(mem)  # still mapped: a later close may succeed
        for seg in self._segments:
            seg.close()
        self._segments = []
        if failed is not None:
            raise failed

    def __enter__(self) -> OpenPublication:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(check_views=exc_type is None)


class BucketMaps:
    """A reader's mappings of cpu buckets, kept between loads: the buckets a publisher reuses (the two slots of the
    double buffer) are read again without mapping and unmapping them, which costs about as much as the copy.
    Keeps those of the last two publications opened; ``close`` drops them all. A bucket its publisher unlinked
    stays mapped (its memory held) only until two newer publications were opened, or ``close``."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[Segment, torch.Tensor]] = {}
        self._recent: list[list[str]] = []

    def get(self, name: str, size: int) -> torch.Tensor:
        from mpkv.shm.segment import Segment

        held = self._maps.get(name)
        if held is not None and held[1].numel() == size:
            return held[1]
        if held is not None:
            self._drop(name)
        seg = Segment.attach(name, SegmentKind.WEIGHTS, size)
        self._maps[name] = (seg, _bytes_of(seg))
        return self._maps[name][1]

    def opened(self, names: list[str]) -> None:
        self._recent = [*self._recent[-1:], list(names)]
        keep = {n for names in self._recent for n in names}
        for name in [n for n in self._maps if n not in keep]:
            self._drop(name)

    def _drop(self, name: str) -> None:
        seg, _ = self._maps.pop(name)
        try:
            seg.close()
        except BufferError:  # a view still alive somewhere: the mapping goes with it
            pass

    def close(self) -> None:
        for name in list(self._maps):
            self._drop(name)
        self._recent = []


# -- reclaiming what dead publishers left -------------------------------------------------------------------------


def reclaim(registry: Registry, record: Publications) -> list[str]:
    """Unlink the weight segments whose creator is dead and that no complete publication refers to (a publisher
    killed mid-publish, or one that exited after a newer publication replaced its own). Only the launcher calls
    this: a dead creator cannot claim again, so nobody else touches these registry entries."""
    keep = record.referenced()
    prefix = registry.name_of(naming.WEIGHTS_STEM)
    removed = []
    for e in registry.entries():
        if e.state not in (EntryState.CLAIMED, EntryState.LIVE) or not e.name.startswith(prefix):
            continue
        buffers = naming.weights_buffers_of(e.name)
        if buffers is None or buffers in keep or e.owner.alive():
            continue
        unlink_if_exists(e.name)
        registry.reclaim(e)
        removed.append(e.name)
    return removed


def retire(registry: Registry, buffers: str) -> None:
    """Unlink the segments of ``buffers``, a set no publication refers to any more, made by another publisher: a
    controller this process closed, or another process. Only the holder of the command block calls this. The
    entries of a live maker are given back here; a dead maker's the launcher gives back (``reclaim``: it alone
    touches those)."""
    prefix = registry.name_of(naming.WEIGHTS_STEM)
    for e in registry.entries():
        if e.name.startswith(prefix) and naming.weights_buffers_of(e.name) == buffers:
            unlink_if_exists(e.name)
            if e.owner.alive():
                registry.reclaim(e)
