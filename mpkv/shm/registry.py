"""The instance registry: the anchor segment of an instance, its run id, and every OS name created for it.

Byte map: NOTE [ registry layout ] in mpkv.layout. A process creating a segment first claims an entry
(compare-and-swap of its pid into a free ``claim`` word), writes the name, then creates the segment, then
marks the entry LIVE. So a ``kill -9`` at any moment leaves every existing name listed, owned by a pid that
``mpkv cleanup`` can see is dead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mpkv import _native, layout, naming
from mpkv.errors import AttachError, MpkvError, NameTaken
from mpkv.layout import EntryState, SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.segment import Segment

DEFAULT_CAPACITY = 256
RECLAIMING = 2**64 - 1  # an entry's claim word while a reclaimer gives it back (no pid is this)


@dataclass(frozen=True)
class Entry:
    index: int
    owner: ProcId
    state: EntryState
    kind: SegmentKind
    name: str


class Registry:
    """One instance's registry. ``create`` makes a new run; ``attach`` joins the running one."""

    def __init__(self, instance: str, seg: Segment) -> None:
        self.instance = instance
        self.seg = seg
        raw_run, capacity = layout.REGISTRY_HEAD.unpack_from(seg.payload, 0)
        run_id = raw_run.rstrip(b"\0").decode(errors="replace")
        room = (len(seg.payload) - layout.REGISTRY_HEAD_BYTES) // layout.REGISTRY_ENTRY_BYTES
        if not naming.is_run_id(run_id) or not 0 < capacity <= room:
            seg.close()
            raise AttachError(
                f"registry {seg.name} of instance {instance!r} is corrupt (run id {run_id!r}, {capacity} entries "
                f"in room for {room}): not what mpkv writes; stop whatever uses it and run `mpkv cleanup`"
            )
        self.run_id: str = run_id
        self.capacity: int = capacity
        self._mine: dict[str, int] = {}  # name -> entry index, for names this process created

    @classmethod
    def create(cls, instance: str, capacity: int = DEFAULT_CAPACITY) -> Registry:
        name = naming.registry_name(instance)
        payload = layout.REGISTRY_HEAD_BYTES + capacity * layout.REGISTRY_ENTRY_BYTES
        seg = Segment.create(name, SegmentKind.REGISTRY, payload)
        layout.REGISTRY_HEAD.pack_into(seg.payload, 0, naming.new_run_id().encode(), capacity)
        seg.mark_ready()
        return cls(instance, seg)

    @classmethod
    def attach(cls, instance: str) -> Registry:
        name = naming.registry_name(instance)
        try:
            seg = Segment.attach(name, SegmentKind.REGISTRY)
        except AttachError as e:
            there = os.path.lexists(naming.shm_path(name))
            raise AttachError(
                f"instance {instance!r} {'cannot be attached' if there else 'is not running here'} ({e})"
            ) from None
        return cls(instance, seg)

    @property
    def owner(self) -> ProcId:
        return self.seg.owner

    def name_of(self, obj: str) -> str:
        return naming.object_name(self.instance, self.run_id, obj)

    # -- entries -------------------------------------------------------------------------------------------
    def _entry_off(self, i: int) -> int:
        return layout.SEGMENT_HEADER_BYTES + layout.REGISTRY_HEAD_BYTES + i * layout.REGISTRY_ENTRY_BYTES

    def _claim(self, name: str, kind: SegmentKind) -> int:
        me = ProcId.me()
        buf = self.seg.buf
        for i in range(self.capacity):
            off = self._entry_off(i)
            if _native.load_u64(buf, off + layout.REG_CLAIM) != 0:
                continue
            won, _ = _native.cas_u64(buf, off + layout.REG_CLAIM, 0, me.pid)
            if not won:
                continue
            raw = name.encode()
            buf[off + layout.REG_NAME : off + layout.REG_NAME + layout.REG_NAME_BYTES] = raw.ljust(
                layout.REG_NAME_BYTES, b"\0"
            )
            _native.store_u32(buf, off + layout.REG_KIND, int(kind))
            _native.store_u64(buf, off + layout.REG_START, me.start_ticks)
            _native.store_u32(buf, off + layout.REG_STATE, EntryState.CLAIMED)
            return i
        raise MpkvError(f"registry of instance {self.instance!r} is full ({self.capacity} names)")

    def _set_state(self, i: int, state: EntryState) -> None:
        _native.store_u32(self.seg.buf, self._entry_off(i) + layout.REG_STATE, int(state))

    def _recycle(self, i: int) -> None:
        """The claimer gives its entry back: GONE first (readers skip it), then the claim word returns to 0."""
        self._set_state(i, EntryState.GONE)
        _native.store_u64(self.seg.buf, self._entry_off(i) + layout.REG_CLAIM, 0)

    def reclaim(self, entry: Entry) -> None:
        """Give back the entry of a claimer that is dead (its name already unlinked): GONE, then the claim word from
        the dead pid to 0 (compare-and-swap: an entry claimed anew meanwhile is left alone)."""
        if entry.owner.pid == RECLAIMING:  # another reclaimer has it
            return
        off = self._entry_off(entry.index)
        # Taken first (claimed by nobody, claimable by nobody): of two reclaimers only one gets past this, and a
        # new claimer cannot take the entry until its claim word is 0 again.
        won, _ = _native.cas_u64(self.seg.buf, off + layout.REG_CLAIM, entry.owner.pid, RECLAIMING)
        if won:
            self._set_state(entry.index, EntryState.GONE)
            _native.store_u64(self.seg.buf, off + layout.REG_CLAIM, 0)

    def entries(self) -> list[Entry]:
        out = []
        buf = self.seg.buf
        for i in range(self.capacity):
            off = self._entry_off(i)
            pid = _native.load_u64(buf, off + layout.REG_CLAIM)
            if pid in (0, RECLAIMING):  # free, or being given back
                continue
            state = _native.load_u32(buf, off + layout.REG_STATE)
            kind = _native.load_u32(buf, off + layout.REG_KIND)
            if state == EntryState.FREE:  # claimed this instant, fields not written yet
                continue
            if state not in EntryState._value2member_map_ or kind not in SegmentKind._value2member_map_:
                continue  # not an entry mpkv wrote (corruption): nothing in it can be trusted
            start = _native.load_u64(buf, off + layout.REG_START)
            name = bytes(buf[off + layout.REG_NAME : off + layout.REG_NAME + layout.REG_NAME_BYTES])
            text = name.rstrip(b"\0").decode(errors="replace")
            out.append(Entry(i, ProcId(int(pid), start), EntryState(state), SegmentKind(kind), text))
        return out

    # -- segments of this instance -------------------------------------------------------------------------
    def create_segment(self, obj: str, kind: SegmentKind, payload_bytes: int) -> Segment:
        name = self.name_of(obj)
        i = self._claim(name, kind)
        try:
            seg = Segment.create(name, kind, payload_bytes)
        except NameTaken:
            self._recycle(i)
            raise
        self._set_state(i, EntryState.LIVE)
        self._mine[name] = i
        return seg

    def create_unique_segment(self, obj: str, kind: SegmentKind, payload_bytes: int, tries: int = 4) -> Segment:
        """Create ``obj`` under a name with a fresh random part (naming.unique): for objects made while the
        instance runs, whose names another user could otherwise squat from the run id in the /dev/shm listing.
        A taken name (only a guess that won, or a leftover) is skipped for a fresh one; after ``tries`` taken
        names this fails before the caller changed anything. The full name is ``Segment.name``."""
        taken = []
        for _ in range(tries):
            try:
                return self.create_segment(naming.unique(obj), kind, payload_bytes)
            except NameTaken as e:
                taken.append(str(e))
        raise NameTaken(
            f"instance {self.instance!r}: {tries} fresh random names for {obj} were all taken (is another user "
            f"squatting this instance's names? see ls -l {naming.SHM_DIR}); the last: {taken[-1]}"
        )

    def release(self, seg: Segment) -> None:
        """Close, unlink (we own it) and mark it gone. Idempotent."""
        seg.close()
        if seg.owned:
            seg.unlink()
            i = self._mine.pop(seg.name, None)
            if i is not None:
                self._recycle(i)

    def remove(self, seg: Segment) -> None:
        """Close and unlink a segment this process created and disowned (``Segment.disown``: its name outlives
        the process unless removed), and give its entry back. A view still alive (an exception in the middle
        of a copy keeps one in its traceback) keeps the mapping until it goes; the name goes now."""
        try:
            seg.close()
        except BufferError:
            pass
        unlink_if_exists(seg.name)
        i = self._mine.pop(seg.name, None)
        if i is not None:
            self._recycle(i)

    def close(self) -> None:
        self.seg.close()

    def destroy(self) -> list[str]:
        """Owner only: unlink every name still listed, then the registry itself. Returns what it removed."""
        removed = [e.name for e in self.entries() if e.state in (EntryState.CLAIMED, EntryState.LIVE)]
        for name in removed:
            unlink_if_exists(name)
        self.seg.close()
        self.seg.unlink()
        return [*removed, self.seg.name]


def unlink_if_exists(name: str) -> bool:
    try:
        os.unlink(naming.shm_path(name))
        return True
    except FileNotFoundError:
        return False
