"""Child-process bodies for the tests (module level, so the spawn start method can import them).

Each child reports through a Pipe connection: ("ok", result) or ("error", type name, message).
"""

from __future__ import annotations

import enum
import random
import struct
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

_HEAD = struct.Struct("<QI")  # sequence number, size


class Phase(enum.IntEnum):
    """A stand-in for an actor state enum in the signal tests."""

    IDLE = 0
    CLEARING = 1
    CLEARED = 2
    RESTORING = 3
    READY = 4


def message(seed: int, i: int, size: int) -> bytes:
    """Deterministic payload of ``size`` bytes for message i: both sides can compute it."""
    head = _HEAD.pack(i, size)
    body_len = max(0, size - len(head))
    pattern = ((seed * 1_000_003 + i * 7919) & 0xFFFFFFFF).to_bytes(4, "little")
    body = (pattern * (body_len // 4 + 1))[:body_len]
    return (head + body)[:size] if size >= len(head) else head[:size]


def sizes(seed: int, n: int, max_size: int = 8192) -> list[int]:
    """The random message sizes both sides agree on (at least 12 bytes, so the header fits)."""
    r = random.Random(seed)
    return [r.choice((12, 16, 64, 100, 256, 1000)) if r.random() < 0.9 else r.randint(12, max_size) for _ in range(n)]


def report(conn: Connection, body: Callable[[], Any]) -> None:
    try:
        conn.send(("ok", body()))
    except BaseException as e:
        conn.send(("error", type(e).__name__, f"{e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _pause(r: random.Random, every: int) -> None:
    if r.random() < 1.0 / every:
        time.sleep(r.uniform(0, 0.002))  # a random stall of the peer; not synchronization


def stream_writer(ring: str, seed: int, n: int, stall_every: int, conn: Connection) -> None:
    def body() -> int:
        from mpkv.shm.ring import RingWriter

        stalls = random.Random(seed + 1)
        batching = random.Random(seed + 3)
        szs = sizes(seed, n)
        with RingWriter(ring, label="writer") as w:
            i = 0
            while i < n:
                k = 1 if batching.random() < 0.7 else batching.randint(2, 32)
                batch = [message(seed, j, szs[j]) for j in range(i, min(n, i + k))]
                if len(batch) == 1:
                    w.put(batch[0], timeout_s=60)
                else:
                    w.put_many(batch, timeout_s=60)
                i += len(batch)
                _pause(stalls, stall_every)
            return w.blocked

    report(conn, body)


def stream_reader(ring: str, index: int, seed: int, n: int, stall_every: int, conn: Connection) -> None:
    def body() -> int:
        from mpkv.shm.ring import RingReader

        stalls = random.Random(seed + 2 + 10 * index)
        batching = random.Random(seed + 4 + 10 * index)
        szs = sizes(seed, n)
        with RingReader(ring, index, label=f"reader{index}") as r:
            i = 0
            while i < n:
                got = [r.get(timeout_s=60)] if batching.random() < 0.7 else r.get_many(32, timeout_s=60)
                for msg in got:
                    want = message(seed, i, szs[i])
                    if msg != want:
                        seq = _HEAD.unpack_from(msg)[0] if len(msg) >= _HEAD.size else None
                        raise AssertionError(f"message {i}: got {len(msg)} bytes (seq {seq}), want {len(want)}")
                    i += 1
                _pause(stalls, stall_every)
            extra = r.try_get()
            if extra is not None:
                raise AssertionError(f"reader {index} got a message past the last one: {extra[:16]!r}")
            return r.blocked

    report(conn, body)


def records_writer(ring: str, n_batches: int, batch: int, conn: Connection) -> None:
    def body() -> None:
        from mpkv.shm.ring import RingWriter

        with RingWriter(ring) as w:
            for b in range(n_batches):
                recs = np.zeros((batch, 8), dtype=np.int64)
                recs[:, 0] = np.arange(b * batch, (b + 1) * batch)
                recs[:, 1:] = recs[:, :1] * 3
                w.put_records(recs, timeout_s=60)

    report(conn, body)


def endless_writer(ring: str, conn: Connection) -> None:
    """Write sequence-numbered 64-byte messages until killed."""
    from mpkv.shm.ring import RingWriter

    w = RingWriter(ring, label="doomed-writer")
    conn.send("started")
    i = 0
    while True:
        w.put(message(0, i, 64), timeout_s=3600)
        i += 1


def endless_reader(ring: str, conn: Connection) -> None:
    from mpkv.shm.ring import RingReader

    r = RingReader(ring, 0, label="doomed-reader")
    conn.send("started")
    while True:
        r.get(timeout_s=3600)


def barrier_member(name: str, rank: int, keys: list[tuple[int, str]], timeout_s: float, conn: Connection) -> None:
    def body() -> list[int]:
        from mpkv.shm.barrier import Barrier, BarrierKey

        b = Barrier(name, rank, label=f"rank{rank}")
        try:
            return [b.wait(BarrierKey(seq, tag), timeout_s=timeout_s) for seq, tag in keys]
        finally:
            b.close()

    report(conn, body)


def barrier_forever(name: str, rank: int, conn: Connection) -> None:
    def body() -> None:
        from mpkv.shm.barrier import Barrier, BarrierKey

        b = Barrier(name, rank)
        conn.send("started")
        seq = 0
        try:
            while True:
                seq += 1
                b.wait(BarrierKey(seq, "step"), timeout_s=60)
        finally:
            b.close()

    report(conn, body)


def instance_owner(instance: str, conn: Connection) -> None:
    """Create an instance's registry and a ring, barrier and signal array; then block until killed."""
    from mpkv.shm.barrier import create_barrier
    from mpkv.shm.registry import Registry
    from mpkv.shm.ring import create_ring
    from mpkv.shm.signals import create_signals

    reg = Registry.create(instance)
    ring = create_ring(reg, "ring.a", 1 << 16, 1)
    bar = create_barrier(reg, "barrier.a", 3)
    sig = create_signals(reg, "signals.a", 4)
    conn.send({"registry": reg.seg.name, "ring": ring.name, "barrier": bar.name, "signals": sig.name})
    conn.recv()  # blocks until the test kills this process (or closes the pipe)
    for seg in (ring, bar, sig):
        reg.release(seg)
    reg.destroy()


def signal_writer(name: str, slot: int, steps: int, conn: Connection) -> None:
    def body() -> int:
        from mpkv.shm.signals import SignalArray

        arr = SignalArray(name, Phase)
        w = arr.writer(slot)
        for epoch in range(1, steps + 1):
            for v in Phase:
                w.write(v, epoch, aux=epoch * 1000 + int(v))
        arr.close()
        return steps

    report(conn, body)


def swap_traffic(instance: str, seed: int, conn: Connection) -> None:
    """A client that prefills, swaps out and in, and verifies every byte it can, until told to stop.

    Tasks refused or failed because of a pause or a clear are expected (and counted); any byte that differs
    from the recomputation for the weight version the actor reports is an error."""

    def body() -> dict[str, int]:
        import torch

        from mpkv.client import Client, InstanceNotServing, TaskFailed
        from mpkv.instance import CONTROL_COMMAND
        from mpkv.protocol import Cmd
        from mpkv.verify import verify_kv

        torch.set_num_threads(1)
        rng = np.random.default_rng(seed)
        counts = {"tasks_ok": 0, "explicit_failures": 0, "verified_ranks": 0, "invalidated": 0, "refused": 0}

        def ok() -> None:
            counts["tasks_ok"] += 1
            conn.send("tick")  # the controller cycles only after it saw traffic since its last resume

        with Client(instance) as client:
            cfg = client.cfg

            def check(tokens: np.ndarray, ids: np.ndarray, wv: int, host: bool) -> None:
                # A rank of another weight version: a restore replaced that KV, nothing to compare.
                compared = verify_kv(client, tokens, ids, wv, host=host, skip_other_versions=True)
                counts["verified_ranks"] += compared
                counts["invalidated"] += cfg.tp - compared

            while not conn.poll():
                try:
                    blocks = rng.permutation(cfg.device_blocks)[:4].astype(np.int32)
                    tokens = rng.integers(0, cfg.vocab, 3 * cfg.block_size + 1, dtype=np.int32)
                    wv = client.wait(client.prefill("t", tokens, blocks))[0].weight_version
                    ok()
                    check(tokens, blocks, wv, host=False)
                    slots = client.wait(client.swap_out(blocks))[0].slots
                    ok()
                    check(tokens, slots, wv, host=True)
                    other = rng.permutation(cfg.device_blocks)[:4].astype(np.int32)
                    client.wait(client.swap_in(slots, other))
                    ok()
                    check(tokens, other, wv, host=False)
                except InstanceNotServing:
                    counts["refused"] += 1
                    client.inst.control.wait(
                        CONTROL_COMMAND,
                        lambda s: s.value in (Cmd.RESUME, Cmd.SHUTDOWN),
                        what="the instance to resume",
                        timeout_s=60,
                    )
                except TaskFailed as e:
                    if not any(w in str(e) for w in ("cleared", "hold nothing", "weight version")):
                        raise
                    counts["explicit_failures"] += 1
        return counts

    report(conn, body)


def trainer_that_closes(instance: str, close: bool, conn: Connection) -> None:
    """A trainer: pauses the instance, then closes its Controller (or not) and lives on until told to exit."""
    from mpkv.controller import Controller

    ctl = Controller(instance)
    ctl.pause()
    if close:
        ctl.close()
    conn.send("paused")
    conn.recv()  # live on, holding (or not) the command block, until the test is done


def client_held_between_check_and_put(instance: str, conn: Connection) -> None:
    """A client whose prefill is held after its serving check and before its put, until the test says go."""
    import numpy as np

    from mpkv.client import Client

    def body() -> list[int]:
        with Client(instance) as client:
            check = client.check_serving

            def held() -> None:
                check()
                conn.send("checked")
                assert conn.recv() == "go"

            client.check_serving = held  # type: ignore[method-assign]
            ticket = client.prefill("late", np.arange(8, dtype=np.int32), np.array([0], dtype=np.int32))
            return [d.rank for d in client.wait(ticket, timeout_s=60)]

    report(conn, body)


def controller_dies_writing_a_command(instance: str, conn: Connection) -> None:
    """A controller issues PAUSE, then is killed between the two sequence stores of its next command (CLEAR): the
    command word is left odd, holding the new value with the old epoch."""
    import os
    import signal as signals

    from mpkv import _native
    from mpkv.controller import Controller
    from mpkv.instance import CONTROL_COMMAND
    from mpkv.protocol import Cmd

    ctl = Controller(instance)
    ctl.pause()
    buf, off = ctl.inst.control.seg.buf, ctl.inst.control.word(CONTROL_COMMAND).off
    conn.send("dying")
    conn.close()
    _native.store_u64(buf, off, _native.load_u64(buf, off) + 1)  # the first sequence store: odd
    _native.store_u64(buf, off + 8, int(Cmd.CLEAR))
    os.kill(os.getpid(), signals.SIGKILL)


def controller_dies_closing_the_rings(instance: str, conn: Connection) -> None:
    """A controller that published its closing drain fences for a PAUSE and was killed before it issued it."""
    import os
    import signal as signals

    from mpkv.instance import CONTROL_COMMAND, CONTROL_FENCE, FENCE_CLOSING, Instance
    from mpkv.protocol import Cmd

    inst = Instance.attach(instance)
    epoch = inst.control.read(CONTROL_COMMAND).epoch + 1
    for slot in CONTROL_FENCE.values():
        inst.control.writer(slot).write(Cmd.PAUSE, epoch, FENCE_CLOSING)
    conn.send("dying")
    conn.close()
    os.kill(os.getpid(), signals.SIGKILL)
