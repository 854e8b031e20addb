"""mpkv.launch: a whole instance in a child process, ready when the body runs, gone (processes and names) after,
however the body ends; a launcher that fails first is an error that quotes it. And mpkv.verify's diagnosis."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from instances import SMALL

import mpkv
from mpkv import naming, verify
from mpkv.errors import KVMismatch, LaunchError
from mpkv.shm.proc import ProcId
from mpkv.verify import verify_kv


class BodyFailed(Exception):
    pass


def own_names(instance: str) -> list[str]:
    return [e for e in os.listdir(naming.SHM_DIR) if instance in e]


def test_launch_yields_a_ready_instance_and_leaves_nothing_when_the_body_raises(
    instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(BodyFailed), mpkv.launch(instance, tp=1, **SMALL) as inst:
        assert set(inst.pids) == {"worker:r0", "transfer:r0", "messager:r0"}, inst.ready
        assert inst.config.tp == 1 and inst.config.device_blocks == SMALL["device_blocks"]
        assert os.path.basename(inst.log_dir) == instance and inst.ready["instance"] == instance
        procs = [ProcId.of(inst.pid)] + [ProcId.of(pid) for pid in inst.pids.values()]
        assert all(p.alive() for p in procs), [p.describe() for p in procs]
        assert own_names(instance), "a ready instance has no names in /dev/shm"
        with mpkv.Client(instance) as client:  # it serves; and mpkv.verify names what differs, and where
            tokens = np.arange(3, 3 + 2 * SMALL["block_size"], dtype=np.int32)
            blocks = np.array([5, 9], dtype=np.int32)
            client.wait(client.prefill("r", tokens, blocks))
            assert verify_kv(client, tokens, blocks, 1) == 1
            other = tokens.copy()
            other[SMALL["block_size"] + 1] += 1  # the second token of the second block, block 9
            with pytest.raises(KVMismatch, match=r"^read: rank 0 block 9 \(#1 of 2\), layer 0 K, token 9: KV differs"):
                verify_kv(client, other, blocks, 1, what="read")
            with pytest.raises(KVMismatch, match=r"rank 0 serves weight version 1 for blocks \[5, 9\], expected 2"):
                verify_kv(client, tokens, blocks, 2)
            with monkeypatch.context() as m:  # one block per read: the chunks are put back together in order
                m.setattr(verify, "chunk_blocks", lambda cfg: 1)
                assert verify_kv(client, tokens, blocks, 1) == 1
                with pytest.raises(KVMismatch, match=r"rank 0 block 9 \(#1 of 2\), layer 0 K, token 9"):
                    verify_kv(client, other, blocks, 1)
        raise BodyFailed
    assert not [p for p in procs if p.alive()], [p.describe() for p in procs]
    assert not own_names(instance)
    assert inst.returncode == 0, list(inst.lines)  # SIGTERM: the launcher's ordered teardown


def test_a_launcher_killed_by_someone_else_leaves_no_names(instance: str) -> None:
    """kill -9 of the launcher from outside: its actors follow it (parent-death signals), and leaving the block
    reclaims the names it could not unlink."""
    with mpkv.launch(instance, tp=1, **SMALL) as inst:
        assert own_names(instance)
        os.kill(inst.pid, signal.SIGKILL)
        inst.wait_exit(60)
    assert inst.returncode == -signal.SIGKILL
    assert not own_names(instance), "the names of a launcher killed from outside were left"


@pytest.mark.parametrize("case", ["bad_geometry", "actor_crash", "never_ready"])
def test_a_launcher_failing_before_ready_raises_quoting_it(instance: str, case: str) -> None:
    settings: dict[str, int] = dict(SMALL)
    env, timeout_s = None, 120.0
    if case == "bad_geometry":
        settings["kv_heads"], want = 3, r"exited with code 2 before ready; its last words: .*\(3\) must be divisible"
    elif case == "actor_crash":
        env, want = {"MPKV_FAULT": "worker:0:start:crash"}, r"exited with code 1 before ready; .*worker r0 \(pid \d+\)"
    else:  # hangs in its start: the deadline ends the wait, and the teardown still unlinks everything
        env, timeout_s, want = {"MPKV_FAULT": "worker:0:start:hang"}, 2.0, r"did not get to be ready within 2 s"
    with (
        pytest.raises(LaunchError, match=want) as err,
        mpkv.launch(instance, tp=2 if case == "bad_geometry" else 1, env=env, ready_timeout_s=timeout_s, **settings),
    ):
        pytest.fail("the body ran")
    assert f"instance {instance}" in str(err.value)
    assert not own_names(instance)
