"""`mpkv cleanup`: reclaim the names of instances whose owners are all dead. Never touches a live instance.

An instance is stale when the creator of its registry and every process that claimed a name in it are dead
(pid + start time, so a reused pid does not keep a dead instance alive). Segments of ours that no registry
lists (a registry lost, or a run replaced by a newer one) are reclaimed when their own header's owner is dead.
Files that do not carry an mpkv header are reported and left alone: they are not ours to delete. So are files
under our name prefix that another user created (or links, or files not 0600): they are not judged at all.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
from dataclasses import dataclass, field

import psutil

from mpkv import layout, naming
from mpkv.layout import EntryState, SegmentKind
from mpkv.shm.proc import ProcId
from mpkv.shm.registry import unlink_if_exists
from mpkv.shm.segment import NotOurs, open_private, read_owner


@dataclass
class CleanupReport:
    removed: list[str] = field(default_factory=list)
    live_instances: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # our prefix, but no mpkv header: left alone
    untrusted: list[tuple[str, str]] = field(default_factory=list)  # (name, why): not ours to judge, left alone
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (entry, registry, its run's prefix)
    log_dirs: list[str] = field(default_factory=list)  # log directories of instances that are gone

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would remove" if dry_run else "removed"
        out = [f"{verb} {n}" for n in self.removed]
        out += [f"kept live instance {i}" for i in self.live_instances]
        out += [f"left alone {n}: not an mpkv segment" for n in self.foreign]
        out += [f"left alone {n}: it {why}" for n, why in self.untrusted]
        out += [
            f"ignored {entry} listed by {reg}: not a name of that registry's run ({prefix}*); "
            "a registry lists only its own instance's names"
            for entry, reg, prefix in self.refused
        ]
        out += [f"{verb} log directory {d}" for d in self.log_dirs]
        if not out:
            out.append("nothing to clean up")
        return out


@dataclass
class _RegistryView:
    owner: ProcId
    prefix: str  # every name this registry may list starts with it: its instance and run id
    entries: list[tuple[ProcId, str]]  # (claimer, name); "" for a claim killed before it wrote the name


def _registry_view(name: str) -> _RegistryView | str | None:
    """Owner and entries of a registry, read without requiring it to be ready (its creator may have died).
    None: gone, or not an mpkv registry (judged as an orphan). A string: why it is not trusted."""
    try:
        fd = open_private(naming.shm_path(name))
    except FileNotFoundError:
        return None
    except NotOurs as e:
        return e.reason
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
        if h[5] != os.getuid():
            return f"says it was created by uid {h[5]}, not by us (uid {os.getuid()})"
        raw_run, capacity = layout.REGISTRY_HEAD.unpack_from(mm, layout.SEGMENT_HEADER_BYTES)
        run_id = raw_run.rstrip(b"\0").decode(errors="replace")
        try:
            prefix = naming.run_prefix(naming.instance_of(name) or "", run_id)
        except naming.BadName as e:
            return f"is corrupt ({e})"
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
                entries.append((ProcId(pid, start), raw.rstrip(b"\0").decode(errors="replace")))
            elif state == EntryState.FREE:  # claimed, then killed before writing: the claimer counts as owner
                entries.append((ProcId(pid, start), ""))
        return _RegistryView(ProcId(h[4], h[6]), prefix, entries)
    finally:
        mm.close()


def _ours(name: str, report: CleanupReport) -> bool:
    """Whether ``name`` is still there and a file of ours; one that is another user's is reported, left alone."""
    try:
        os.close(open_private(naming.shm_path(name)))
    except FileNotFoundError:
        return False
    except NotOurs as e:
        report.untrusted.append((name, e.reason))
        return False
    return True


def _judge_orphan(name: str, report: CleanupReport) -> None:
    """A name no trusted registry lists: reclaimed when it is an mpkv segment of ours whose owner is dead."""
    if not _ours(name, report):
        return
    seg_owner = read_owner(name)
    if seg_owner is None:
        report.foreign.append(name)
    elif not seg_owner.alive():
        report.removed.append(name)


def cleanup(dry_run: bool = False, instance: str | None = None) -> CleanupReport:
    """Only files of ours (owner, mode 0600, not a link: checked on the opened file) are judged, and a registry
    vouches only for names of its own instance and run: another user cannot plant a registry that makes us
    unlink a live instance's names, nor a link that makes us read or unlink something else."""
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
        covered.add(reg)
        if isinstance(view, str):
            report.untrusted.append((reg, view))
            continue
        inst = naming.instance_of(reg) or "?"
        listed = []
        for claimer, name in view.entries:
            if name and not name.startswith(view.prefix):
                report.refused.append((name, reg, view.prefix))
            else:
                listed.append((claimer, name))
        covered.update(name for _, name in listed if name)
        # Liveness counts every claimer, refused ones too: keeping a dead instance a while longer is harmless.
        if view.owner.alive() or any(p.alive() for p, _ in view.entries):
            report.live_instances.append(inst)
            continue
        for _, name in listed:
            if name and name in names and _ours(name, report):
                report.removed.append(name)
        report.removed.append(reg)
        judged[reg] = view.owner
    for name in names:
        if name not in covered:
            _judge_orphan(name, report)
    if not dry_run:
        # Every name judged is a file of ours in a sticky directory: no other user can swap it before the unlink.
        for name in report.removed:
            if name in judged and read_owner(name) != judged[name]:
                continue  # a new run of the instance took the name since we looked: it is live, keep it
            unlink_if_exists(name)
    return report


# -- log directories: <root>/<instance>, made by the launcher (mpkv.launcher.Launcher._log_dir) --------------------
LAUNCHER_TITLE = naming.LAUNCHER_TITLE  # mpkv.launcher sets it before it makes the log directory


def _launchers() -> tuple[set[str], list[str]]:
    """The instance names of this user's running launchers, from their titles; and where only the comm name is
    set (no setproctitle), the first characters of a name: such a prefix keeps every directory it begins."""
    names, prefixes = set(), []
    # A process gone meanwhile, or one we may not read, has None for what could not be read (it is skipped).
    for p in psutil.process_iter(["uids", "cmdline", "name"], ad_value=None):
        uids, cmdline, comm = p.info["uids"], p.info["cmdline"], p.info["name"] or ""
        if uids is None or uids.effective != os.getuid():
            continue
        title = cmdline[0] if cmdline else ""
        if title.startswith(LAUNCHER_TITLE):
            names.add(title[len(LAUNCHER_TITLE) :])
        elif comm.startswith(LAUNCHER_TITLE):
            prefixes.append(comm[len(LAUNCHER_TITLE) :])
    return names, prefixes


def cleanup_log_dirs(report: CleanupReport, dry_run: bool = False, instance: str | None = None) -> None:
    """Remove the log directories of instances that are gone: no name of theirs left in /dev/shm (after
    ``cleanup``; in a dry run, none but those it would remove) and no launcher of theirs running (a launcher makes
    its log directory just before its names). Only the root the launcher uses (MPKV_LOG_DIR, else
    <tmp>/mpkv-logs.u<uid>) is looked at, and only when it is ours and private: then no one else can swap an entry
    in it, and each directory is judged opened without following a link; a link or another user's entry is left
    alone and said."""
    root = naming.log_root()
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        report.untrusted.append(
            (root, "is a symbolic link or not a directory" if e.errno == errno.ELOOP else e.strerror or str(e))
        )
        return
    try:
        st = os.fstat(root_fd)
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            report.untrusted.append(
                (root, f"is not private to us (uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
            )
            return
        removed = set(report.removed)
        busy = {naming.instance_of(n) for n in naming.list_names() if n not in removed}
        busy |= set(report.live_instances)
        launching, prefixes = _launchers()
        busy |= launching
        for name in sorted(os.listdir(root_fd)):
            if instance is not None and name != instance:
                continue
            if name in busy or any(name.startswith(p) for p in prefixes):
                continue
            path = os.path.join(root, name)
            why = _not_ours(name, root_fd)
            if why:
                report.untrusted.append((path, why))
                continue
            report.log_dirs.append(path)
            if not dry_run:
                shutil.rmtree(name, dir_fd=root_fd)  # fd-based: it never follows a link inside either
    finally:
        os.close(root_fd)


def _not_ours(name: str, root_fd: int) -> str | None:
    """Why the entry ``name`` of the log root is not a directory of ours to remove, or None."""
    try:
        naming.check_instance(name)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    except naming.BadName:
        return "is not named as an instance"
    except OSError as e:
        return (
            "is a symbolic link or not a directory" if e.errno in (errno.ELOOP, errno.ENOTDIR) else e.strerror or str(e)
        )
    try:
        uid = os.fstat(fd).st_uid
    finally:
        os.close(fd)
    return None if uid == os.getuid() else f"belongs to uid {uid}"
