"""The RL transaction when a step fails half-way: reproduced the way users meet it (an actor stopped with SIGSTOP
while the controller's step times out), then every way out the controller admits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import procs
import pytest
from helpers import Child
from instances import Launched, back_to_serving, prefill_and_verify, shared_instance, verify

from mpkv import status
from mpkv.client import Client
from mpkv.controller import CommandRefused, Controller, StepFailed
from mpkv.errors import AttachError
from mpkv.instance import CONTROL_COMMAND, CONTROL_FENCE, FENCE_CLOSING, Instance
from mpkv.protocol import ActorState, Cmd, Role, actor_slot

# Its tests share launched instances (module fixtures): under -n they run on one worker.
pytestmark = pytest.mark.xdist_group("rl_hardening")


def _pid(ctl: Controller, role: Role, rank: int) -> int:
    return ctl.inst.status.read(actor_slot(role, rank)).writer.pid


@pytest.fixture(autouse=True)
def _serving_after(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    back_to_serving(request, "served1", "served2")


# Launching is the slow part: tests that leave their instance serving share one per module and tp (the fixture's
# SHUTDOWN at the end must go through, and nothing of it may be left).
@pytest.fixture(scope="module")
def served2() -> Iterator[str]:
    with shared_instance(tp=2, weight_version=41) as inst:
        yield inst.name


@pytest.fixture(scope="module")
def served1() -> Iterator[str]:
    with shared_instance(tp=1) as inst:
        yield inst.name


def test_a_restore_after_a_clear_that_timed_out_is_refused_until_the_clear_is_done(served2: str) -> None:
    """Reproduces: pause; SIGSTOP rank 0's transfer manager and messager; clear(timeout_s=1) fails; restore(77)
    used to succeed over the still-mapped pools (every actor kept weight version 41 and served the old KV)."""
    np_rng = np.random.default_rng(7)
    blocks = np.arange(4, dtype=np.int32)
    instance = served2
    with Controller(instance) as ctl, Client(instance) as client:
        old = ctl.weight_version  # 41 when launched
        new = old + 36
        old_tokens = prefill_and_verify(client, np_rng, blocks, old)
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
            assert status.step.done is False
            assert any(p.startswith(("transfer r0", "messager r0")) for p in status.step.pending)
            with pytest.raises(CommandRefused, match=r"CLEAR@\d+, was not acknowledged by every actor"):
                ctl.restore(new)
            with pytest.raises(CommandRefused, match="was not acknowledged"):
                ctl.resume()
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)
        ctl.clear(timeout_s=30)  # the retry: now every actor acknowledges
        assert ctl.status().step.done is True
        ctl.restore(new)
        ctl.resume()
        for rank in range(2):
            for role in (Role.WORKER, Role.TRANSFER, Role.MESSAGER):
                sig = ctl.inst.status.read(actor_slot(role, rank))
                assert (sig.value, sig.aux) == (ActorState.READY, new), f"{role.name} r{rank}: {sig}"
        # No KV of the old version is served: the blocks read back are the fresh pool's, not the old prefill's.
        with pytest.raises(AssertionError, match=f"KV differs from weight version {new}"):
            verify(client, old_tokens, blocks, new)
        prefill_and_verify(client, np_rng, blocks, new)


def test_a_restore_that_timed_out_is_retried_or_cleared(served2: str) -> None:
    """A RESTORE that timed out on one rank: a restore of another version is refused; the retry completes, with
    the attacher of the stopped rank mapping the pool its owner allocated at the first try."""
    np_rng = np.random.default_rng(11)
    blocks = np.arange(2, dtype=np.int32)
    instance = served2
    with Controller(instance) as ctl, Client(instance) as client:
        new = ctl.weight_version + 4
        ctl.pause()
        ctl.clear()
        stopped = _pid(ctl, Role.TRANSFER, 1)
        os.kill(stopped, signal.SIGSTOP)
        try:
            with pytest.raises(StepFailed, match=r"RESTORE@\d+ failed: transfer r1 did not acknowledge"):
                ctl.restore(new, timeout_s=1)
            with pytest.raises(CommandRefused, match="retry restore, clear both tiers or shut down"):
                ctl.restore(new + 1)
        finally:
            os.kill(stopped, signal.SIGCONT)
        ctl.restore(new)
        assert ctl.weight_version == new
        ctl.resume()
        prefill_and_verify(client, np_rng, blocks, new)


@pytest.mark.parametrize("close", [True, False], ids=["closed", "open"])
def test_a_closed_controller_hands_the_instance_over(served1: str, close: bool) -> None:
    """A trainer that closed its Controller no longer locks out `mpkv ctl` from another shell; one that keeps it
    open does, and the refusal names the trainer's pid."""
    instance = served1
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


def test_a_task_put_while_a_shutdown_is_issued_is_served_by_every_rank_or_none(instance: str) -> None:
    """The race of a client's check-then-put with a SHUTDOWN: the client checked that the instance serves, then
    (held here) puts its task while the shutdown is being issued. Rank 0 used to drain an empty ring and stop, and
    rank 1 to serve the task alone. Now the controller waits for the put to land before it issues the command, and
    every rank drains exactly up to the same ring position: both serve the task, and the shutdown is clean."""
    with Launched(instance, tp=2) as inst, Controller(instance) as ctl:
        client = Child(procs.client_held_between_check_and_put, instance)
        assert client.recv(60) == "checked"
        epoch = ctl.inst.control.read(CONTROL_COMMAND).epoch + 1
        shutdown = threading.Thread(target=ctl.shutdown, kwargs={"timeout_s": 60})
        shutdown.start()
        fence = ctl.inst.control.wait(
            CONTROL_FENCE[Role.WORKER], lambda s: s.epoch == epoch, what="the worker ring's fence", timeout_s=60
        )
        assert fence.aux == FENCE_CLOSING, "the fence was published while a put was between its check and its store"
        assert ctl.inst.control.read(CONTROL_COMMAND).epoch < epoch, "SHUTDOWN was issued while a put was in flight"
        client.conn.send("go")
        assert client.result(60) == [0, 1]
        shutdown.join(60)
        assert ctl.inst.control.read(CONTROL_COMMAND).epoch == epoch
        for rank in range(2):
            for role in (Role.WORKER, Role.TRANSFER, Role.MESSAGER):
                assert ctl.inst.status.read(actor_slot(role, rank)).value == ActorState.STOPPED
        assert inst.exit_code() == 0


def test_a_controller_killed_mid_write_of_a_command_takes_nothing_down(instance: str) -> None:
    """A command word torn by a controller killed between its two sequence stores: the actors keep acting on the
    last command they read (they used to fail on the torn read, taking the instance down), and the next controller
    repairs the word as a PAUSE at a new epoch (never NONE, which actors read as "run") and goes on."""
    np_rng = np.random.default_rng(3)
    with Launched(instance, tp=2), Client(instance) as client:
        dying = Child(procs.controller_dies_writing_a_command, instance)
        assert dying.recv(60) == "dying"
        dying.join(30)
        assert dying.proc.exitcode == -signal.SIGKILL
        looker = Instance.attach(instance)
        try:  # a report reads through the torn word (as no command of its dead writer) and never raises
            assert status.read_status(looker).command.kind == "NONE"
            assert looker.culprits() == "the instance was stopped (no actor stopped yet)"
        finally:
            looker.close()
        torn_ns = time.monotonic_ns()
        with Controller(instance) as ctl:
            # Every actor publishes its heartbeat after a pass of its loop that re-read the (changed) command word.
            for slot in range(6):
                ctl.inst.status.wait(slot, lambda s: s.timestamp_ns > torn_ns, what="a heartbeat", timeout_s=30)
            ctl.pause()  # claims (repairs the word: PAUSE@2) first; then pauses, unless the actors acked PAUSE@2
            cmd = ctl.inst.control.read(CONTROL_COMMAND)
            assert cmd.value == Cmd.PAUSE and cmd.epoch >= 2, cmd  # the torn word held epoch 1
            ctl.resume()
            for entry in ctl.status().actors:
                assert entry.alive and entry.state == "READY", entry
        prefill_and_verify(client, np_rng, np.arange(2, dtype=np.int32), 1)
        # A controller killed after closing the rings for a pause, before it issued it: clients go on submitting.
        dying = Child(procs.controller_dies_closing_the_rings, instance)
        assert dying.recv(60) == "dying"
        dying.join(30)
        prefill_and_verify(client, np_rng, np.arange(2, dtype=np.int32), 1)
        with Controller(instance) as next_controller:  # its claim must not revive the dead controller's fences
            assert next_controller.resume().already
            prefill_and_verify(client, np_rng, np.arange(2, dtype=np.int32), 1)


def test_two_controllers_of_one_process_hold_the_block_until_both_closed(served1: str) -> None:
    """The claim on the command block is per process: closing one of two Controllers of a trainer must not let
    another process become a second writer while the other Controller still writes."""
    instance = served1
    shell = [sys.executable, "-m", "mpkv.cli", "ctl", instance, "resume"]
    first, second = Controller(instance), Controller(instance)
    first.pause()
    second.pause()  # already paused: it holds the block too
    first.close()
    out = subprocess.run(shell, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "is written by pid" in out.stderr, out.stderr
    second.close()
    out = subprocess.run(shell, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
