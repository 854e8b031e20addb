"""Every shared-memory layout: offsets, sizes, who writes each word. The bytes are an ABI.

All integers are little-endian (asserted below: the futex word of a 64-bit counter is its low half).
Every 64-bit word that another process reads is accessed through ``mpkv._native`` (C11 atomics), never by
plain Python or numpy loads, so the orderings hold on aarch64 as well as x86-64.

NOTE [ segment header ]
Every mpkv segment starts with this 256-byte header, written once by the creating process before it sets
``ready`` (release store, last). Attachers check magic, layout version, kind, total size (against the file's
size too), the owner uid (against the file's uid too) and ``ready``::

    0   magic          8s   b"MPKVSEG\\0"
    8   layout_version u32  LAYOUT_VERSION
    12  kind           u32  SegmentKind
    16  total_bytes    u64  header + payload, equals the file size
    24  owner_pid      u32  creator
    28  owner_uid      u32  creator's uid
    32  owner_start    u64  creator's start time (clock ticks since boot, /proc/PID/stat field 22)
    40  created_ns     u64  time.time_ns() at creation
    48  ready          u32  0 while initializing, 1 when the payload is valid  (creator writes, last)
    52  (reserved)
    64  name           96s  the OS name, NUL-padded (so a header found on disk names itself)
    160 (reserved up to 256)

NOTE [ ring layout ]
A ring has one writer and ``nreaders`` readers (1 for SPSC lanes; N for broadcast). Every line is 64 bytes;
each endpoint owns two lines, so no two processes ever write the same cache line::

    line 0            params (creator, immutable): capacity u64 @0, nreaders u32 @8, max_payload u32 @12
    line 1            writer position  u64 @0 | gate u64 @8   (writer only; NOTE [ submission gate ], mpkv.shm.ring)
    line 2            writer meta                   (writer only)
    line 3 + 2i       reader i position u64         (reader i only)
    line 4 + 2i       reader i meta                 (reader i only)
    line 3 + 2n ...   data: ``capacity`` bytes (a power of two)

    endpoint meta:  pid u32 @0 | sleeping u32 @4 | start_ticks u64 @8 | wait_since_ns u64 @16 |
                    heartbeat_ns u64 @24 | state u32 @32 | waiting_on i32 @36 | label 24s @40

NOTE [ endpoint claim ]
An endpoint is claimed by compare-and-swap of the 64-bit word at meta offset 0 (``pid u32 | sleeping u32``) from
the value read to ``pid | META_CLAIMING << 32``; the winner then stores its start time, label, heartbeat, state
ATTACHED, and last (release) ``sleeping = 0``. A claimer judges the holder it finds by pid and start time only when
the slot says ATTACHED and the word carries no CLAIMING mark; otherwise by pid alone. Why: a SIGKILLed holder
leaves ATTACHED and its start time behind; a claimer A that won the CAS but has not yet stored its start time
would, judged by its pid next to the dead holder's start time, look dead, and a second claimer B's CAS would
succeed too (two writers of one ring, against I1). With the mark, B judges A by pid alone, sees it alive (even if
stopped) and is refused. The mark costs nothing: a peer reading it as a sleeping flag only wakes a futex in vain.
A claimer that dies before it clears the mark is judged by pid alone: its slot is free once the pid is gone (a pid
reused meanwhile keeps it refused while the new process lives: the safe side). ``Barrier._claim`` (pid alone
until it writes its start) and the signal slots (pid and start in one word, NOTE [ signal slot ]) need no mark.

Positions are byte counters that only grow; a slot index is ``pos % capacity``. A message is a frame:
``len u32 | 0 u32 | payload | pad to 8``. When a frame does not fit before the end of the data region, the
writer writes the wrap mark ``0xFFFFFFFF`` as the length and continues at index 0. Free space is
``capacity - (writer pos - min over readers of reader pos)``: the writer never overwrites a byte that some
reader has not consumed. Order of writes: the writer copies the frame, then release-stores its position;
a reader acquire-loads that position, copies the payload, then release-stores its own position.
Sleeping: see ``mpkv/shm/_native.c`` (eventcount; the flag is the sleeper's own ``sleeping`` word; a writer
waiting for space sleeps on the futex of the slowest reader's position, named in ``waiting_on``).

NOTE [ signal slot ]  (mpkv.shm.signals)
One 64-byte slot per signal, seqlock-protected, one writer per slot::

    0  seq u64 (odd while the writer is mid-write) | 8 value i64 | 16 epoch u64 | 24 writer_pid u64 |
    32 writer_start u64 | 40 timestamp_ns u64 | 48 aux u64 | 56 claim u64

``claim`` names the slot's one writer whole, in one word: ``pid u32 | (start ticks mod 2**32) u32`` (low half
first, little-endian). It is set by compare-and-swap when a ``SignalWriter`` is made (of two processes claiming
at once one wins), outside the seqlock, and given back (CAS to 0) by ``SignalWriter.release``. A claim whose
process is dead, judged by pid and start time, may be taken over. Why both halves in one word: a claimer judged
by its pid next to a start time written by someone else (a dead predecessor) looks dead and can be claimed away
while it lives (the ring endpoint bug, NOTE [ endpoint claim ]). A claim with 0 in the high half (a bare pid, what
a driver following docs/control-block.md writes) is judged by pid alone: never taken from a live process. The
start time is truncated: a pid reused by a process whose start differs by a multiple of 2**32 ticks (497 days at
100 Hz) would be taken for the old one; the truncation costs nothing else.

Signals are control words, written rarely, so the writer wakes the futex of ``seq`` after every write and
waiters need no flag of their own: nobody but the slot's writer ever stores into the slot.

NOTE [ torn signal slot ]
A writer killed between its two sequence stores leaves ``seq`` odd: no read of the slot can complete. Readers
spin on it for a few ms (``TORN_POLL_S``), then look at the claimant: dead, they raise ``PeerDied`` naming it at
once; alive (stopped, or starved), they retry until ``TORN_LIMIT_S`` and then raise naming it. Nobody but the
writer stores into the slot, so the slot stays torn until a new ``SignalWriter`` takes the dead claimant's claim
over (which reads only the claim word, never the torn record). That writer repairs the slot before anything else:
``seq_write`` on an odd ``seq`` writes the whole record and makes ``seq`` even once (readers were waiting all
along, so no reader ever pairs words of two writes). What it writes: the torn payload cannot be trusted (some
words are the dead writer's new ones, some the old), so the record claims nothing: the zero member of the
array's enum (every array has one: "never reached"), the epoch word as found (epochs never go back: the command
word's next epoch is derived from it, and an actor ahead of a command fails), aux as found. Monotone predicates
("READY at epoch >= e") are not satisfied by a zero value at an epoch they did not reach. A caller whose slot's
zero member means something (the command word's NONE is "run") writes its real record right after taking over.

NOTE [ barrier layout ]  (mpkv.shm.barrier)
One 128-byte line pair per rank, written by that rank only::

    0   arrived_gen u64    generation this rank last arrived at (0 = never)
    8   sleeping u32       this rank sleeps waiting for others
    12  (reserved)
    16  pid u64 | 24 start_ticks u64 | 32 wait_since_ns u64
    64  key[0]: seq u64 @64 | tag 24s @72       (key for generations with gen % 2 == 0)
    96  key[1]: seq u64 @96 | tag 24s @104      (key for generations with gen % 2 == 1)

Two key slots suffice: a rank can only arrive at generation g+2 after every rank left g+1, which every
rank does only after it has read all keys of generation g.

NOTE [ registry layout ]  (mpkv.shm.registry)
Payload: ``run_id 16s @0 | capacity u32 @16`` then ``capacity`` entries of 128 bytes::

    0  claim u64     0 = free; else the claimer's pid, written once by compare-and-swap from 0
    8  start u64     claimer's start ticks     |  16 state u32 (EntryState)  |  20 kind u32 (SegmentKind)
    24 name 104s

Only the claimer writes the rest of its entry (a failed compare-and-swap writes nothing). When it unlinks
the name it sets ``state`` GONE and then stores 0 into ``claim``: the entry is free for the next claim.
"""

from __future__ import annotations

import enum
import struct
import sys

if sys.byteorder != "little":  # pragma: no cover - no big-endian platform is supported
    raise ImportError("mpkv's shared-memory layouts are little-endian only")

LAYOUT_VERSION = 2  # 2: the ledger packs version << 3 (a weights tier); the weights record holds publications
LINE_BYTES = 64
MAGIC = b"MPKVSEG\0"


class SegmentKind(enum.IntEnum):
    REGISTRY = 1
    RING = 2
    SIGNALS = 3
    BARRIER = 4
    POOL = 5
    BLOB = 6  # opaque records: the instance config, error texts, pool handles (mpkv.instance)
    WEIGHTS = 7  # a bucket or the manifest of published weights (mpkv.publication)
    TEST = 99


# --- segment header --------------------------------------------------------------------------------------
SEGMENT_HEADER = struct.Struct("<8sIIQIIQQI12x96s")
SEGMENT_HEADER_BYTES = 256
HDR_READY_OFFSET = 48
NAME_BYTES = 96
assert SEGMENT_HEADER.size == 160 and SEGMENT_HEADER.size <= SEGMENT_HEADER_BYTES
assert struct.calcsize("<8sIIQIIQQ") == HDR_READY_OFFSET


# --- ring --------------------------------------------------------------------------------------------------
RING_PARAMS = struct.Struct("<QII")
META_PID, META_SLEEPING, META_START, META_WAIT_SINCE, META_HEARTBEAT = 0, 4, 8, 16, 24
META_STATE, META_WAITING_ON, META_LABEL = 32, 36, 40
META_CLAIMING = (
    0x434C4149  # "CLAI": the high half of the claim word while a claim is under way (NOTE [ endpoint claim ])
)
LABEL_BYTES = 24
FRAME_HEADER_BYTES = 8


class EndpointState(enum.IntEnum):
    UNATTACHED = 0
    ATTACHED = 1
    DETACHED = 2


def ring_header_bytes(nreaders: int) -> int:
    return (3 + 2 * nreaders) * LINE_BYTES


def ring_writer_pos(base: int) -> int:
    return base + 1 * LINE_BYTES


def ring_writer_gate(base: int) -> int:
    return base + 1 * LINE_BYTES + 8


def ring_writer_meta(base: int) -> int:
    return base + 2 * LINE_BYTES


def ring_reader_pos(base: int, i: int) -> int:
    return base + (3 + 2 * i) * LINE_BYTES


def ring_reader_meta(base: int, i: int) -> int:
    return base + (4 + 2 * i) * LINE_BYTES


def ring_max_payload(capacity: int) -> int:
    """Largest payload that always fits eventually: a frame plus a worst-case wrap fit in the capacity."""
    return capacity // 2 - FRAME_HEADER_BYTES - 8


# --- signal slots ---------------------------------------------------------------------------------------
SIGNAL_SLOT_BYTES = 64
SIGNAL_WORDS = 6  # value, epoch, writer_pid, writer_start, timestamp_ns, aux (after the seq word)
SIGNAL_SEQ, SIGNAL_VALUE, SIGNAL_EPOCH, SIGNAL_WRITER_PID, SIGNAL_WRITER_START = 0, 8, 16, 24, 32
SIGNAL_TIMESTAMP, SIGNAL_AUX, SIGNAL_CLAIM = 40, 48, 56
SIGNAL_CLAIM_WORD = struct.Struct("<II")  # pid, start ticks mod 2**32: one u64, so one compare-and-swap
assert SIGNAL_AUX == SIGNAL_VALUE + 8 * (SIGNAL_WORDS - 1) and SIGNAL_CLAIM + 8 == SIGNAL_SLOT_BYTES
assert SIGNAL_CLAIM_WORD.size == 8 and int.from_bytes(SIGNAL_CLAIM_WORD.pack(1, 2), "little") == 1 | 2 << 32


# --- barrier --------------------------------------------------------------------------------------------
BARRIER_RANK_BYTES = 128
BAR_ARRIVED, BAR_SLEEPING, BAR_PID, BAR_START, BAR_WAIT_SINCE = 0, 8, 16, 24, 32
BAR_KEY0, BAR_KEY_BYTES = 64, 32
BAR_KEY = struct.Struct("<Q24s")
BAR_TAG_BYTES = 24
assert BAR_KEY.size == BAR_KEY_BYTES


# --- registry -------------------------------------------------------------------------------------------
REGISTRY_HEAD = struct.Struct("<16sI")
REGISTRY_HEAD_BYTES = 64
REGISTRY_ENTRY_BYTES = 128
REG_CLAIM, REG_START, REG_STATE, REG_KIND, REG_NAME = 0, 8, 16, 20, 24
REG_NAME_BYTES = 104


class EntryState(enum.IntEnum):
    FREE = 0
    CLAIMED = 1  # name reserved, segment being created
    LIVE = 2  # segment exists
    GONE = 3  # unlinked by its owner
