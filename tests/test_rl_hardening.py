"""The RL transaction when a step fails half-way: reproduced the way users meet it (an actor stopped with SIGSTOP
while the controller's step times out), then every way out the controller admits."""

from __future__ import annotations

import os
import signal

import numpy as np
import procs
import pytest
from helpers import Child
from instances import Launched, prefill_and_verify, verify

from mpkv.client import Client
from mpkv.controller import CommandRefused, Controller, StepFailed
from mpkv.errors import AttachError
from mpkv.protocol import ActorState, Role, actor_slot


def _pid(ctl: Controller, role: Role, rank: int) -> int:
    return ctl.inst.status.read(actor_slot(role, rank)).writer.pid


def test_a_restore_after_a_clear_that_timed_out_is_refused_until_the_clear_is_done(instance: str) -> None:
    """Reproduces: pause; SIGSTOP rank 0's transfer manager and messager; clear(timeout_s=1) fails; restore(77)
    used to succeed over the still-mapped pools (every actor kept weight version 41 and served the old KV)."""
    np_rng = np.random.default_rng(7)
    blocks = np.arange(4, dtype=np.int32)
    with Launched(instance, tp=2, weight_version=41), Controller(instance) as ctl, Client(instance) as client:
        old_tokens = prefill_and_verify(client, np_rng, blocks, 41)
        ctl.pause()
        stopped = [_pid(ctl, Role.TRANSFER, 0), _pid(ctl, Role.MESSAGER, 0)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            with pytest.raises(
                StepFailed, match=r"CLEAR@\d+ failed: \w+ r0 did not acknowledge.*(transfer|messager) r0 .*stopped"
            ):
                ctl.clear(timeout_s=1)
            status = ctl.status()
            assert status["step"]["done"] is False
            assert any(p.startswith(("transfer r0", "messager r0")) for p in status["step"]["pending"])
            with pytest.raises(CommandRefused, match=r"CLEAR@\d+, was not acknowledged by every actor"):
                ctl.restore(77)
            with pytest.raises(CommandRefused, match="was not acknowledged"):
                ctl.resume()
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        ctl.clear(timeout_s=30)  # the retry: now every actor acknowledges
        assert ctl.status()["step"]["done"] is True
        ctl.restore(77)
        ctl.resume()
        for rank in range(2):
            for role in (Role.WORKER, Role.TRANSFER, Role.MESSAGER):
                sig = ctl.inst.status.read(actor_slot(role, rank))
                assert (sig.value, sig.aux) == (ActorState.READY, 77), f"{role.name} r{rank}: {sig}"
        # No KV of version 41 is served: the blocks read back are the fresh pool's, not the old prefill's.
        with pytest.raises(AssertionError, match="KV differs from weight version 77"):
            verify(client, old_tokens, blocks, 77)
        prefill_and_verify(client, np_rng, blocks, 77)


def test_a_restore_that_timed_out_is_retried_or_cleared(instance: str) -> None:
    """A RESTORE that timed out on one rank: a restore of another version is refused; the retry completes, with
    the attacher of the stopped rank mapping the pool its owner allocated at the first try."""
    np_rng = np.random.default_rng(11)
    blocks = np.arange(2, dtype=np.int32)
    with Launched(instance, tp=2), Controller(instance) as ctl, Client(instance) as client:
        ctl.pause()
        ctl.clear()
        stopped = _pid(ctl, Role.TRANSFER, 1)
        os.kill(stopped, signal.SIGSTOP)
        try:
            with pytest.raises(StepFailed, match=r"RESTORE@\d+ failed: transfer r1 did not acknowledge"):
                ctl.restore(5, timeout_s=1)
            with pytest.raises(CommandRefused, match="retry restore, clear both tiers or shut down"):
                ctl.restore(6)
        finally:
            os.kill(stopped, signal.SIGCONT)
        ctl.restore(5)
        assert ctl.weight_version == 5
        ctl.resume()
        prefill_and_verify(client, np_rng, blocks, 5)


@pytest.mark.parametrize("close", [True, False], ids=["closed", "open"])
def test_a_closed_controller_hands_the_instance_over(instance: str, close: bool) -> None:
    """A trainer that closed its Controller no longer locks out `mpkv ctl` from another shell; one that keeps it
    open does, and the refusal names the trainer's pid."""
    with Launched(instance, tp=1):
        trainer = Child(procs.trainer_that_closes, instance, close)
        try:
            assert trainer.recv(60) == "paused"
            with Controller(instance) as shell:
                if close:
                    shell.resume()
                else:
                    with pytest.raises(AttachError, match=rf"is written by pid {trainer.pid}"):
                        shell.resume()
        finally:
            trainer.conn.send("exit")
            trainer.join(30)
        with Controller(instance) as shell:  # a trainer that exited never holds the block
            shell.pause()
            shell.resume()
