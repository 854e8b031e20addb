"""Records of bytes in a blob segment that are rewritten while others read them: the pool handles.

NOTE [ synchronised record ]
The record of rank r's pool handle is rewritten at every restore while others read it at any time (the decode
allocator's sync() polls it), so it is a seqlock record, not the length-then-bytes record of the config and the
error texts (those are written once, before the write that publishes them: ready, FAILED; and the error record
is an ABI, docs/control-block.md). Byte map of a record, at ``HANDLE_RECORD_BYTES * r`` in the payload:

    0 seq u64 (odd while written) | 8 writer u64 (pid u32 | start ticks mod 2**32, the claim-word form of
    NOTE [ signal slot ]) | 16 len u32 | 20 (reserved) | 24 bytes

The writer stores its identity, makes seq odd, full fence, stores len and bytes, then seq even (release): so a
record left odd names who left it. A reader reads seq (acquire), len and the bytes, fences, reads seq again, and
keeps the copy only if seq was even and unchanged; else it retries, yielding, for at most TORN_LIMIT_S, and
raises PeerDied naming the writer at once when the record is odd and that writer is dead (the next write of the
record, by the restarted owner, completes it as seq_write repairs a torn signal slot).
"""

from __future__ import annotations

import os
import struct
import time

from mpkv import _native, layout
from mpkv.errors import MpkvError, PeerDied
from mpkv.shm.proc import ProcId
from mpkv.shm.segment import Segment
from mpkv.shm.signals import TORN_LIMIT_S, claim_word, claimant_of

_SYNC = struct.Struct("<QQI4x")
assert _SYNC.size == 24


def write_sync_record(seg: Segment, index: int, size: int, raw: bytes) -> None:
    if len(raw) > size - _SYNC.size:
        raise MpkvError(f"record of {len(raw)} bytes does not fit {seg.name}'s {size - _SYNC.size}-byte records")
    buf, off = seg.buf, layout.SEGMENT_HEADER_BYTES + index * size
    seq = _native.load_u64(buf, off)
    _native.store_u64(buf, off + 8, claim_word(ProcId.me()))
    # Odd already: its last writer died mid-write. Readers wait since then, and this write completes the record.
    if not seq & 1:
        seq += 1
        _native.store_u64(buf, off, seq)
    _native.fence()
    _native.store_u32(buf, off + 16, len(raw))
    buf[off + _SYNC.size : off + _SYNC.size + len(raw)] = raw
    _native.store_u64(buf, off, seq + 1)


def read_sync_record(seg: Segment, index: int, size: int) -> bytes:
    buf, off, cap = seg.buf, layout.SEGMENT_HEADER_BYTES + index * size, size - _SYNC.size
    since = time.monotonic()
    while True:
        seq = _native.load_u64(buf, off)
        if not seq & 1:
            n = _native.load_u32(buf, off + 16)
            raw = bytes(buf[off + _SYNC.size : off + _SYNC.size + min(n, cap)])
            _native.fence()
            if _native.load_u64(buf, off) == seq:
                if n > cap:
                    raise MpkvError(f"record {index} of {seg.name} claims {n} bytes; it holds at most {cap}")
                return raw
        elif not _alive(who := claimant_of(_native.load_u64(buf, off + 8))):
            raise PeerDied(
                f"record {index} of {seg.name} was left mid-write (sequence {seq}) by its writer {_named(who)}: it "
                f"died while writing it; the record is whole again once its next writer writes it"
            )
        if time.monotonic() - since >= TORN_LIMIT_S:
            who = claimant_of(_native.load_u64(buf, off + 8))
            raise PeerDied(
                f"record {index} of {seg.name} could not be read whole for {TORN_LIMIT_S:g} s (sequence {seq}): "
                f"its writer {_named(who)} died or was stopped while writing it"
            )
        os.sched_yield()


def _alive(who: ProcId | None) -> bool:
    return who is None or who.alive()  # an odd record that names nobody: wait for the deadline


def _named(who: ProcId | None) -> str:
    return who.describe() if who is not None else "(not recorded)"
