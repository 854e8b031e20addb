"""`mpkv cleanup`: reclaim the names of instances whose owners are all dead. Never touches a live instance.

An instance is stale when the creator of its registry and every process that claimed a name in it are dead
(pid + start time, so a reused pid does not keep a dead instance alive). Segments of ours that no registry
lists (a registry lost, or a run replaced by a newer one) are reclaimed when their own header's owner is dead.
Files that do not carry an mpkv header are reported and left alone: they are not ours to delete.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field

from mpkv import layout, naming
from mpkv.layout import EntryState, SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import unlink_if_exists
from mpkv.shm.segment import read_owner


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    live_instances: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # our prefix, but no mpkv header: left alone

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would remove" if dry_run else "removed"
        out = [f"{verb} {n}" for n in self.removed]
        out += [f"kept live instance {i}" for i in self.live_instances]
        out += [f"left alone {n}: not an mpkv segment" for n in self.foreign]
        if not out:
            out.append("nothing to clean up")
        return out


def _registry_view(name: str) -> tuple[ProcId, list[tuple[ProcId, str]]] | None:
    """Owner and entries of a registry, read without requiring it to be ready (its creator may have died)."""
    try:
        fd = os.open(naming.shm_path(name), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        if size < layout.SEGMENT_HEADER_BYTES + layout.REGISTRY_HEAD_BYTES:
            return None
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    try:
        h = layout.SEGMENT_HEADER.unpack_from(mm, 0)
        if h[0] != layout.MAGIC or h[2] != SegmentKind.REGISTRY:
            return None
        _, capacity = layout.REGISTRY_HEAD.unpack_from(mm, layout.SEGMENT_HEADER_BYTES)
        base = layout.SEGMENT_HEADER_BYTES + layout.REGISTRY_HEAD_BYTES
        capacity = min(capacity, (size - base) // layout.REGISTRY_ENTRY_BYTES)
        entries = []
        for i in range(capacity):
            off = base + i * layout.REGISTRY_ENTRY_BYTES
            pid = int.from_bytes(mm[off : off + 8], "little")
            if pid == 0:
                continue
            start = int.from_bytes(mm[off + 8 : off + 16], "little")
            state = int.from_bytes(mm[off + 16 : off + 20], "little")
            raw = mm[off + layout.REG_NAME : off + layout.REG_NAME + layout.REG_NAME_BYTES]
            if state in (EntryState.CLAIMED, EntryState.LIVE):
                entries.append((ProcId(pid, start), raw.rstrip(b"\0").decode()))
            elif state == EntryState.FREE:  # claimed, then killed before writing: the claimer counts as owner
                entries.append((ProcId(pid, start), ""))
        return ProcId(h[4], h[6]), entries
    finally:
        mm.close()


def cleanup(dry_run: bool = False, instance: str | None = None) -> CleanupReport:
    report = CleanupReport()
    names = naming.list_names()
    if instance is not None:
        names = [n for n in names if naming.instance_of(n) == naming.check_instance(instance)]
    covered: set[str] = set()
    judged: dict[str, ProcId] = {}  # registry -> the owner it had when we judged it stale
    for reg in (n for n in names if naming.is_registry(n)):
        view = _registry_view(reg)
        if view is None:
            continue  # not an mpkv registry: handled with the orphans below
        owner, entries = view
        inst = naming.instance_of(reg) or "?"
        covered.add(reg)
        covered.update(name for _, name in entries if name)
        if owner.alive() or any(p.alive() for p, _ in entries):
            report.live_instances.append(inst)
            continue
        for _, name in entries:
            if name and name in names:
                report.removed.append(name)
        report.removed.append(reg)
        judged[reg] = owner
    for name in names:
        if name in covered:
            continue
        seg_owner = read_owner(name)
        if seg_owner is None:
            report.foreign.append(name)
        elif not seg_owner.alive():
            report.removed.append(name)
    if not dry_run:
        for name in report.removed:
            if name in judged and read_owner(name) != judged[name]:
                continue  # a new run of the instance took the name since we looked: it is live, keep it
            unlink_if_exists(name)
    return report
