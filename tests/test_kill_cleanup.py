"""kill -9 at random moments: survivors raise the named error before their deadline; `mpkv cleanup` then
leaves /dev/shm exactly as it was. Cleanup never touches a live instance or a file that is not ours."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Callable

import procs
import pytest
from helpers import Child

from mpkv import naming
from mpkv.errors import PeerDied
from mpkv.shm.barrier import Barrier, BarrierKey
from mpkv.shm.cleanup import cleanup
from mpkv.shm.ring import RingReader, RingWriter

DEADLINE_S = 60.0  # far beyond what detection needs: it only catches a hang


def _shm(instance: str) -> set[str]:
    # Only this test's instance's names: other programs, tests and sessions come and go in /dev/shm meanwhile.
    mine = naming.user_prefix() + instance + "."
    return {e for e in os.listdir(naming.SHM_DIR) if e.startswith(mine)}


def _instance_with(peer: Callable[..., None], instance: str) -> tuple[Child, dict[str, str], Child]:
    """An owner child holding an instance's objects, and a peer child started on its ring."""
    owner = Child(procs.instance_owner, instance)
    names = owner.recv(30)
    child = Child(peer, names["ring"])
    assert child.recv(30) == "started"
    return owner, names, child


def _kill_owner_and_clean(owner: Child, instance: str, before: set[str]) -> None:
    owner.kill()
    report = cleanup(instance=instance)
    assert report.live_instances == []
    assert len(report.removed) == 4  # registry, ring, barrier, signals
    assert _shm(instance) == before, f"cleanup left {_shm(instance) - before}"


def test_kill_writer_mid_stream(instance: str, rng: random.Random) -> None:
    before = _shm(instance)
    owner, names, writer = _instance_with(procs.endless_writer, instance)
    kill_after_s = rng.uniform(0.0, 0.5)
    expected = 0
    with RingReader(names["ring"]) as r:
        t_kill = time.monotonic() + kill_after_s
        while time.monotonic() < t_kill:
            msg = r.get(timeout_s=DEADLINE_S)
            assert msg == procs.message(0, expected, 64)
            expected += 1
        writer.kill()
        # PeerDied, not WaitTimeout: the death is noticed, not the deadline reached.
        with pytest.raises(PeerDied, match=rf"the writer 'doomed-writer' of ring .* is dead.*pid {writer.pid}"):
            while True:  # whatever it published before dying is still delivered, intact and in order
                msg = r.get(timeout_s=DEADLINE_S)
                assert struct.unpack_from("<Q", msg)[0] == expected
                expected += 1
    _kill_owner_and_clean(owner, instance, before)


def test_kill_reader_while_writer_waits(instance: str, rng: random.Random) -> None:
    before = _shm(instance)
    owner, names, reader = _instance_with(procs.endless_reader, instance)
    with RingWriter(names["ring"]) as w:
        n = rng.randrange(0, 5000)
        for i in range(n):
            w.put(procs.message(0, i, 64), timeout_s=DEADLINE_S)
        reader.kill()
        with pytest.raises(PeerDied, match=rf"reader 0 'doomed-reader' of ring .* is dead.*pid {reader.pid}"):
            for i in range(n, n + 10_000):  # 64 KiB ring: it fills long before this
                w.put(procs.message(0, i, 64), timeout_s=DEADLINE_S)
    _kill_owner_and_clean(owner, instance, before)


def test_kill_barrier_member(instance: str, rng: random.Random) -> None:
    before = _shm(instance)
    owner = Child(procs.instance_owner, instance)
    names = owner.recv(30)
    victim_rank = rng.randrange(1, 3)
    kids = {rank: Child(procs.barrier_forever, names["barrier"], rank) for rank in (1, 2)}
    for kid in kids.values():
        assert kid.recv(30) == "started"
    b0 = Barrier(names["barrier"], 0)
    seq = 0
    for seq in range(1, rng.randrange(2, 300)):
        b0.wait(BarrierKey(seq, "step"), timeout_s=DEADLINE_S)
    victim = kids[victim_rank]
    victim.kill()
    with pytest.raises(PeerDied, match=rf"rank {victim_rank} of barrier .* is dead.*pid {victim.pid}"):
        for extra in (1, 2):
            b0.wait(BarrierKey(seq + extra, "step"), timeout_s=DEADLINE_S)
    b0.close()
    survivor = kids[3 - victim_rank]
    kind, text = survivor.error()
    assert kind == "PeerDied" and f"rank {victim_rank}" in text and f"pid {victim.pid}" in text
    _kill_owner_and_clean(owner, instance, before)


def test_cleanup_never_touches_a_live_instance(instance: str) -> None:
    owner = Child(procs.instance_owner, instance)
    names = owner.recv(30)
    before = _shm(instance)
    for dry in (True, False):
        report = cleanup(instance=instance, dry_run=dry)  # another program's dead instances are not ours to clean
        assert instance in report.live_instances
        assert not any(instance in n for n in report.removed)
    assert _shm(instance) == before
    owner.conn.send("stop")  # a clean owner shutdown unlinks everything itself
    owner.join(30)
    assert not any(n.lstrip("/") in _shm(instance) for n in names.values())


def test_cleanup_command_dry_run_then_real(instance: str) -> None:
    before = _shm(instance)
    owner = Child(procs.instance_owner, instance)
    names = owner.recv(30)
    owner.kill()
    stray = naming.shm_path(f"/mpkv.u{os.getuid()}.{instance}.not-ours")
    fd = os.open(stray, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)  # ours and private: only its header tells
    os.write(fd, b"some other program's file")
    os.close(fd)
    try:
        # Scoped to this test's instance: other programs' names on the machine are none of this test's business.
        cmd = [sys.executable, "-m", "mpkv.cli", "cleanup", "--name", instance, "--dry-run"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        for name in names.values():
            assert f"would remove {name}" in out
        assert f"left alone /{os.path.basename(stray)}: not an mpkv segment" in out
        assert all(n.lstrip("/") in _shm(instance) for n in names.values()), "--dry-run removed something"
        out = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=60, check=True).stdout
        assert all(f"removed {n}" in out for n in names.values())
        assert os.path.exists(stray), "cleanup removed a file that is not an mpkv segment"
    finally:
        os.unlink(stray)
    assert not _shm(instance) - before, f"left behind: {_shm(instance) - before}"
