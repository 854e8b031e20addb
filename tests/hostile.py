"""Another local user, for the I8 tests: child bodies that drop to uid/gid 65534 before they do anything, so what
they create is really that user's (the tests run as root; without root they are skipped).

/dev/shm and /tmp are sticky and world-writable: the other user can create names there, not remove ours.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

from procs import report

from mpkv import layout
from mpkv.layout import EntryState, SegmentKind
from mpkv.shm.proc import ProcId

NOBODY = 65534
DEAD = ProcId(1, 2**40 - 1)  # pid 1 never started at that tick: a claimer that is dead for sure


def become_nobody() -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def forge_registry(path: str, run_id: str, entries: list[str], owner: ProcId = DEAD) -> None:
    """Write a well-formed registry at ``path`` listing ``entries`` as LIVE names claimed by ``owner``. Its
    header claims uid 0: the lie that only the file's real owner (fstat) gives away."""
    capacity = max(8, len(entries))
    payload = layout.REGISTRY_HEAD_BYTES + capacity * layout.REGISTRY_ENTRY_BYTES
    total = layout.SEGMENT_HEADER_BYTES + payload
    buf = bytearray(total)
    header = (layout.MAGIC, layout.LAYOUT_VERSION, int(SegmentKind.REGISTRY), total, owner.pid, 0)
    layout.SEGMENT_HEADER.pack_into(buf, 0, *header, owner.start_ticks, time.time_ns(), 1, b"forged")
    layout.REGISTRY_HEAD.pack_into(buf, layout.SEGMENT_HEADER_BYTES, run_id.encode(), capacity)
    for i, name in enumerate(entries):
        off = layout.SEGMENT_HEADER_BYTES + layout.REGISTRY_HEAD_BYTES + i * layout.REGISTRY_ENTRY_BYTES
        buf[off : off + 8] = owner.pid.to_bytes(8, "little")
        buf[off + layout.REG_START : off + layout.REG_START + 8] = owner.start_ticks.to_bytes(8, "little")
        buf[off + layout.REG_STATE : off + layout.REG_STATE + 4] = int(EntryState.LIVE).to_bytes(4, "little")
        buf[off + layout.REG_KIND : off + layout.REG_KIND + 4] = int(SegmentKind.RING).to_bytes(4, "little")
        buf[off + layout.REG_NAME : off + layout.REG_NAME + len(name)] = name.encode()
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, bytes(buf))
    finally:
        os.close(fd)


def plant_registry(path: str, run_id: str, entries: list[str], conn: Connection) -> None:
    def body() -> int:
        become_nobody()
        forge_registry(path, run_id, entries)
        return os.getuid()

    report(conn, body)


def squat(paths: list[str], conn: Connection) -> None:
    """Create every path (empty files, mode 0644), as the other user; returns how many it could create."""

    def body() -> int:
        become_nobody()
        made = 0
        for p in paths:
            try:
                os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                made += 1
            except FileExistsError:
                pass
        return made

    report(conn, body)


def hijack_dir(root: str, sub: str, links: dict[str, str], conn: Connection) -> None:
    """Make ``root`` and ``root/sub`` world-writable directories of the other user's, with symlinks name -> target
    in ``root/sub``: what a log directory made with exist_ok and no check would be taken over by."""

    def body() -> None:
        become_nobody()
        for d in (root, os.path.join(root, sub)):
            os.mkdir(d)
            os.chmod(d, 0o777)
        for name, target in links.items():
            os.symlink(target, os.path.join(root, sub, name))

    report(conn, body)
