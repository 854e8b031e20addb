"""Named shared-memory segments with an owner header (NOTE [ segment header ] in mpkv.layout).

Created O_EXCL with mode 0600 through posix_ipc, mapped with mmap. We do not use
``multiprocessing.shared_memory``: on Python <= 3.12 its resource tracker unlinks a segment when a process
that merely attached to it exits. Here only the owner unlinks, explicitly (``unlink``) or at interpreter exit
(a ``weakref.finalize`` on a free function); after ``kill -9`` the registry and ``mpkv cleanup`` reclaim it.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
import weakref

import posix_ipc

from mpkv import _native, layout, naming
from mpkv.errors import (
    AttachError,
    NameTaken,
    NotOurs,
)
from mpkv.layout import SegmentKind
from mpkv.shm.proc import ProcId


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


_READ_ONLY = False


def read_only_process() -> None:
    """From now on this process maps every segment it attaches read-only (mpkv-top: an inspector that cannot
    write into an instance's memory even by mistake). It can create none."""
    global _READ_ONLY
    _READ_ONLY = True


class Segment:
    """A mapped segment. ``payload`` is a writable memoryview of the bytes after the header."""

    def __init__(self, name: str, mm: mmap.mmap, header: tuple, owned: bool) -> None:
        self.name = name
        self._mm = mm
        self.kind = SegmentKind(header[2])
        self.total_bytes: int = header[3]
        self.owner = ProcId(header[4], header[6])
        self.owner_uid: int = header[5]
        self.created_ns: int = header[7]
        self.owned = owned
        self.buf = memoryview(mm)
        self.payload = self.buf[layout.SEGMENT_HEADER_BYTES :]
        self._finalizer = weakref.finalize(self, _unlink_quietly, name) if owned else None

    # -- creation and attachment ---------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, kind: SegmentKind, payload_bytes: int) -> Segment:
        """Create ``name`` exclusively; the caller fills the payload, then calls ``mark_ready``."""
        if _READ_ONLY:
            raise AttachError(f"segment {name}: this process is a read-only inspector; it creates nothing")
        if payload_bytes <= 0:
            raise ValueError(f"segment {name}: payload size must be positive, got {payload_bytes}")
        total = layout.SEGMENT_HEADER_BYTES + payload_bytes
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=total)
        except posix_ipc.ExistentialError:
            raise NameTaken(f"cannot create {name}: {describe_existing(name)}") from None
        try:
            mm = mmap.mmap(shm.fd, total)
        except BaseException:
            _unlink_quietly(name)
            raise
        finally:
            shm.close_fd()
        me = ProcId.me()
        header = (
            layout.MAGIC,
            layout.LAYOUT_VERSION,
            int(kind),
            total,
            me.pid,
            os.getuid(),
            me.start_ticks,
            time.time_ns(),
            0,
            name.encode()[: layout.NAME_BYTES],
        )
        layout.SEGMENT_HEADER.pack_into(mm, 0, *header)
        return cls(name, mm, header, owned=True)

    def mark_ready(self) -> None:
        """Publish the payload: attachers refuse a segment whose creator has not reached this point."""
        _native.store_u32(self.buf, layout.HDR_READY_OFFSET, 1)

    @classmethod
    def attach(cls, name: str, kind: SegmentKind, payload_bytes: int | None = None) -> Segment:
        """Map an existing segment after checking that it is an mpkv segment of this user, kind and size.
        In a process that called ``read_only_process()`` the mapping is read-only (PROT_READ): any write faults."""
        try:
            shm = posix_ipc.SharedMemory(name, read_only=_READ_ONLY)  # glibc's shm_open adds O_NOFOLLOW
        except posix_ipc.ExistentialError:
            raise AttachError(f"no segment {name}: the instance is not running, or it was cleaned up") from None
        except posix_ipc.PermissionsError:
            raise AttachError(f"segment {name} is not readable by uid {os.getuid()}: another user's") from None
        except OSError as e:
            raise AttachError(f"segment {name} cannot be opened: {_open_failure(e)}") from None
        try:
            # The opened file is judged (fstat), not the path: nothing can be swapped in between.
            st = os.fstat(shm.fd)
            problem = private_file_problem(st)
            if problem:
                raise AttachError(f"segment {name} {problem}")
            if st.st_size < layout.SEGMENT_HEADER_BYTES:
                raise AttachError(f"segment {name} is {st.st_size} bytes, too small to be an mpkv segment")
            # Pools are prefaulted at attach (MAP_POPULATE): the page faults belong to restore, not to a swap.
            flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if kind == SegmentKind.POOL and not _READ_ONLY else 0)
            prot = mmap.PROT_READ if _READ_ONLY else mmap.PROT_READ | mmap.PROT_WRITE
            mm = mmap.mmap(shm.fd, st.st_size, flags=flags, prot=prot)
        finally:
            shm.close_fd()
        try:
            # ready first, with acquire order: then the header and payload written before it are visible too
            ready = _native.load_u32(mm, layout.HDR_READY_OFFSET) == 1
            header = layout.SEGMENT_HEADER.unpack_from(mm, 0)
            _check_header(name, header, kind, st.st_size, payload_bytes)
            if not ready:
                raise AttachError(
                    f"segment {name} is not ready: its creator {ProcId(header[4], header[6]).describe()} "
                    "has not finished initializing it"
                )
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, header, owned=False)

    # -- teardown ------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Unmap. Every view handed out (rings, arrays) must be released first."""
        if self._mm.closed:
            return
        self.payload.release()
        self.buf.release()
        self._mm.close()

    def unlink(self) -> None:
        """Remove the name (owner only). The mapping stays valid until ``close``."""
        if not self.owned:
            raise AttachError(f"segment {self.name}: only its owner {self.owner.describe()} may unlink it")
        if self._finalizer is not None:
            self._finalizer()

    def disown(self) -> None:
        """Leave the name for someone else to unlink (the instance's launcher, once nothing refers to it): this
        process exiting, or dropping the object, no longer removes it."""
        if self._finalizer is not None:
            self._finalizer.detach()
        self.owned = False

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, {self.kind.name}, {self.total_bytes} B, owner {self.owner.pid})"


def _check_header(name: str, h: tuple, kind: SegmentKind, file_bytes: int, payload_bytes: int | None) -> None:
    magic, version, seg_kind, total, _pid, uid = h[:6]
    if magic != layout.MAGIC:
        raise AttachError(f"{name} exists but is not an mpkv segment (bad magic {magic[:8]!r}): a foreign file")
    if version != layout.LAYOUT_VERSION:
        raise AttachError(
            f"segment {name} has layout version {version}, this mpkv speaks {layout.LAYOUT_VERSION}: "
            "all processes of an instance must run the same mpkv"
        )
    if seg_kind != kind:
        found = SegmentKind(seg_kind).name if seg_kind in SegmentKind._value2member_map_ else str(seg_kind)
        raise AttachError(f"segment {name} is a {found} segment, expected {kind.name}")
    if total != file_bytes:
        raise AttachError(f"segment {name}: header says {total} bytes but the file has {file_bytes}")
    if payload_bytes is not None and total != layout.SEGMENT_HEADER_BYTES + payload_bytes:
        held = total - layout.SEGMENT_HEADER_BYTES
        raise AttachError(f"segment {name} holds {held} payload bytes, expected {payload_bytes}")
    if uid != os.getuid():
        raise AttachError(f"segment {name} was created by uid {uid}, not by us (uid {os.getuid()})")


def private_file_problem(st: os.stat_result) -> str | None:
    """Why a file cannot be one mpkv created (regular, ours, mode 0600), or None when it can."""
    if not stat.S_ISREG(st.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        return f"is {what}: mpkv creates only regular files"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to us (uid {os.getuid()})"
    if stat.S_IMODE(st.st_mode) & 0o077:
        return f"has mode {stat.S_IMODE(st.st_mode):04o}; mpkv creates 0600: not ours"
    return None


def _open_failure(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "it is a symbolic link (mpkv never creates one: another user's trap, or a mistake); remove it by hand"
    return f"{e.strerror} (errno {e.errno})"


def open_private(path: str) -> int:
    """Open a file of our name space read-only, refusing to follow a symbolic link (O_NOFOLLOW), to block on a
    FIFO (O_NONBLOCK), or to trust what the opened file is not (fstat on the fd: no race with a rename).
    Raises FileNotFoundError when it is gone, NotOurs when it is not ours."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise NotOurs(path, f"cannot be opened: {_open_failure(e)}") from None
    problem = private_file_problem(os.fstat(fd))
    if problem:
        os.close(fd)
        raise NotOurs(path, problem)
    return fd


def read_owner(name: str) -> ProcId | None:
    """The owner recorded in a segment's header, or None when it is missing, not ours, or not an mpkv segment."""
    try:
        fd = open_private(naming.shm_path(name))
    except (FileNotFoundError, NotOurs):
        return None
    try:
        raw = os.read(fd, layout.SEGMENT_HEADER.size)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) < layout.SEGMENT_HEADER.size:
        return None
    h = layout.SEGMENT_HEADER.unpack(raw)
    return ProcId(h[4], h[6]) if h[0] == layout.MAGIC else None


def describe_existing(name: str) -> str:
    try:
        problem = private_file_problem(os.lstat(naming.shm_path(name)))
    except OSError:
        problem = None
    if problem:
        return (
            f"the name is taken by a file that {problem} (squatted by another user?); its owner or root must remove it"
        )
    owner = read_owner(name)
    if owner is None:
        return "the name is taken by a file that is not an mpkv segment (squatted?); remove it by hand"
    if owner.alive():
        return f"it exists and its owner {owner.describe()} is alive (is the instance already running?)"
    return f"it is a leftover of {owner.describe()}; run `mpkv cleanup` to reclaim it"
